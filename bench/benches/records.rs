//! What TLS costs a bulk byte on one hop, in user space: the AEAD alone, sealing and opening
//! 16 KiB records in place (ring's AES-128-GCM, the engine's first cipher suite, and, for
//! comparison, graviola's, which the engine does not use for records: BENCHMARKS.md, "bulk: the
//! floor of a two-process chain"), the same for one 64-byte record (rr's requests), and rustls'
//! buffered API around ring's AEAD (`Writer::write` → `write_tls` → `read_tls` →
//! `process_new_packets` → `Reader::read`, the path the engine and the agent take through
//! `futures-rustls`, with the engine's provider). The buffered row minus the AEAD row is what
//! rustls' queues and copies add; that bounds what a decrypt-in-place (unbuffered) TLS layer
//! could save. Sockets, framing and the mux are not in here:
//! `bench/bulk_floor.c` measures a relay pair's socket cost, and BENCHMARKS.md ("bulk: the floor
//! of a two-process chain") adds the two.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

/// Bytes moved per iteration.
const TOTAL: usize = 1024 * 1024;
/// A full TLS record's plaintext.
const RECORD: usize = 16 * 1024;

/// A connected client and server, both with `provider`.
fn pair(
    provider: rustls::crypto::CryptoProvider,
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let provider = Arc::new(provider);
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = key.cert.der().clone();
    let private =
        rustls_pki_types::PrivateKeyDer::try_from(key.signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], private)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c =
        rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut at = wire.as_slice();
        while !at.is_empty() {
            s.read_tls(&mut at).unwrap();
            s.process_new_packets().unwrap();
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        let mut at = wire.as_slice();
        while !at.is_empty() {
            c.read_tls(&mut at).unwrap();
            c.process_new_packets().unwrap();
        }
        wire.clear();
    }
    assert_eq!(
        c.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    (c, s)
}

fn records(c: &mut Criterion) {
    let mut g = c.benchmark_group("records");
    g.throughput(Throughput::Bytes(TOTAL as u64));

    // The cipher alone: seal then open each 16 KiB record in place.
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
    let mut record = vec![5u8; RECORD + AES_128_GCM.tag_len()];
    g.bench_function("aead_seal_open_1MiB", |b| {
        b.iter(|| {
            for i in 0..(TOTAL / RECORD) as u64 {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&i.to_be_bytes());
                let (body, tag) = record.split_at_mut(RECORD);
                let t = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::empty(),
                        body,
                    )
                    .unwrap();
                tag.copy_from_slice(t.as_ref());
                key.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut record,
                )
                .unwrap();
            }
        })
    });

    // The same with graviola's AES-128-GCM (AVX-512 + VAES where the CPU has them).
    let gkey = graviola::aead::AesGcm::new(&[7u8; 16]);
    g.bench_function("graviola_seal_open_1MiB", |b| {
        b.iter(|| {
            for i in 0..(TOTAL / RECORD) as u64 {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&i.to_be_bytes());
                let (body, tag) = record.split_at_mut(RECORD);
                let mut t = [0u8; 16];
                gkey.encrypt(&nonce, &[], body, &mut t);
                tag.copy_from_slice(&t);
                let (body, tag) = record.split_at_mut(RECORD);
                gkey.decrypt(&nonce, &[], body, tag).unwrap();
            }
        })
    });

    // One small record (rr's 64-byte requests), each cipher: per-record costs dominate here.
    let mut small = [3u8; 64 + 16];
    g.throughput(Throughput::Bytes(64));
    g.bench_function("aead_seal_open_64B", |b| {
        b.iter(|| {
            let nonce = [1u8; 12];
            let (body, tag) = small.split_at_mut(64);
            let t = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), body)
                .unwrap();
            tag.copy_from_slice(t.as_ref());
            key.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut small,
            )
            .unwrap();
        })
    });
    g.bench_function("graviola_seal_open_64B", |b| {
        b.iter(|| {
            let nonce = [1u8; 12];
            let (body, tag) = small.split_at_mut(64);
            let mut t = [0u8; 16];
            gkey.encrypt(&nonce, &[], body, &mut t);
            tag.copy_from_slice(&t);
            let (body, tag) = small.split_at_mut(64);
            gkey.decrypt(&nonce, &[], body, tag).unwrap();
        })
    });
    g.throughput(Throughput::Bytes(TOTAL as u64));

    // rustls' buffered API, both ends in memory: 1 MiB written in 64 KiB writes, the records
    // handed over in 256 KiB reads (the engine's read-ahead), read out in 64 KiB reads.
    {
        let (mut client, mut server) = pair(jaunt_engine::server::tls_provider());
        let plain = vec![9u8; 64 * 1024];
        let mut wire = Vec::with_capacity(2 * TOTAL);
        let mut out = vec![0u8; 64 * 1024];
        g.bench_function("rustls_buffered_1MiB", |b| {
            b.iter(|| {
                let mut got = 0;
                for _ in 0..TOTAL / plain.len() {
                    client.writer().write_all(&plain).unwrap();
                    while client.wants_write() {
                        client.write_tls(&mut wire).unwrap();
                    }
                }
                let mut at = 0;
                while at < wire.len() {
                    let end = (at + 256 * 1024).min(wire.len());
                    let mut chunk = &wire[at..end];
                    while !chunk.is_empty() {
                        server.read_tls(&mut chunk).unwrap();
                        server.process_new_packets().unwrap();
                        loop {
                            match server.reader().read(&mut out) {
                                Ok(n) if n > 0 => got += n,
                                _ => break,
                            }
                        }
                    }
                    at = end;
                }
                wire.clear();
                assert_eq!(got, TOTAL);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
