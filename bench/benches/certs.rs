//! Certificate issuance and identity decoding: what a login costs control (one X.509 + one SSH
//! certificate, excluding the password hash) and what a handshake costs engine and agent
//! (decoding the identity from a client certificate). Goal (control-plane issue): at least 5,000
//! certificate pairs per second per core.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_control::ca::{spki_pem_to_der, CaKind, CertAuthority, LocalKeys};

fn identity() -> Identity {
    let now = unix_now();
    Identity {
        kind: IdentityKind::User,
        name: "alice".into(),
        roles: vec!["access".into(), "dba".into()],
        logins: vec!["alice".into(), "root".into(), "ubuntu".into()],
        db_users: vec!["alice".into()],
        db_names: vec!["app".into(), "analytics".into()],
        traits: [(
            "logins".to_string(),
            vec!["alice".to_string(), "root".to_string()],
        )]
        .into_iter()
        .collect(),
        cluster: "bench.jaunt.local".into(),
        not_before: now - 60,
        expires: now + 12 * 3600,
        permit_pty: true,
        permit_port_forwarding: true,
        permit_agent_forwarding: true,
    }
}

fn issuance(c: &mut Criterion) {
    let ca = CertAuthority::generate(CaKind::User, "bench.jaunt.local", unix_now()).unwrap();
    let keys = LocalKeys::generate().unwrap();
    let spki = spki_pem_to_der(&keys.tls_public_pem).unwrap();
    let id = identity();
    let mut g = c.benchmark_group("certs");
    g.throughput(Throughput::Elements(1));
    g.bench_function("issue_x509_and_ssh_pair", |b| {
        b.iter(|| {
            let x509 = ca.sign_x509(&id, &spki, &[]).unwrap();
            let ssh = ca.sign_ssh(&id, keys.ssh_key.public_key()).unwrap();
            (x509, ssh)
        })
    });
    g.bench_function("issue_x509_only", |b| {
        b.iter(|| ca.sign_x509(&id, &spki, &[]).unwrap())
    });
    g.bench_function("issue_ssh_only", |b| {
        b.iter(|| ca.sign_ssh(&id, keys.ssh_key.public_key()).unwrap())
    });
    let der = ca.sign_x509(&id, &spki, &[]).unwrap();
    g.bench_function("identity_from_x509_der", |b| {
        b.iter(|| Identity::from_x509_der(std::hint::black_box(&der)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, issuance);
criterion_main!(benches);
