//! Role evaluation on the control side: what goes into a user's certificate at login (logins,
//! database users and names with traits expanded, permissions, TTL) and whether a role's rules
//! allow an admin verb on a resource kind. Deny wins; nothing is allowed unless a role allows it.
//!
//! The per-connection authorization function (labels, regexes, locks) that engine and agent call
//! is the authorization issue's and will live beside this one.

use std::collections::BTreeSet;

use jaunt_config::identity::{Identity, IdentityKind};
use jaunt_config::resource::{Role, User};

/// The shortest of `requested` and every role's `max_session_ttl`.
pub fn cap_ttl(roles: &[Role], requested: u64) -> u64 {
    roles
        .iter()
        .filter_map(|r| r.spec.options.max_session_ttl.as_ref().map(|d| d.as_secs()))
        .fold(requested, u64::min)
        .max(60)
}

/// Expands `{{internal.NAME}}` and `{{external.NAME}}` from the user's traits; a literal stays as
/// it is; a trait the user does not have expands to nothing.
pub fn expand(value: &str, user: &User) -> Vec<String> {
    let v = value.trim();
    let Some(inner) = v.strip_prefix("{{").and_then(|s| s.strip_suffix("}}")) else {
        return vec![v.to_string()];
    };
    let inner = inner.trim();
    let name = inner
        .strip_prefix("internal.")
        .or_else(|| inner.strip_prefix("external."));
    match name.and_then(|n| user.spec.traits.get(n)) {
        Some(values) => values.iter().filter(|s| !s.is_empty()).cloned().collect(),
        None => Vec::new(),
    }
}

/// What the certificate carries for one principal field (`logins`, `db_users` or `db_names`):
/// every value some role allows, traits expanded, minus every value some role denies. A deny
/// of `*` empties the field. `*` written in an allow list is kept as `*` when `keep_wildcard`
/// (database users and names: the agent reads `*` in the certificate as "any", and the
/// per-connection authorization still applies each role's deny); for logins it is dropped,
/// because an SSH certificate's principals are matched literally by OpenSSH. A `*` that comes
/// out of a trait is data, never a wildcard (as in `jaunt_config::rbac`), and is dropped; a
/// `*` written in a deny list empties the field.
fn collect(
    roles: &[Role],
    user: &User,
    keep_wildcard: bool,
    pick: impl Fn(&Role) -> (&Vec<String>, &Vec<String>),
) -> Vec<String> {
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    let mut wildcard = false;
    for role in roles {
        let (allow, deny) = pick(role);
        for value in allow {
            if value.trim() == "*" {
                wildcard = true;
            } else {
                allowed.extend(expand(value, user));
            }
        }
        for value in deny {
            if value.trim() == "*" {
                return Vec::new();
            }
            denied.extend(expand(value, user));
        }
    }
    let mut out: Vec<String> = allowed
        .into_iter()
        .filter(|v| v != "*" && !denied.contains(v))
        .collect();
    if wildcard && keep_wildcard {
        out.insert(0, "*".to_string());
    }
    out
}

/// The identity a login issues for `user` holding `roles`.
pub fn user_identity(
    user: &User,
    roles: &[Role],
    cluster: &str,
    now: u64,
    ttl_secs: u64,
) -> Identity {
    // A permission holds if some role grants it and no role explicitly refuses it.
    let any = |f: &dyn Fn(&Role) -> Option<bool>| {
        roles.iter().any(|r| f(r) == Some(true)) && !roles.iter().any(|r| f(r) == Some(false))
    };
    Identity {
        kind: IdentityKind::User,
        name: user.metadata.name.clone(),
        roles: user.spec.roles.clone(),
        logins: collect(roles, user, false, |r| {
            (&r.spec.allow.logins, &r.spec.deny.logins)
        }),
        db_users: collect(roles, user, true, |r| {
            (&r.spec.allow.db_users, &r.spec.deny.db_users)
        }),
        db_names: collect(roles, user, true, |r| {
            (&r.spec.allow.db_names, &r.spec.deny.db_names)
        }),
        traits: user.spec.traits.clone(),
        cluster: cluster.to_string(),
        not_before: now.saturating_sub(60),
        expires: now + ttl_secs,
        permit_pty: any(&|r| r.spec.options.permit_pty),
        permit_port_forwarding: any(&|r| r.spec.options.permit_port_forwarding),
        permit_agent_forwarding: any(&|r| r.spec.options.permit_agent_forwarding),
    }
}

