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

fn collect(
    roles: &[Role],
    user: &User,
    pick: impl Fn(&Role) -> (&Vec<String>, &Vec<String>),
) -> Vec<String> {
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for role in roles {
        let (allow, deny) = pick(role);
        allowed.extend(allow.iter().flat_map(|v| expand(v, user)));
        denied.extend(deny.iter().flat_map(|v| expand(v, user)));
    }
    if denied.contains("*") {
        return Vec::new();
    }
    allowed
        .into_iter()
        .filter(|v| v != "*" && !denied.contains(v))
        .collect()
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
        logins: collect(roles, user, |r| (&r.spec.allow.logins, &r.spec.deny.logins)),
        db_users: collect(roles, user, |r| {
            (&r.spec.allow.db_users, &r.spec.deny.db_users)
        }),
        db_names: collect(roles, user, |r| {
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
