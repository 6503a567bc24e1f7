//! PostgreSQL connection strings, as libpq writes them: the URI form
//! (`postgres://user:password@host:port/dbname?sslmode=verify-full`) and the keyword form
//! (`host=db port=5432 user=jaunt password='a b'`). Pure parsing: the result is the keywords the
//! text gave, checked against libpq's names; defaults and the `PG*` environment variables are
//! applied by the client that connects (control's `store/pg.rs`), not here.
//!
//! A [`ConnInfo`] never shows its password: `Debug` and [`ConnInfo::redacted`] print `***`
//! instead, so a config or an error that carries one can be logged.
//!
//! Not here: any I/O, name resolution, TLS.

use std::collections::BTreeMap;
use std::fmt;

/// The keywords accepted (a subset of libpq's, the ones the control's client implements).
pub const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "application_name",
    "passfile",
];

/// libpq's `sslmode` values.
pub const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// The keywords of one connection string, as given (no defaults applied).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ConnInfo {
    pub params: BTreeMap<String, String>,
}

impl ConnInfo {
    /// The value of `key`, if the text gave it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// The connection in keyword form with the password (if any) as `***`: what a log line may
    /// show.
    pub fn redacted(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| {
                if k == "password" {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({})", self.redacted())
    }
}

/// Parses a connection string in either form. The message of an error never quotes the
/// password.
pub fn parse(text: &str) -> Result<ConnInfo, String> {
    let text = text.trim();
    let params = if let Some(rest) = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
    {
        parse_uri(rest)?
    } else if text.contains("://") {
        return Err("expected a postgres:// or postgresql:// URI, or key=value pairs".into());
    } else {
        parse_keywords(text)?
    };
    for (k, v) in &params {
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!(
                "unknown connection option {k:?} (expected one of: {})",
                KEYWORDS.join(", ")
            ));
        }
        if k == "sslmode" && !SSL_MODES.contains(&v.as_str()) {
            return Err(format!(
                "sslmode {v:?} is not one of {}",
                SSL_MODES.join(", ")
            ));
        }
        if (k == "port" || k == "connect_timeout") && !v.is_empty() && v.parse::<u32>().is_err() {
            return Err(format!("{k} {v:?} is not a number"));
        }
    }
    Ok(ConnInfo { params })
}

fn parse_uri(rest: &str) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (before_query, None),
    };
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.insert("user".into(), decode(user, "user")?);
            }
            if let Some(p) = password {
                params.insert("password".into(), decode(p, "password")?);
            }
            hostport
        }
        None => authority,
    };
    if hostport.contains(',') {
        return Err("several hosts in one URI are not supported".into());
    }
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (h, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 host needs its closing ]")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected :PORT after ]")?),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (decode(h, "host")?, Some(p)),
            None => (decode(hostport, "host")?, None),
        }
    };
    if !host.is_empty() {
        params.insert("host".into(), host);
    }
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        params.insert("port".into(), p.to_string());
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        params.insert("dbname".into(), decode(db, "dbname")?);
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("query parameter {pair:?} has no ="))?;
        let k = decode(k, "a query key")?;
        let v = decode(v, &k)?;
        params.insert(k, v);
    }
    Ok(params)
}

/// Percent-decoding; `what` names the part in errors (never its value).
fn decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {what}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what} is not UTF-8 once decoded"))
}

fn parse_keywords(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("missing = after {key:?}"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("unterminated quoted value of {key:?}")),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        params.insert(key, value);
    }
    Ok(params)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn the_issue_s_uri_parses() {
        let c = parse("postgres://jaunt:PASS%40WORD@db.example.com:5432/jaunt?sslmode=verify-full")
            .unwrap();
        assert_eq!(c.get("user"), Some("jaunt"));
        assert_eq!(c.get("password"), Some("PASS@WORD"));
        assert_eq!(c.get("host"), Some("db.example.com"));
        assert_eq!(c.get("port"), Some("5432"));
        assert_eq!(c.get("dbname"), Some("jaunt"));
        assert_eq!(c.get("sslmode"), Some("verify-full"));
        assert!(!format!("{c:?}").contains("PASS"));
        assert!(!c.redacted().contains("PASS"));
    }

    #[test]
    fn uri_parts_may_be_left_out() {
        let c = parse("postgresql://").unwrap();
        assert!(c.params.is_empty());
        let c = parse("postgresql://[::1]:6543?application_name=x").unwrap();
        assert_eq!(c.get("host"), Some("::1"));
        assert_eq!(c.get("port"), Some("6543"));
        let c = parse("postgres://u@h/db").unwrap();
        assert_eq!(c.get("user"), Some("u"));
        assert_eq!(c.get("password"), None);
    }

    #[test]
    fn keyword_form_with_quotes() {
        let c = parse("host=127.0.0.1 port = 5 password='a \\'b' dbname=x").unwrap();
        assert_eq!(c.get("password"), Some("a 'b"));
        assert_eq!(c.get("port"), Some("5"));
        assert_eq!(c.get("dbname"), Some("x"));
    }

    #[test]
    fn refusals_name_the_problem_not_the_password() {
        assert!(parse("mysql://x").unwrap_err().contains("postgres://"));
        assert!(parse("postgres://h?bogus=1").unwrap_err().contains("bogus"));
        assert!(parse("postgres://h?sslmode=maybe")
            .unwrap_err()
            .contains("sslmode"));
        assert!(parse("postgres://h:abc").unwrap_err().contains("port"));
        let e = parse("postgres://u:se%ZZcret@h").unwrap_err();
        assert!(e.contains("password") && !e.contains("cret"), "{e}");
        assert!(parse("host=h password='open")
            .unwrap_err()
            .contains("unterminated"));
        assert!(parse("a,b").is_err());
    }
}
