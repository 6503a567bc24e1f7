//! Tests of the jaunt patches (see PATCHES.md): certificate key blobs, certificate
//! signing keys and host key algorithm offers, raw relay sends, the fuzz entry point.

use crate::packets::{Ed25519Cert, Ed25519PubKey, PubKey};
use crate::sign::{SigType, SignKey};
use crate::sshnames::*;
use crate::sshwire::{self, BinString, Blob};

/// A user certificate made by `ssh-keygen -s ca -I alice -n root,alice -V +52w`
/// (OpenSSH 9.2).
const OPENSSH_CERT_HEX: &str = "000000207373682d656432353531392d636572742d763031406f70656e7373682e636f6d000000208fc4c955d3742458bf57adfe17f0fe239e84de33dae84668279f25d6698ec5eb0000002096ce85921a6c71b50811db7b540884b0bc9fbf3e94dc8179f0e3eb0d0bb7ed4a00000000000000000000000100000005616c6963650000001100000004726f6f7400000005616c696365000000006b158a40000000006cf56c8a0000000000000082000000157065726d69742d5831312d666f7277617264696e6700000000000000177065726d69742d6167656e742d666f7277617264696e6700000000000000167065726d69742d706f72742d666f7277617264696e67000000000000000a7065726d69742d707479000000000000000e7065726d69742d757365722d72630000000000000000000000330000000b7373682d6564323535313900000020a476b80a101407ae87f8e64986c470ac2d8bc6fcb7a2a9c6c084ff20e186b754000000530000000b7373682d6564323535313900000040ef096768190cdbe01d4ebc01d0bceea40ac0341dd0ad7648eea01146aa44498a6e53ebee162fce2b52a03323effcf69250e0fc9cf5c8fe4fe0d5de0e1a219c00";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn encode(p: &PubKey) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let l = sshwire::write_ssh(&mut buf, p).unwrap();
    buf.truncate(l);
    buf
}

#[test]
fn openssh_certificate_blob_parses_and_reencodes_exactly() {
    let blob = unhex(OPENSSH_CERT_HEX);
    let (key, used): (PubKey, usize) = sshwire::read_ssh(&blob, None).unwrap();
    assert_eq!(used, blob.len());
    let PubKey::Ed25519Cert(c) = &key else { panic!("not a certificate: {key:?}") };
    assert_eq!(c.cert_type, 1, "a user certificate");
    assert_eq!(c.key_id.0, b"alice");
    // principals: two length-prefixed strings
    assert_eq!(c.principals.0, b"\0\0\0\x04root\0\0\0\x05alice");
    assert!(c.valid_before > c.valid_after);
    assert_eq!(key.algorithm_name().unwrap(), SSH_NAME_ED25519_CERT);
    assert_eq!(encode(&key), blob, "re-encoding gives the exact blob back");
    assert!(matches!(key.plain_key(), PubKey::Ed25519(_)));
}

fn test_cert(key: &ed25519_dalek::SigningKey) -> Vec<u8> {
    let pk = key.verifying_key().to_bytes();
    let cert = PubKey::Ed25519Cert(Ed25519Cert {
        nonce: BinString(b"nonce"),
        key: Blob(pk),
        serial: 7,
        cert_type: 2,
        key_id: BinString(b"node1"),
        principals: BinString(b"\0\0\0\x05node1"),
        valid_after: 0,
        valid_before: u64::MAX,
        critical_options: BinString(b""),
        extensions: BinString(b""),
        reserved: BinString(b""),
        signature_key: BinString(b"not checked by sunset"),
        signature: BinString(b"not checked by sunset"),
    });
    encode(&cert)
}

