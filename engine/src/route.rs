//! Route decision for the public port: a pure function from a parsed ClientHello (see
//! [`crate::hello`]) and the cluster's public host to a [`Route`].
//!
//! Lives here: the [`Route`] enum (the ALPN identifiers it decides on are the wire contract's,
//! `jaunt_config::wire`, re-exported here), the [`RejectReason`] enum
//! shared with the ClientHello parser (stable metric labels and the TLS alert to send), and
//! [`decide`]. Does not live here: reading bytes, TLS termination, pass-through to control,
//! authorization of the identity in the client certificate (all in the connection shell).
//!
//! Decision rules, in order:
//! 1. No ALPN extension: HTTP (rule 3).
//! 2. Otherwise the client's ALPN list is scanned in the client's preference order and the first
//!    identifier Jaunt recognises decides: a `jaunt-*` id routes by ALPN alone (SNI ignored: agents
//!    and tools may dial an IP or a load balancer name; `jaunt-app` names the web app in a dial
//!    request instead of the SNI, for clients logged in by IP address); `http/1.1` means HTTP. `h2` alone is not
//!    enough (the web endpoints speak HTTP/1.1) but is harmless next to `http/1.1`; unknown ids
//!    (GREASE, probes) are skipped. A list with nothing recognised is `Reject(UnknownAlpn)`.
//! 3. HTTP: no SNI, an IP literal, or SNI equal to the public host is `Web`; SNI
//!    `<label>.<public host>` with a single DNS label is `App { name: label }`; any other SNI is
//!    `Reject(UnknownHost)`, so scanners with foreign names cost no TLS handshake.

use std::fmt;

use crate::hello::{ClientHello, HostName};

pub use jaunt_config::wire::{
    ALPN_APP, ALPN_CONTROL, ALPN_H2, ALPN_HTTP1, ALPN_POSTGRES, ALPN_SSH, ALPN_TCP, ALPN_TUNNEL,
};

/// Longest app name: one DNS label (RFC 1035 §2.3.4).
pub const MAX_APP_NAME_BYTES: usize = 63;

/// Where a connection on the public port goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Agent reverse tunnel: terminate TLS, require a host certificate.
    Tunnel,
    /// Control API: pass the TLS bytes through untouched, replaying every byte already read.
    Control,
    /// User SSH stream: terminate, require a user certificate.
    Ssh,
    /// User PostgreSQL session: terminate, require a user certificate.
    Postgres,
    /// User TCP app: terminate, require a user certificate.
    Tcp,
    /// Web app `name` (lower-case single DNS label, borrowed from the ClientHello's SNI).
    App { name: &'a str },
    /// Web app named by the dial request that follows the handshake (ALPN `jaunt-app`): what
    /// `jaunt proxy app` uses when the proxy has no DNS name to put the app under.
    AppDial,
    /// Web UI and its API.
    Web,
    /// Refuse: send [`RejectReason::alert`] if any, close, count [`RejectReason::as_str`].
    Reject(RejectReason),
}

impl Route<'_> {
    /// Stable metric label of the route kind (the app name is deliberately not part of it:
    /// unbounded label cardinality).
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Tunnel => "tunnel",
            Route::Control => "control",
            Route::Ssh => "ssh",
            Route::Postgres => "postgres",
            Route::Tcp => "tcp",
            Route::App { .. } | Route::AppDial => "app",
            Route::Web => "web",
            Route::Reject(_) => "reject",
        }
    }

    /// True when the engine forwards the TLS bytes instead of terminating TLS.
    pub fn passes_through(&self) -> bool {
        matches!(self, Route::Control)
    }
}

/// Why a connection was refused before any TLS handshake. Every variant is the client's fault
/// (downstream); retrying the same bytes cannot help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// First bytes are not a TLS handshake record (an HTTP request, an SSH banner, SSLv2).
    NotTls,
    /// A record's length field exceeds 2^14 (RFC 8446 §5.1).
    RecordTooLarge,
    /// The ClientHello (with its record headers) would exceed `MAX_CLIENT_HELLO_BYTES`.
    HelloTooLarge,
    /// Inconsistent lengths, trailing bytes, wrong message or record type, duplicate extensions.
    Malformed,
    /// The ALPN list is longer than `MAX_ALPN_LIST_BYTES`.
    AlpnTooLong,
    /// The server_name extension holds something that is not a valid ASCII host name.
    BadSni,
    /// ALPN offered, but nothing Jaunt speaks.
    UnknownAlpn,
    /// HTTP with an SNI that is neither the public host nor one of its apps.
    UnknownHost,
}