/// True if some role's `allow.rules` grant `verb` on `resource` and no role's `deny.rules` do.
pub fn allows_rule(roles: &[Role], resource: &str, verb: &str) -> bool {
    let matches = |rules: &[jaunt_config::resource::Rule]| {
        rules.iter().any(|rule| {
            rule.resources.iter().any(|r| r == "*" || r == resource)
                && rule.verbs.iter().any(|v| v == "*" || v == verb)
        })
    };
    !roles.iter().any(|r| matches(&r.spec.deny.rules))
        && roles.iter().any(|r| matches(&r.spec.allow.rules))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use jaunt_config::resource::{parse_resources, Resource};

    use super::*;

    fn parse(text: &str) -> (User, Vec<Role>) {
        let mut user = None;
        let mut roles = Vec::new();
        for resource in parse_resources("t.yaml", text).unwrap() {
            match resource {
                Resource::User(u) => user = Some(u),
                Resource::Role(r) => roles.push(r),
                other => panic!("unexpected {other:?}"),
            }
        }
        (user.unwrap(), roles)
    }

    fn issued(text: &str) -> Identity {
        let (user, roles) = parse(text);
        user_identity(&user, &roles, "c", 1_000, 3_600)
    }

    const USER: &str = "kind: user\nversion: v1\nmetadata: { name: alice }\nspec:\n  roles: [r]\n  traits:\n    logins: [alice]\n    db_users: [alice, '*']\n    team: [ops]\n";

    /// Issue 15 pt 3: `'*'` in `db_users`/`db_names` granted nothing at issuance, although the
    /// agent reads `*` in the certificate as "any".
    #[test]
    fn a_written_wildcard_reaches_the_certificate_for_db_users_and_names() {
        let id = issued(&format!(
            "{USER}---\nkind: role\nversion: v1\nmetadata: {{ name: r }}\nspec:\n  allow:\n    logins: ['*', root]\n    db_users: ['*', '{{{{internal.db_users}}}}']\n    db_names: ['*']\n"
        ));
        assert_eq!(
            id.db_users,
            vec!["*", "alice"],
            "a trait's * is data, dropped"
        );
        assert_eq!(id.db_names, vec!["*"]);
        assert_eq!(id.logins, vec!["root"], "no * among SSH principals");
    }

    #[test]
    fn deny_wins_at_issuance() {
        let id = issued(&format!(
            "{USER}---\nkind: role\nversion: v1\nmetadata: {{ name: r }}\nspec:\n  allow:\n    logins: ['{{{{internal.logins}}}}', root, '{{{{external.team}}}}']\n    db_users: ['*', bob]\n    db_names: ['*']\n  deny:\n    logins: [root]\n    db_users: [bob]\n    db_names: ['*']\n"
        ));
        assert_eq!(id.logins, vec!["alice", "ops"]);
        assert_eq!(
            id.db_users,
            vec!["*"],
            "bob denied; the * stays (authorize denies bob)"
        );
        assert!(id.db_names.is_empty(), "a denied * empties the field");
    }

    /// `permit_pty`, `permit_agent_forwarding`, `permit_port_forwarding`: some role says true
    /// and none says false; `max_session_ttl`: the shortest.
    #[test]
    fn permissions_need_one_yes_and_no_no() {
        let id = issued(&format!(
            "{USER}---\nkind: role\nversion: v1\nmetadata: {{ name: r }}\nspec:\n  options: {{ permit_pty: true, permit_agent_forwarding: true, permit_port_forwarding: true }}\n\
             ---\nkind: role\nversion: v1\nmetadata: {{ name: s }}\nspec:\n  options: {{ permit_agent_forwarding: false }}\n"
        ));
        assert!(id.permit_pty && id.permit_port_forwarding);
        assert!(!id.permit_agent_forwarding, "one false wins");
        let (_, roles) = parse(&format!(
            "{USER}---\nkind: role\nversion: v1\nmetadata: {{ name: r }}\nspec:\n  options: {{ max_session_ttl: 1h }}\n\
             ---\nkind: role\nversion: v1\nmetadata: {{ name: s }}\nspec:\n  options: {{ max_session_ttl: 10m }}\n"
        ));
        assert_eq!(cap_ttl(&roles, 43_200), 600);
        assert_eq!(cap_ttl(&roles, 5), 60, "at least a minute");
    }
}