#[cfg(feature = "alloc")]
#[test]
fn certificate_sign_key_presents_the_certificate_and_signs_with_the_key() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let other = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    let blob = test_cert(&key);
    assert!(SignKey::ed25519_with_cert(other, blob.clone()).is_err(), "wrong key");
    assert!(SignKey::ed25519_with_cert(key.clone(), blob[..40].to_vec()).is_err());
    let sk = SignKey::ed25519_with_cert(key, blob.clone()).unwrap();
    let pubkey = sk.pubkey();
    assert_eq!(encode(&pubkey), blob);
    assert!(sk.can_sign(SigType::Ed25519Cert) && sk.can_sign(SigType::Ed25519));
    let msg = BinString(b"exchange hash");
    let sig = sk.sign(&msg).unwrap();
    let sig: crate::Signature = (&sig).into();
    // as a host key algorithm and as a userauth signature over a certificate
    SigType::Ed25519Cert.verify(&pubkey, &msg, &sig).unwrap();
    SigType::Ed25519.verify(&pubkey, &msg, &sig).unwrap();
    // a plain key cannot pass for a certificate host key
    let plain = pubkey.plain_key();
    assert!(SigType::Ed25519Cert.verify(&plain, &msg, &sig).is_err());
    let bad = BinString(b"another hash");
    assert!(SigType::Ed25519Cert.verify(&pubkey, &bad, &sig).is_err());
}

#[test]
fn plain_ed25519_key_is_unchanged() {
    let sk = SignKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[5; 32]));
    assert!(matches!(sk.pubkey(), PubKey::Ed25519(Ed25519PubKey { .. })));
    assert!(!sk.can_sign(SigType::Ed25519Cert));
}

#[test]
fn fuzz_parse_survives_junk_and_truncations() {
    let blob = unhex(OPENSSH_CERT_HEX);
    for n in 0..blob.len() {
        crate::fuzz_parse(&blob[..n]);
    }
    crate::fuzz_parse(&[50, 0, 0, 0, 255, 255, 255, 255]);
    crate::fuzz_parse(&[94, 0, 0, 0, 1, 255, 255, 255, 255, 1]);
    crate::fuzz_parse(&[]);
}

/// Moves what `from` has to send to the end of `pending`, then gives `to` as much of
/// `pending` as it takes now.
#[cfg(feature = "alloc")]
fn pump<A: crate::CliServ, B: crate::CliServ>(
    from: &mut crate::Runner<'static, A>,
    to: &mut crate::Runner<'static, B>,
    pending: &mut alloc::vec::Vec<u8>,
) {
    let out = from.output_buf().to_vec();
    from.consume_output(out.len());
    pending.extend_from_slice(&out);
    while !pending.is_empty() && to.is_input_ready() {
        let n = to.input(pending).unwrap();
        if n == 0 {
            break;
        }
        pending.drain(..n);
    }
}

// `cargo test -p sunset --features alloc` (the feature the workspace builds it with).
#[cfg(feature = "alloc")]
#[test]
fn released_idle_buffers_come_back_when_written() {
    use crate::{Event, ServEvent};
    let mut client = crate::Runner::<crate::client::Client>::new_client_owned();
    let mut server = crate::Runner::<crate::server::Server>::new_server_owned();
    let (mut to_server, mut to_client) =
        (alloc::vec::Vec::new(), alloc::vec::Vec::new());
    // Released before anything was written, and between every step of the version and
    // KEXINIT exchange: each write allocates again, and the handshake goes on to the point
    // where the server asks for its host keys.
    let mut asked_for_host_keys = false;
    for _ in 0..50 {
        client.release_idle_buffers();
        server.release_idle_buffers();
        while !matches!(client.progress().unwrap(), Event::None) {}
        loop {
            match server.progress().unwrap() {
                Event::None => break,
                Event::Serv(ServEvent::Hostkeys(_)) => {
                    asked_for_host_keys = true;
                    break;
                }
                _ => {}
            }
        }
        if asked_for_host_keys {
            break;
        }
        client.release_idle_buffers();
        server.release_idle_buffers();
        pump(&mut client, &mut server, &mut to_server);
        client.release_idle_buffers();
        server.release_idle_buffers();
        pump(&mut server, &mut client, &mut to_client);
    }
    assert!(asked_for_host_keys);
}