impl RejectReason {
    /// Every reason, in [`RejectReason::index`] order: lets a shard keep one counter per reason
    /// in a fixed array.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::NotTls,
        RejectReason::RecordTooLarge,
        RejectReason::HelloTooLarge,
        RejectReason::Malformed,
        RejectReason::AlpnTooLong,
        RejectReason::BadSni,
        RejectReason::UnknownAlpn,
        RejectReason::UnknownHost,
    ];

    /// Stable metric label; never change an existing one (dashboards depend on them).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotTls => "not_tls",
            RejectReason::RecordTooLarge => "record_too_large",
            RejectReason::HelloTooLarge => "hello_too_large",
            RejectReason::Malformed => "malformed",
            RejectReason::AlpnTooLong => "alpn_too_long",
            RejectReason::BadSni => "bad_sni",
            RejectReason::UnknownAlpn => "unknown_alpn",
            RejectReason::UnknownHost => "unknown_host",
        }
    }

    /// Position in [`RejectReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The fatal TLS alert description to send before closing (RFC 8446 §6), or `None` when the
    /// peer does not speak TLS and an alert would be noise.
    pub fn alert(self) -> Option<u8> {
        const RECORD_OVERFLOW: u8 = 22;
        const DECODE_ERROR: u8 = 50;
        const ILLEGAL_PARAMETER: u8 = 47;
        const UNRECOGNIZED_NAME: u8 = 112;
        const NO_APPLICATION_PROTOCOL: u8 = 120;
        match self {
            RejectReason::NotTls => None,
            RejectReason::RecordTooLarge => Some(RECORD_OVERFLOW),
            RejectReason::HelloTooLarge | RejectReason::Malformed => Some(DECODE_ERROR),
            RejectReason::AlpnTooLong | RejectReason::BadSni => Some(ILLEGAL_PARAMETER),
            RejectReason::UnknownAlpn => Some(NO_APPLICATION_PROTOCOL),
            RejectReason::UnknownHost => Some(UNRECOGNIZED_NAME),
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for RejectReason {}

/// Decide where a connection goes from its ClientHello. `public_host` is the cluster's public
/// address as configured; a port (`host:3080`, `[::1]:3080`) and a trailing dot are ignored and
/// the comparison is ASCII case-insensitive. Allocation-free.
pub fn decide<'a>(hello: &'a ClientHello, public_host: &str) -> Route<'a> {
    match select_protocol(hello) {
        Protocol::Route(route) => route,
        Protocol::Http => decide_http(hello.server_name(), public_host),
        Protocol::Unknown => Route::Reject(RejectReason::UnknownAlpn),
    }
}

enum Protocol {
    Route(Route<'static>),
    Http,
    Unknown,
}

fn select_protocol(hello: &ClientHello) -> Protocol {
    if !hello.alpn_offered() {
        return Protocol::Http;
    }
    for id in hello.alpn() {
        let route = match id {
            ALPN_TUNNEL => Route::Tunnel,
            ALPN_CONTROL => Route::Control,
            ALPN_SSH => Route::Ssh,
            ALPN_POSTGRES => Route::Postgres,
            ALPN_TCP => Route::Tcp,
            ALPN_APP => Route::AppDial,
            ALPN_HTTP1 => return Protocol::Http,
            _ => continue,
        };
        return Protocol::Route(route);
    }
    Protocol::Unknown
}

fn decide_http<'a>(sni: Option<&'a HostName>, public_host: &str) -> Route<'a> {
    let Some(sni) = sni else {
        return Route::Web;
    };
    if sni.is_ip_literal() {
        return Route::Web;
    }
    let host = host_without_port(public_host);
    let name = sni.as_str();
    if host.is_empty() {
        return Route::Reject(RejectReason::UnknownHost);
    }
    if name.eq_ignore_ascii_case(host) {
        return Route::Web;
    }
    // `name` is ASCII (validated by the parser), so every index is a char boundary and `get`
    // cannot fail on one; it only guards the lengths.
    let Some(split) = name.len().checked_sub(host.len() + 1) else {
        return Route::Reject(RejectReason::UnknownHost);
    };
    match (
        name.get(..split),
        name.get(split..split + 1),
        name.get(split + 1..),
    ) {
        (Some(label), Some("."), Some(suffix))
            if suffix.eq_ignore_ascii_case(host) && is_app_label(label) =>
        {
            Route::App { name: label }
        }
        _ => Route::Reject(RejectReason::UnknownHost),
    }
}

