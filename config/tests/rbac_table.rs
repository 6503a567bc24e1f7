//! [`jaunt_config::rbac::authorize`] as a table: one catalog of roles written in YAML, the way
//! operators write them, and one row per case (the identity's roles and traits, the resource,
//! the request, the locks, the time) with the expected decision. Refusals also list substrings
//! their message must contain, so that a message keeps naming the resource and the rule.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use jaunt_config::identity::{Identity, IdentityKind};
use jaunt_config::rbac::{
    authorize, lock_matches, ActiveLock, Decision, DeniedKind, Policy, Request, Resource,
    ResourceKind,
};
use jaunt_config::resource::{self, LockTarget, RecordSession, Role};

const CATALOG: &str = r#"
kind: role
version: v1
metadata: {name: exact}
spec:
  allow:
    logins: [ubuntu]
    node_labels: {env: staging}
---
kind: role
version: v1
metadata: {name: wildcard}
spec:
  allow:
    logins: ['{{internal.logins}}']
    node_labels: {'*': '*'}
    app_labels: {'*': '*'}
---
kind: role
version: v1
metadata: {name: regex}
spec:
  allow:
    logins: [deploy]
    node_labels: {env: '^(dev|staging)-[0-9]+$'}
---
kind: role
version: v1
metadata: {name: multi}
spec:
  allow:
    logins: [web]
    node_labels: {env: [prod, staging], team: web}
---
kind: role
version: v1
metadata: {name: anyvalue}
spec:
  allow:
    logins: [ops]
    node_labels: {team: '*'}
---
kind: role
version: v1
metadata: {name: empty}
spec:
  allow:
    logins: [root]
---
kind: role
version: v1
metadata: {name: root-everywhere}
spec:
  allow:
    logins: [root]
    node_labels: {'*': '*'}
---
kind: role
version: v1
metadata: {name: deny-prod}
spec:
  deny:
    node_labels: {env: prod}
---
kind: role
version: v1
metadata: {name: deny-root}
spec:
  deny:
    logins: [root]
---
kind: role
version: v1
metadata: {name: deny-traits}
spec:
  deny:
    logins: ['{{external.forbidden}}']
---
kind: role
version: v1
metadata: {name: labels-only}
spec:
  allow:
    node_labels: {env: prod}
---
kind: role
version: v1
metadata: {name: login-only}
spec:
  allow:
    logins: [postgres-admin]
    node_labels: {env: dev}
---
kind: role
version: v1
metadata: {name: int-traits}
spec:
  allow:
    logins: ['{{internal.logins}}']
    node_labels: {env: dev}
---
kind: role
version: v1
metadata: {name: ext-traits}
spec:
  allow:
    logins: ['{{external.unix_groups}}']
    node_labels: {'*': '*'}
---
kind: role
version: v1
metadata: {name: db-access}
spec:
  allow:
    db_labels: {engine: postgres}
    db_users: ['{{internal.db_users}}', readonly]
    db_names: [app, '{{external.db_extra}}']
---
kind: role
version: v1
metadata: {name: db-any}
spec:
  allow:
    db_labels: {'*': '*'}
    db_users: ['*']
    db_names: ['*']
---
kind: role
version: v1
metadata: {name: db-deny-admin}
spec:
  deny:
    db_users: [admin]
---
kind: role
version: v1
metadata: {name: db-deny-name}
spec:
  deny:
    db_names: [secrets]
---
kind: role
version: v1
metadata: {name: apps}
spec:
  allow:
    app_labels: {tier: frontend}
---
kind: role
version: v1
metadata: {name: apps-deny}
spec:
  deny:
    app_labels: {tier: internal}
---
kind: role
version: v1
metadata: {name: opts-a}
spec:
  options:
    client_idle_timeout: 30m
    permit_port_forwarding: true
---
kind: role
version: v1
metadata: {name: opts-b}
spec:
  options:
    client_idle_timeout: 10m
    disconnect_expired_cert: true
---
kind: role
version: v1
metadata: {name: opts-no-pf}
spec:
  options:
    permit_port_forwarding: false
"#;

/// Certificate window of every case's identity.
const NOT_BEFORE: u64 = 1_000;
const EXPIRES: u64 = 2_000;

type Pairs = &'static [(&'static str, &'static str)];
type Traits = &'static [(&'static str, &'static [&'static str])];

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    roles: &'static [&'static str],
    traits: Traits,
    kind: ResourceKind,
    resource: &'static str,
    labels: Pairs,
    login: Option<&'static str>,
    db_user: Option<&'static str>,
    db_name: Option<&'static str>,
    locks: &'static [(Lock, Option<u64>)],
    now: u64,
    expect: Expect,
}

