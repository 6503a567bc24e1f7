//! Authorization benchmark: [`jaunt_config::rbac::authorize`], the decision the engine makes
//! before it opens every stream and the agent makes again before it serves one.
//!
//! The identity holds three roles of realistic size out of a policy of 23: the built-in `access`
//! (wildcard labels, trait logins), `dev` (regex and multi-value selectors on nodes, databases
//! and apps, trait principals) and `prod-guard` (regex deny selector, denied logins and database
//! users, options). The node carries six labels and the snapshot eight locks, none of which
//! matches on the allow paths. Allow paths allocate nothing; refusals format their message.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use jaunt_config::identity::{Identity, IdentityKind};
use jaunt_config::rbac::{authorize, ActiveLock, Policy, Request, Resource, ResourceKind};
use jaunt_config::resource::{parse_resources, LockTarget, Resource as Doc, Role};

const ROLES: &str = r#"
kind: role
version: v1
metadata: {name: dev}
spec:
  options:
    client_idle_timeout: 30m
    permit_port_forwarding: true
  allow:
    logins: [deploy, '{{external.unix_users}}', '{{internal.logins}}']
    node_labels:
      env: ['^(dev|staging)(-[0-9]+)?$', qa]
      team: [web, api, '^platform-[a-z]+$']
      region: '*'
    app_labels:
      tier: [frontend, '^internal-(tools|docs)$']
    db_labels:
      engine: [postgres, '^mysql-8\.[0-9]+$']
      env: '^(dev|staging)$'
    db_users: [readonly, '{{internal.db_users}}']
    db_names: ['*']
---
kind: role
version: v1
metadata: {name: prod-guard}
spec:
  options:
    client_idle_timeout: 15m
    disconnect_expired_cert: true
  deny:
    logins: [root, '{{external.blocked_logins}}']
    node_labels:
      env: '^prod(-[a-z0-9]+)?$'
    db_users: [postgres, admin]
    db_names: [secrets]
"#;

fn policy() -> Policy {
    let mut roles: Vec<Role> = parse_resources("bench.yaml", ROLES)
        .unwrap()
        .into_iter()
        .map(|doc| match doc {
            Doc::Role(role) => role,
            other => panic!("not a role: {}", other.kind()),
        })
        .collect();
    roles.push(Role::builtin_access());
    roles.push(Role::builtin_editor());
    // Other teams' roles: in the policy, not held by this identity.
    let template = roles[0].clone();
    for index in 0..20 {
        let mut other = template.clone();
        other.metadata.name = format!("team-{index}");
        roles.push(other);
    }
    Policy::compile(&roles).unwrap()
}

fn identity() -> Identity {
    let strings = |values: &[&str]| values.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    Identity {
        kind: IdentityKind::User,
        name: "alice".into(),
        roles: strings(&["access", "dev", "prod-guard"]),
        logins: strings(&["alice", "ubuntu"]),
        db_users: strings(&["alice"]),
        db_names: strings(&["app"]),
        traits: BTreeMap::from([
            ("logins".to_string(), strings(&["alice", "ubuntu"])),
            ("unix_users".to_string(), strings(&["alice-admin"])),
            ("blocked_logins".to_string(), strings(&["backup"])),
            (
                "groups".to_string(),
                strings(&["eng", "platform", "oncall"]),
            ),
        ]),
        cluster: "bench.jaunt.local".into(),
        not_before: 1_000,
        expires: 1_000 + 12 * 3600,
        permit_pty: true,
        permit_port_forwarding: true,
        permit_agent_forwarding: true,
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn locks() -> Vec<ActiveLock> {
    let targets = [
        LockTarget::User("bob".into()),
        LockTarget::User("carol".into()),
        LockTarget::Role("contractors".into()),
        LockTarget::Node("db-legacy-1".into()),
        LockTarget::Node("web-7".into()),
        LockTarget::Login("backup".into()),
        LockTarget::Login("oracle".into()),
        LockTarget::User("alice".into()),
    ];
    targets
        .into_iter()
        .enumerate()
        .map(|(index, target)| ActiveLock {
            name: format!("lock-{index}"),
            target,
            message: "incident 4711".into(),
            // The last one (alice) has lifted already.
            expires: (index == 7).then_some(1_500),
        })
        .collect()
}

fn bench_authorize(c: &mut Criterion) {
    let policy = policy();
    let id = identity();
    let locks = locks();
    let now = 10_000;
    let staging = labels(&[
        ("env", "staging-2"),
        ("team", "platform-core"),
        ("region", "eu-west-1"),
        ("os", "ubuntu-22.04"),
        ("arch", "amd64"),
        ("kernel", "6.1"),
    ]);
    let prod = labels(&[
        ("env", "prod-eu"),
        ("team", "platform-core"),
        ("region", "eu-west-1"),
        ("os", "ubuntu-22.04"),
        ("arch", "amd64"),
        ("kernel", "6.1"),
    ]);
    let pg = labels(&[("engine", "postgres"), ("env", "staging")]);
    let node = |labels| Resource {
        kind: ResourceKind::Node,
        name: "web-3",
        labels,
    };
    let db = Resource {
        kind: ResourceKind::Db,
        name: "pg-staging",
        labels: &pg,
    };

    let mut group = c.benchmark_group("rbac");
    let mut case = |name: &str, resource: &Resource, request: Request, allowed: bool| {
        assert_eq!(
            authorize(&policy, &id, resource, &request, &locks, now).is_ok(),
            allowed,
            "{name}"
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                authorize(
                    black_box(&policy),
                    black_box(&id),
                    black_box(resource),
                    black_box(&request),
                    black_box(&locks),
                    black_box(now),
                )
            })
        });
    };
    // Allowed by `dev` only (literal login, regex labels): every role is evaluated.
    case(
        "allow_ssh_regex_labels",
        &node(&staging),
        Request::ssh("deploy"),
        true,
    );
    // Allowed by `access` (trait login) on the first role; the rest still checked for deny.
    case(
        "allow_ssh_trait_login",
        &node(&staging),
        Request::ssh("ubuntu"),
        true,
    );
    case(
        "allow_db_user_and_name",
        &db,
        Request::db("readonly", Some("app")),
        true,
    );
    case(
        "deny_by_regex_label",
        &node(&prod),
        Request::ssh("ubuntu"),
        false,
    );
    case(
        "deny_by_login",
        &node(&staging),
        Request::ssh("root"),
        false,
    );
    case(
        "not_allowed_scan_all",
        &node(&staging),
        Request::ssh("mallory"),
        false,
    );
    group.finish();

    c.bench_function("rbac/compile_23_roles", |b| {
        let roles: Vec<Role> = parse_resources("bench.yaml", ROLES)
            .unwrap()
            .into_iter()
            .filter_map(|doc| match doc {
                Doc::Role(role) => Some(role),
                _ => None,
            })
            .chain([Role::builtin_access(), Role::builtin_editor()])
            .chain((0..20).map(|index| {
                let mut role = Role::builtin_access();
                role.metadata.name = format!("team-{index}");
                role.spec.allow.node_labels = jaunt_config::resource::Labels(BTreeMap::from([(
                    "env".to_string(),
                    vec!["^(dev|staging)(-[0-9]+)?$".to_string()],
                )]));
                role
            }))
            .collect();
        b.iter(|| Policy::compile(black_box(&roles)).unwrap())
    });
}

criterion_group!(benches, bench_authorize);
criterion_main!(benches);