/// An app name is one lower-case LDH label (RFC 1123 §2.1): letters, digits, inner hyphens.
fn is_app_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_APP_NAME_BYTES
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
}

/// `host:port` → `host`, `[v6]:port` / `[v6]` → `v6`, bare `v6` unchanged; one trailing dot
/// dropped.
fn host_without_port(public_host: &str) -> &str {
    let host = if let Some(rest) = public_host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(host, _)| host)
    } else {
        match public_host.split_once(':') {
            Some((host, port)) if !port.contains(':') => host,
            _ => public_host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::test_support::{rustls_hello, Synth};
    use crate::hello::{parse, Parse};

    const PUBLIC: &str = "jaunt.example.com";

    fn hello_of(bytes: &[u8]) -> ClientHello {
        match parse(bytes) {
            Parse::Done(hello) => hello,
            other => unreachable!("expected a ClientHello, got {other:?}"),
        }
    }

    fn route_rustls(sni: Option<&str>, alpn: &[&[u8]], public: &str) -> String {
        let hello = hello_of(&rustls_hello(sni, alpn));
        format!("{:?}", decide(&hello, public))
    }

    fn route_synth(synth: &Synth, public: &str) -> String {
        match parse(&synth.record()) {
            Parse::Done(hello) => format!("{:?}", decide(&hello, public)),
            Parse::Invalid(reason) => format!("{:?}", Route::Reject(reason)),
            Parse::NeedMore => "NeedMore".to_owned(),
        }
    }

    #[test]
    fn jaunt_alpn_routes_ignore_sni() {
        let cases: [(&[u8], &str); 6] = [
            (ALPN_TUNNEL, "Tunnel"),
            (ALPN_CONTROL, "Control"),
            (ALPN_SSH, "Ssh"),
            (ALPN_POSTGRES, "Postgres"),
            (ALPN_TCP, "Tcp"),
            (ALPN_APP, "AppDial"),
        ];
        for (alpn, want) in cases {
            for sni in [Some(PUBLIC), Some("elsewhere.test"), Some("10.1.2.3"), None] {
                assert_eq!(route_rustls(sni, &[alpn], PUBLIC), want, "{sni:?}");
            }
        }
    }

    #[test]
    fn web_and_app_routes() {
        let http: &[&[u8]] = &[ALPN_HTTP1];
        let browser: &[&[u8]] = &[ALPN_H2, ALPN_HTTP1];
        for alpn in [http, browser, &[]] {
            assert_eq!(route_rustls(Some(PUBLIC), alpn, PUBLIC), "Web");
            assert_eq!(route_rustls(None, alpn, PUBLIC), "Web");
            // rustls sends no SNI for an IP address.
            assert_eq!(route_rustls(Some("192.0.2.7"), alpn, PUBLIC), "Web");
            assert_eq!(
                route_rustls(Some("grafana.jaunt.example.com"), alpn, PUBLIC),
                r#"App { name: "grafana" }"#
            );
            assert_eq!(
                route_rustls(Some("a.b.jaunt.example.com"), alpn, PUBLIC),
                "Reject(UnknownHost)"
            );
            assert_eq!(
                route_rustls(Some("example.com"), alpn, PUBLIC),
                "Reject(UnknownHost)"
            );
            assert_eq!(
                route_rustls(Some("xjaunt.example.com"), alpn, PUBLIC),
                "Reject(UnknownHost)"
            );
        }
    }

    #[test]
    fn sni_matching_is_case_insensitive_and_ignores_port() {
        for public in [
            "jaunt.example.com",
            "JAUNT.Example.com",
            "jaunt.example.com:3080",
            "Jaunt.Example.Com:443",
            "jaunt.example.com.",
        ] {
            assert_eq!(
                route_rustls(Some("Jaunt.EXAMPLE.com"), &[ALPN_HTTP1], public),
                "Web"
            );
            assert_eq!(
                route_rustls(Some("Grafana.Jaunt.Example.COM"), &[ALPN_HTTP1], public),
                r#"App { name: "grafana" }"#,
                "{public}"
            );
        }
    }

    #[test]
    fn ip_literal_sni_is_web() {
        for ip in ["192.0.2.1", "2001:db8::1", "::1"] {
            let synth = Synth::new().sni(ip.as_bytes()).alpn(&[ALPN_HTTP1]);
            assert_eq!(route_synth(&synth, PUBLIC), "Web", "{ip}");
        }
        // IP-literal public host: clients send no SNI.
        assert_eq!(
            route_rustls(Some("192.0.2.1"), &[ALPN_HTTP1], "192.0.2.1:3080"),
            "Web"
        );
        assert_eq!(route_rustls(None, &[], "[2001:db8::1]:3080"), "Web");
    }

    #[test]
    fn alpn_selection() {
        // Unknown ids are skipped; first recognised id in client order wins.
        let cases: [(&[&[u8]], &str); 8] = [
            (&[b"spdy/3", ALPN_SSH], "Ssh"),
            (&[b"\x0a\x0a", ALPN_HTTP1], "Web"),
            (&[ALPN_H2, ALPN_HTTP1], "Web"),
            (&[ALPN_H2], "Reject(UnknownAlpn)"),
            (&[b"h3", b"imap"], "Reject(UnknownAlpn)"),
            (&[b"jaunt-tunnel2"], "Reject(UnknownAlpn)"),
            (&[ALPN_TCP, ALPN_HTTP1], "Tcp"),
            (&[ALPN_HTTP1, ALPN_TCP], "Web"),
        ];
        for (alpn, want) in cases {
            assert_eq!(route_rustls(Some(PUBLIC), alpn, PUBLIC), want, "{alpn:?}");
        }
    }

    #[test]
    fn app_label_rules() {
        let cases = [
            ("a.jaunt.example.com", r#"App { name: "a" }"#),
            ("app-1.jaunt.example.com", r#"App { name: "app-1" }"#),
            ("-app.jaunt.example.com", "Reject(UnknownHost)"),
            ("app-.jaunt.example.com", "Reject(UnknownHost)"),
            ("my_app.jaunt.example.com", "Reject(UnknownHost)"),
            ("jaunt.example.com.evil.test", "Reject(UnknownHost)"),
        ];
        for (sni, want) in cases {
            let synth = Synth::new().sni(sni.as_bytes()).alpn(&[ALPN_HTTP1]);
            assert_eq!(route_synth(&synth, PUBLIC), want, "{sni}");
        }
        let long = format!("{}.jaunt.example.com", "a".repeat(MAX_APP_NAME_BYTES));
        let synth = Synth::new().sni(long.as_bytes());
        assert_eq!(
            route_synth(&synth, PUBLIC),
            format!("App {{ name: {:?} }}", "a".repeat(63))
        );
    }

    #[test]
    fn empty_public_host_never_matches() {
        assert_eq!(
            route_rustls(Some("app.example.com"), &[], ""),
            "Reject(UnknownHost)"
        );
        assert_eq!(route_rustls(None, &[], ""), "Web");
    }

    #[test]
    fn host_without_port_cases() {
        assert_eq!(host_without_port("h.example:443"), "h.example");
        assert_eq!(host_without_port("h.example"), "h.example");
        assert_eq!(host_without_port("h.example.:443"), "h.example");
        assert_eq!(host_without_port("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(host_without_port("[2001:db8::1]"), "2001:db8::1");
        assert_eq!(host_without_port("2001:db8::1"), "2001:db8::1");
        assert_eq!(host_without_port("[broken"), "broken");
        assert_eq!(host_without_port(""), "");
    }

    #[test]
    fn reject_reasons_are_stable_and_indexed() {
        let labels: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "not_tls",
                "record_too_large",
                "hello_too_large",
                "malformed",
                "alpn_too_long",
                "bad_sni",
                "unknown_alpn",
                "unknown_host"
            ]
        );
        for (i, reason) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert_eq!(reason.to_string(), reason.as_str());
        }
        assert_eq!(RejectReason::UnknownAlpn.alert(), Some(120));
        assert_eq!(RejectReason::NotTls.alert(), None);
    }

    #[test]
    fn route_labels() {
        assert_eq!(Route::App { name: "x" }.as_str(), "app");
        assert_eq!(Route::Reject(RejectReason::Malformed).as_str(), "reject");
        assert!(Route::Control.passes_through());
        assert!(!Route::Tunnel.passes_through());
    }
}