#[derive(Clone, Copy, Debug)]
enum Lock {
    User(&'static str),
    Role(&'static str),
    Node(&'static str),
    Login(&'static str),
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Allowed, options not checked.
    Allow,
    /// Allowed with these options.
    AllowWith {
        idle_secs: Option<u64>,
        disconnect: bool,
        port_forwarding: bool,
    },
    /// Refused for this reason, with a message containing every substring.
    Deny(Why, &'static [&'static str]),
}

#[derive(Clone, Copy, Debug)]
enum Why {
    NoRole,
    DeniedByRole(&'static str),
    NotAllowed,
    /// The index of the lock in the case's `locks`.
    Locked(usize),
    Expired,
    NotYetValid,
}

const BASE: Case = Case {
    name: "",
    roles: &[],
    traits: &[],
    kind: Node,
    resource: "web1",
    labels: &[],
    login: None,
    db_user: None,
    db_name: None,
    locks: &[],
    now: 1_500,
    expect: Expect::Allow,
};

use Expect::{Allow, AllowWith, Deny};
use ResourceKind::{App, Db, Node, Tcp};

#[rustfmt::skip]
const CASES: &[Case] = &[
    // ---- labels ----
    Case { name: "exact label allows", roles: &["exact"], labels: &[("env", "staging")], login: Some("ubuntu"), ..BASE },
    Case { name: "exact label mismatch", roles: &["exact"], labels: &[("env", "prod")], login: Some("ubuntu"),
        expect: Deny(Why::NotAllowed, &[
            "access denied to node web1 as ubuntu: no role allows login ubuntu on node web1 (labels env=prod); roles: exact",
        ]), ..BASE },
    Case { name: "wildcard selector allows a node without labels", roles: &["wildcard"], login: Some("alice"), ..BASE },
    Case { name: "regex matches", roles: &["regex"], labels: &[("env", "dev-12")], login: Some("deploy"), ..BASE },
    Case { name: "regex alternation", roles: &["regex"], labels: &[("env", "staging-3")], login: Some("deploy"), ..BASE },
    Case { name: "regex is anchored at the end", roles: &["regex"], labels: &[("env", "dev-12x")], login: Some("deploy"),
        expect: Deny(Why::NotAllowed, &["(labels env=dev-12x)"]), ..BASE },
    Case { name: "regex is anchored at the start", roles: &["regex"], labels: &[("env", "xdev-12")], login: Some("deploy"),
        expect: Deny(Why::NotAllowed, &["no role allows login deploy"]), ..BASE },
    Case { name: "multi-value: first value", roles: &["multi"], labels: &[("env", "prod"), ("team", "web")], login: Some("web"), ..BASE },
    Case { name: "multi-value: second value", roles: &["multi"], labels: &[("env", "staging"), ("team", "web"), ("extra", "x")], login: Some("web"), ..BASE },
    Case { name: "multi-value: other value", roles: &["multi"], labels: &[("env", "qa"), ("team", "web")], login: Some("web"),
        expect: Deny(Why::NotAllowed, &["(labels env=qa, team=web)"]), ..BASE },
    Case { name: "missing key", roles: &["multi"], labels: &[("env", "prod")], login: Some("web"),
        expect: Deny(Why::NotAllowed, &["(labels env=prod)"]), ..BASE },
    Case { name: "value * needs the key: present", roles: &["anyvalue"], labels: &[("team", "anything")], login: Some("ops"), ..BASE },
    Case { name: "value * needs the key: absent", roles: &["anyvalue"], labels: &[("env", "prod")], login: Some("ops"),
        expect: Deny(Why::NotAllowed, &["no role allows login ops on node web1"]), ..BASE },
    Case { name: "empty selector matches nothing", roles: &["empty"], labels: &[("env", "prod")], login: Some("root"),
        expect: Deny(Why::NotAllowed, &["roles: empty"]), ..BASE },
    Case { name: "no labels on the node", roles: &["exact"], login: Some("ubuntu"),
        expect: Deny(Why::NotAllowed, &["(labels none)"]), ..BASE },

    // ---- deny ----
    Case { name: "deny by label wins over allow", roles: &["wildcard", "deny-prod"], labels: &[("env", "prod")], login: Some("alice"),
        expect: Deny(Why::DeniedByRole("deny-prod"), &[
            "access denied to node web1 as alice: role deny-prod denies node_labels env=prod",
        ]), ..BASE },
    Case { name: "deny by label, role order does not matter", roles: &["deny-prod", "wildcard"], labels: &[("env", "prod")], login: Some("alice"),
        expect: Deny(Why::DeniedByRole("deny-prod"), &["role deny-prod denies"]), ..BASE },
    Case { name: "deny by label leaves other nodes", roles: &["wildcard", "deny-prod"], labels: &[("env", "dev")], login: Some("alice"), ..BASE },
    Case { name: "deny by login", roles: &["root-everywhere", "deny-root"], login: Some("root"),
        expect: Deny(Why::DeniedByRole("deny-root"), &["access denied to node web1 as root: role deny-root denies logins [root]"]), ..BASE },
    Case { name: "deny by login leaves other logins", roles: &["root-everywhere", "wildcard", "deny-root"], login: Some("alice"), ..BASE },
    Case { name: "deny login does not touch apps", roles: &["wildcard", "deny-root"], kind: App, resource: "grafana", login: Some("root"), ..BASE },

    // ---- per role ----
    Case { name: "labels from one role, login from another: denied", roles: &["labels-only", "login-only"], labels: &[("env", "prod")], login: Some("postgres-admin"),
        expect: Deny(Why::NotAllowed, &["no role allows login postgres-admin on node web1 (labels env=prod); roles: labels-only, login-only"]), ..BASE },
    Case { name: "one role grants both", roles: &["labels-only", "root-everywhere"], labels: &[("env", "prod")], login: Some("root"), ..BASE },

    // ---- traits ----
    Case { name: "internal trait from traits", roles: &["int-traits"], traits: &[("logins", &["deployer"])], labels: &[("env", "dev")], login: Some("deployer"), ..BASE },
    Case { name: "internal trait replaces certificate logins", roles: &["int-traits"], traits: &[("logins", &["deployer"])], labels: &[("env", "dev")], login: Some("alice"),
        expect: Deny(Why::NotAllowed, &["no role allows login alice"]), ..BASE },
    Case { name: "internal trait falls back to certificate logins", roles: &["int-traits"], labels: &[("env", "dev")], login: Some("ubuntu"), ..BASE },
    Case { name: "external trait", roles: &["ext-traits"], traits: &[("unix_groups", &["wheel", "adm"])], login: Some("adm"), ..BASE },
    Case { name: "external trait missing", roles: &["ext-traits"], login: Some("wheel"),
        expect: Deny(Why::NotAllowed, &["no role allows login wheel"]), ..BASE },
    Case { name: "external trait never falls back", roles: &["ext-traits"], login: Some("alice"),
        expect: Deny(Why::NotAllowed, &["roles: ext-traits"]), ..BASE },
    Case { name: "deny through a trait", roles: &["root-everywhere", "deny-traits"], traits: &[("forbidden", &["root"])], login: Some("root"),
        expect: Deny(Why::DeniedByRole("deny-traits"), &["role deny-traits denies logins [{{external.forbidden}}]"]), ..BASE },
    Case { name: "deny trait missing denies nothing", roles: &["root-everywhere", "deny-traits"], login: Some("root"), ..BASE },
    Case { name: "ssh needs a login", roles: &["root-everywhere"],
        expect: Deny(Why::NotAllowed, &["access denied to node web1: an SSH login is required"]), ..BASE },

    // ---- databases ----
    Case { name: "db user from certificate, db name literal", roles: &["db-access"], kind: Db, resource: "pg1", labels: &[("engine", "postgres")],
        db_user: Some("alice"), db_name: Some("app"), ..BASE },
    Case { name: "db literal user, no db name", roles: &["db-access"], kind: Db, resource: "pg1", labels: &[("engine", "postgres")],
        db_user: Some("readonly"), ..BASE },
    Case { name: "db user not allowed", roles: &["db-access"], kind: Db, resource: "pg1", labels: &[("engine", "postgres")],
        db_user: Some("bob"), db_name: Some("app"),
        expect: Deny(Why::NotAllowed, &["access denied to db pg1 as bob (database app): no role allows db user bob and db name app on db pg1 (labels engine=postgres)"]), ..BASE },
    Case { name: "db name not allowed", roles: &["db-access"], kind: Db, resource: "pg1", labels: &[("engine", "postgres")],
        db_user: Some("alice"), db_name: Some("billing"),
        expect: Deny(Why::NotAllowed, &["db name billing"]), ..BASE },
    Case { name: "db name from external trait", roles: &["db-access"], traits: &[("db_extra", &["billing"])], kind: Db, resource: "pg1",
        labels: &[("engine", "postgres")], db_user: Some("alice"), db_name: Some("billing"), ..BASE },
    Case { name: "db labels mismatch", roles: &["db-access"], kind: Db, resource: "my1", labels: &[("engine", "mysql")], db_user: Some("alice"),
        expect: Deny(Why::NotAllowed, &["no role allows db user alice on db my1 (labels engine=mysql)"]), ..BASE },
    Case { name: "db deny user", roles: &["db-any", "db-deny-admin"], kind: Db, resource: "pg1", db_user: Some("admin"),
        expect: Deny(Why::DeniedByRole("db-deny-admin"), &["access denied to db pg1 as admin: role db-deny-admin denies db_users [admin]"]), ..BASE },
    Case { name: "db deny name", roles: &["db-any", "db-deny-name"], kind: Db, resource: "pg1", db_user: Some("alice"), db_name: Some("secrets"),
        expect: Deny(Why::DeniedByRole("db-deny-name"), &["role db-deny-name denies db_names [secrets]"]), ..BASE },
    Case { name: "db deny name, other name allowed", roles: &["db-any", "db-deny-name"], kind: Db, resource: "pg1", db_user: Some("alice"), db_name: Some("app"), ..BASE },
    Case { name: "db needs a user", roles: &["db-any"], kind: Db, resource: "pg1", db_name: Some("app"),
        expect: Deny(Why::NotAllowed, &["a database user is required"]), ..BASE },
    Case { name: "node labels grant no database", roles: &["root-everywhere"], kind: Db, resource: "pg1", db_user: Some("root"),
        expect: Deny(Why::NotAllowed, &["roles: root-everywhere"]), ..BASE },
    Case { name: "db ignores the ssh login", roles: &["db-any", "deny-root"], kind: Db, resource: "pg1", login: Some("root"), db_user: Some("alice"), ..BASE },

    // ---- apps ----
    Case { name: "app allowed by app labels", roles: &["apps"], kind: App, resource: "grafana", labels: &[("tier", "frontend")], ..BASE },
    Case { name: "app refused", roles: &["apps"], kind: App, resource: "vault", labels: &[("tier", "backend")],
        expect: Deny(Why::NotAllowed, &["access denied to app vault: no role allows access to app vault (labels tier=backend); roles: apps"]), ..BASE },
    Case { name: "app deny by label", roles: &["wildcard", "apps-deny"], kind: App, resource: "admin", labels: &[("tier", "internal")],
        expect: Deny(Why::DeniedByRole("apps-deny"), &["role apps-deny denies app_labels tier=internal"]), ..BASE },
    Case { name: "tcp app uses app labels", roles: &["apps"], kind: Tcp, resource: "redis", labels: &[("tier", "frontend")], ..BASE },
    Case { name: "tcp app not granted by node labels", roles: &["exact"], kind: Tcp, resource: "redis", labels: &[("env", "staging")],
        expect: Deny(Why::NotAllowed, &["access denied to tcp app redis"]), ..BASE },

    // ---- options ----
    Case { name: "options: shortest idle, any disconnect, forwarding", roles: &["wildcard", "opts-a", "opts-b"], login: Some("alice"),
        expect: AllowWith { idle_secs: Some(600), disconnect: true, port_forwarding: true }, ..BASE },
    Case { name: "options: one false forbids forwarding", roles: &["wildcard", "opts-a", "opts-no-pf"], login: Some("alice"),
        expect: AllowWith { idle_secs: Some(1800), disconnect: false, port_forwarding: false }, ..BASE },
    Case { name: "options: nothing set", roles: &["wildcard"], login: Some("alice"),
        expect: AllowWith { idle_secs: None, disconnect: false, port_forwarding: false }, ..BASE },
    Case { name: "options: non-matching roles count too", roles: &["apps", "wildcard", "opts-b"], login: Some("alice"),
        expect: AllowWith { idle_secs: Some(600), disconnect: true, port_forwarding: false }, ..BASE },

    // ---- role lookup ----
    Case { name: "only unknown roles", roles: &["ghost"], login: Some("alice"),
        expect: Deny(Why::NoRole, &["access denied to node web1 as alice: none of the certificate's roles exists (ghost)"]), ..BASE },
    Case { name: "no roles at all", login: Some("alice"),
        expect: Deny(Why::NoRole, &["the certificate carries no roles"]), ..BASE },
    Case { name: "unknown role ignored", roles: &["ghost", "wildcard"], login: Some("alice"), ..BASE },
    Case { name: "unknown role marked in the message", roles: &["ghost", "exact"], login: Some("alice"),
        expect: Deny(Why::NotAllowed, &["roles: ghost (unknown), exact"]), ..BASE },

    // ---- certificate validity ----
    Case { name: "expired at the instant", roles: &["wildcard"], login: Some("alice"), now: EXPIRES,
        expect: Deny(Why::Expired, &["access denied to node web1 as alice: certificate expired at 2000"]), ..BASE },
    Case { name: "last valid second", roles: &["wildcard"], login: Some("alice"), now: EXPIRES - 1, ..BASE },
    Case { name: "not yet valid", roles: &["wildcard"], login: Some("alice"), now: NOT_BEFORE - 1,
        expect: Deny(Why::NotYetValid, &["not valid until 1000"]), ..BASE },
    Case { name: "first valid second", roles: &["wildcard"], login: Some("alice"), now: NOT_BEFORE, ..BASE },

    // ---- locks ----
    Case { name: "user lock", roles: &["wildcard"], login: Some("alice"), locks: &[(Lock::User("alice"), None)],
        expect: Deny(Why::Locked(0), &["access denied to node web1 as alice: locked by lock lock-0 (user=alice): maintenance"]), ..BASE },
    Case { name: "other user's lock", roles: &["wildcard"], login: Some("alice"), locks: &[(Lock::User("bob"), None)], ..BASE },
    Case { name: "role lock", roles: &["apps", "wildcard"], login: Some("alice"), locks: &[(Lock::User("bob"), None), (Lock::Role("wildcard"), None)],
        expect: Deny(Why::Locked(1), &["(role=wildcard)"]), ..BASE },
    Case { name: "role lock on an unknown role still holds", roles: &["ghost", "wildcard"], login: Some("alice"), locks: &[(Lock::Role("ghost"), None)],
        expect: Deny(Why::Locked(0), &["locked by lock lock-0"]), ..BASE },
    Case { name: "node lock", roles: &["wildcard"], login: Some("alice"), locks: &[(Lock::Node("web1"), None)],
        expect: Deny(Why::Locked(0), &["(node=web1)"]), ..BASE },
    Case { name: "node lock elsewhere", roles: &["wildcard"], login: Some("alice"), locks: &[(Lock::Node("web2"), None)], ..BASE },
    Case { name: "node lock does not lock a db of that name", roles: &["db-any"], kind: Db, resource: "web1", db_user: Some("alice"),
        locks: &[(Lock::Node("web1"), None)], ..BASE },
    Case { name: "login lock", roles: &["root-everywhere"], login: Some("root"), locks: &[(Lock::Login("root"), None)],
        expect: Deny(Why::Locked(0), &["(login=root)"]), ..BASE },
    Case { name: "login lock, other login", roles: &["wildcard"], login: Some("alice"), locks: &[(Lock::Login("root"), None)], ..BASE },
    Case { name: "expired lock ignored", roles: &["wildcard"], login: Some("alice"), locks: &[(Lock::User("alice"), Some(1_500))], ..BASE },
    Case { name: "lock until later holds", roles: &["wildcard"], login: Some("alice"), locks: &[(Lock::User("alice"), Some(1_501))],
        expect: Deny(Why::Locked(0), &["maintenance"]), ..BASE },
    Case { name: "lock beats allow and deny alike", roles: &["wildcard", "deny-prod"], labels: &[("env", "prod")], login: Some("alice"),
        locks: &[(Lock::Login("alice"), None)],
        expect: Deny(Why::Locked(0), &["(login=alice)"]), ..BASE },
];

fn catalog() -> Policy {
    let roles: Vec<Role> = resource::parse_resources("catalog.yaml", CATALOG)
        .unwrap()
        .into_iter()
        .map(|doc| match doc {
            resource::Resource::Role(role) => role,
            other => panic!("catalog holds a {}", other.kind()),
        })
        .collect();
    Policy::compile(&roles).unwrap()
}

fn identity(case: &Case) -> Identity {
    Identity {
        kind: IdentityKind::User,
        name: "alice".into(),
        roles: case.roles.iter().map(|r| r.to_string()).collect(),
        logins: vec!["alice".into(), "ubuntu".into()],
        db_users: vec!["alice".into()],
        db_names: vec!["app".into()],
        traits: case
            .traits
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect(),
        cluster: "test.local".into(),
        not_before: NOT_BEFORE,
        expires: EXPIRES,
        permit_pty: true,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
    }
}

fn locks(case: &Case) -> Vec<ActiveLock> {
    case.locks
        .iter()
        .enumerate()
        .map(|(index, (lock, expires))| ActiveLock {
            name: format!("lock-{index}"),
            target: match *lock {
                Lock::User(v) => LockTarget::User(v.into()),
                Lock::Role(v) => LockTarget::Role(v.into()),
                Lock::Node(v) => LockTarget::Node(v.into()),
                Lock::Login(v) => LockTarget::Login(v.into()),
            },
            message: "maintenance".into(),
            expires: *expires,
        })
        .collect()
}

/// What is wrong with `case`'s outcome, if anything.
fn check(policy: &Policy, case: &Case) -> Option<String> {
    let identity = identity(case);
    let labels: BTreeMap<String, String> = case
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let resource = Resource {
        kind: case.kind,
        name: case.resource,
        labels: &labels,
    };
    let request = Request {
        login: case.login,
        db_user: case.db_user,
        db_name: case.db_name,
    };
    let locks = locks(case);
    let outcome = authorize(policy, &identity, &resource, &request, &locks, case.now);
    match (case.expect, &outcome) {
        (Allow, Ok(_)) => None,
        (
            AllowWith {
                idle_secs,
                disconnect,
                port_forwarding,
            },
            Ok(decision),
        ) => {
            let want = Decision {
                idle_timeout: idle_secs.map(Duration::from_secs),
                disconnect_expired_cert: disconnect,
                expires: EXPIRES,
                permit_port_forwarding: port_forwarding,
                permit_agent_forwarding: false,
                // No role of the table sets the recording options.
                record_session: RecordSession::Off,
                record_input: false,
            };
            (*decision != want).then(|| format!("decision {decision:?}, expected {want:?}"))
        }
        (Deny(why, substrings), Err(denied)) => {
            let kind = match why {
                Why::NoRole => DeniedKind::NoRole,
                Why::DeniedByRole(role) => DeniedKind::DeniedByRole { role: role.into() },
                Why::NotAllowed => DeniedKind::NotAllowed,
                Why::Locked(index) => {
                    if !lock_matches(&locks[index], &identity, &resource, &request, case.now) {
                        return Some(format!("lock_matches is false for lock {index}"));
                    }
                    DeniedKind::Locked {
                        lock: format!("lock-{index}"),
                    }
                }
                Why::Expired => DeniedKind::Expired,
                Why::NotYetValid => DeniedKind::NotYetValid,
            };
            if denied.kind != kind {
                return Some(format!(
                    "refused as {:?}, expected {kind:?}: {denied}",
                    denied.kind
                ));
            }
            let missing: Vec<&&str> = substrings
                .iter()
                .filter(|s| !denied.message.contains(**s))
                .collect();
            (!missing.is_empty()).then(|| format!("message {:?} lacks {missing:?}", denied.message))
        }
        (expect, outcome) => Some(format!("got {outcome:?}, expected {expect:?}")),
    }
}

#[test]
fn authorization_table() {
    assert!(CASES.len() >= 40, "{} cases", CASES.len());
    let policy = catalog();
    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|case| check(&policy, case).map(|why| format!("{}: {why}", case.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn case_names_are_unique() {
    let mut names: Vec<&str> = CASES.iter().map(|case| case.name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len());
}

/// A lock that is not in force is never reported by [`lock_matches`], so live sessions are
/// closed only by locks that would refuse them anew.
#[test]
fn lock_matches_agrees_with_authorize() {
    let policy = catalog();
    for case in CASES.iter().filter(|case| !case.locks.is_empty()) {
        let identity = identity(case);
        let labels: BTreeMap<String, String> = case
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let resource = Resource {
            kind: case.kind,
            name: case.resource,
            labels: &labels,
        };
        let request = Request {
            login: case.login,
            db_user: case.db_user,
            db_name: case.db_name,
        };
        let locks = locks(case);
        let any = locks
            .iter()
            .any(|lock| lock_matches(lock, &identity, &resource, &request, case.now));
        let locked = matches!(
            authorize(&policy, &identity, &resource, &request, &locks, case.now),
            Err(ref denied) if matches!(denied.kind, DeniedKind::Locked { .. })
        );
        assert_eq!(any, locked, "{}", case.name);
    }
}
