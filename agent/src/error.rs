//! The agent's errors and who is to blame for them. [`AgentError`] is what [`crate::run`]
//! returns (only start-up problems: once running, the agent retries everything else);
//! [`TunnelError`] is why one dial of a tunnel failed, logged and retried with backoff.

use std::fmt;
use std::io;
use std::time::Duration;

use jaunt_config::wire::dial::DialError;
use rustls::AlertDescription;

/// Who is to blame for a failure: tells an operator reading a log line what to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The agent's configuration or credentials (addresses, certificates, services).
    Config,
    /// The engine misbehaved or refused us (bad hello, protocol error, refusal).
    Engine,
    /// The network between agent and engine (resolution, reachability, resets, timeouts).
    Network,
    /// A local service the agent forwards to (sshd, an app).
    LocalService,
    /// A bug or resource exhaustion in the agent itself.
    Agent,
}

impl Blame {
    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Config => "config",
            Blame::Engine => "engine",
            Blame::Network => "network",
            Blame::LocalService => "local-service",
            Blame::Agent => "agent",
        }
    }
}

impl fmt::Display for Blame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`crate::run`] or [`crate::client_config`] failed. Nothing here is retried: each names
/// what to change.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A setting is unusable; `what` names it.
    #[error("agent setting {what}: {why}")]
    Config {
        /// The setting, e.g. `proxy_addr`.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The host certificate, key or CA roots were refused by rustls.
    #[error("agent TLS configuration: {0}")]
    Tls(String),
    /// The executor (io_uring, locked memory) or a thread could not be started.
    #[error("cannot start the agent runtime: {0}")]
    Runtime(String),
}

impl AgentError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            AgentError::Config { .. } | AgentError::Tls(_) => Blame::Config,
            AgentError::Runtime(_) => Blame::Agent,
        }
    }
}

/// Why one attempt to open a tunnel failed. Logged with [`TunnelError::blame`] and retried
/// after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The proxy's host name did not resolve.
    #[error("cannot resolve the proxy address {addr}: {source}")]
    Resolve {
        /// `host:port` as configured.
        addr: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// TCP connect to the proxy failed.
    #[error("cannot connect to the proxy at {addr}: {source}")]
    Connect {
        /// `host:port` as configured.
        addr: String,
        /// The connect error.
        source: io::Error,
    },
    /// A step took longer than its bound.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The TLS handshake failed; `hint` says what it probably means.
    #[error("TLS with the proxy failed: {source} ({hint})")]
    Tls {
        /// The handshake error.
        source: io::Error,
        /// What to check.
        hint: &'static str,
        /// Who is to blame, judged from the error.
        blame: Blame,
    },
    /// The proxy did not select ALPN `jaunt-tunnel`.
    #[error(
        "the proxy did not accept ALPN jaunt-tunnel (selected {selected}): \
         is proxy_addr the engine's public port?"
    )]
    Alpn {
        /// What it selected, for the message.
        selected: String,
    },
    /// The engine closed the connection before its tunnel hello (typically: it refused the
    /// host certificate's identity after the handshake).
    #[error("the engine closed the connection before its tunnel hello (was this host's certificate refused?)")]
    ClosedBeforeHello,
    /// The engine's tunnel hello is malformed.
    #[error("bad tunnel hello from the engine: {0}")]
    Hello(DialError),
    /// The engine speaks a tunnel hello version this agent does not.
    #[error("the engine sent tunnel hello version {0}; this agent speaks version {1}: upgrade one of them")]
    HelloVersion(u16, u16),
    /// The engine claims more shards than any engine runs.
    #[error("the engine claims {0} shards, more than the limit of {1}")]
    TooManyShards(usize, usize),
    /// Reading the hello or writing ours failed.
    #[error("tunnel opening failed while {while_}: {source}")]
    Io {
        /// What the agent was doing.
        while_: &'static str,
        /// The I/O error.
        source: io::Error,
    },
}

impl TunnelError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            TunnelError::Resolve { .. }
            | TunnelError::Connect { .. }
            | TunnelError::Timeout { .. }
            | TunnelError::Io { .. } => Blame::Network,
            TunnelError::Tls { blame, .. } => *blame,
            TunnelError::Alpn { .. } => Blame::Config,
            TunnelError::ClosedBeforeHello
            | TunnelError::Hello(_)
            | TunnelError::HelloVersion(..)
            | TunnelError::TooManyShards(..) => Blame::Engine,
        }
    }

    /// Classifies a failed client handshake: certificate problems on either side are the
    /// configuration's (renew, rejoin, fix the roots or the server name); the rest is the
    /// network's.
    pub(crate) fn tls(source: io::Error) -> TunnelError {
        let inner = source
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        let (hint, blame) = match inner {
            Some(rustls::Error::InvalidCertificate(_)) => (
                "the proxy's certificate is not trusted: check the host CA roots and the \
                 proxy's server name",
                Blame::Config,
            ),
            Some(rustls::Error::AlertReceived(alert)) => match alert {
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRequired
                | AlertDescription::AccessDenied => (
                    "the engine refused this host's certificate: expired, revoked or from \
                     another cluster? renew it or join again",
                    Blame::Config,
                ),
                AlertDescription::NoApplicationProtocol => (
                    "the proxy does not speak jaunt-tunnel: is proxy_addr the engine's public \
                     port?",
                    Blame::Config,
                ),
                _ => ("the engine ended the handshake", Blame::Engine),
            },
            Some(rustls::Error::NoApplicationProtocol) => (
                "the proxy does not speak jaunt-tunnel: is proxy_addr the engine's public port?",
                Blame::Config,
            ),
            Some(_) => ("TLS protocol failure", Blame::Engine),
            None => ("connection lost during the handshake", Blame::Network),
        };
        TunnelError::Tls {
            source,
            hint,
            blame,
        }
    }
}

/// A short, lower-case description of an I/O error for refusal messages a person reads:
/// "connection refused" rather than "Connection refused (os error 111)".
pub(crate) fn describe_io(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut => "timed out".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        io::ErrorKind::NotFound => format!("not found ({err})"),
        io::ErrorKind::AddrNotAvailable => "address not available".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        io::ErrorKind::HostUnreachable => "host unreachable".to_owned(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".to_owned(),
        _ => err.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn io_descriptions_read_well() {
        let refused = io::Error::from_raw_os_error(111);
        assert_eq!(describe_io(&refused), "connection refused");
        assert_eq!(
            describe_io(&io::Error::from_raw_os_error(113)),
            "host unreachable"
        );
        assert_eq!(
            describe_io(&io::Error::new(io::ErrorKind::TimedOut, "x")),
            "timed out"
        );
    }

    #[test]
    fn tls_blame_follows_the_alert() {
        let alert = |a| {
            TunnelError::tls(io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(a),
            ))
            .blame()
        };
        assert_eq!(alert(AlertDescription::UnknownCA), Blame::Config);
        assert_eq!(alert(AlertDescription::CertificateExpired), Blame::Config);
        assert_eq!(alert(AlertDescription::InternalError), Blame::Engine);
        let reset = TunnelError::tls(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(reset.blame(), Blame::Network);
    }
}
