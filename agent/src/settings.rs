//! What the agent runs with: [`AgentSettings`] (built from the config file's
//! [`AgentConfig`] by [`AgentSettings::new`], or by hand in tests), its [`Timeouts`], the TLS
//! client configuration helper [`client_config`], and the [`AgentHello`] the settings announce.
//! Checking the settings once before the runtime starts lives here too ([`Prepared`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jaunt_config::file::{
    AgentConfig, AgentServices, AppProtocol, CpuPlacement, DbProtocol, HostPort,
};
use jaunt_config::wire::agent_hello::{AgentHello, Resource, ResourceKind, ResourceProtocol};
use jaunt_config::wire::dial::DialError;
use jaunt_config::wire::ALPN_TUNNEL;
use jaunt_engine::mux;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::backoff::BackoffConfig;
use crate::error::AgentError;

/// Default bound on a TCP connect to the proxy: a SYN retried a few times on a lossy link.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default bound on the TLS handshake plus the engine's tunnel hello: the engine's own
/// handshake timeout is 10 s, so waiting longer would only wait for its refusal.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default bound on connecting to a local service (sshd, an app). The user waits on it, and
/// the engine's dial has its own bound: a local service that does not answer in 5 s is down.
pub const DEFAULT_LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default time streams get to finish after a shutdown before their tunnels are aborted: long
/// enough for a `scp` of a few hundred MiB to complete, short enough for a systemd stop
/// (`TimeoutStopSec` is 90 s by default).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Everything [`crate::run`] needs.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// The engine's public address, `host:port`.
    pub proxy_addr: String,
    /// The name the proxy's certificate is checked against (SNI): the proxy host.
    pub server_name: String,
    /// Host certificate and key, the cluster's host CA as roots, ALPN `jaunt-tunnel`
    /// ([`client_config`] builds it). Replaced at run time by
    /// [`crate::AgentCommand::ReplaceTls`].
    pub tls: Arc<ClientConfig>,
    /// The node name (the SSH target users dial).
    pub name: String,
    /// The host's labels.
    pub labels: BTreeMap<String, String>,
    /// What this agent serves.
    pub services: AgentServices,
    /// Reconnect schedule.
    pub backoff: BackoffConfig,
    /// Bounds on dials and shutdown.
    pub timeouts: Timeouts,
    /// Keepalive and dead-peer timers of the tunnels.
    pub mux: mux::Config,
    /// Whether the executor runs beside a local engine's busy shard (`placement.rs`).
    pub cpu_placement: CpuPlacement,
}

/// Bounds on the agent's waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect to the proxy.
    pub connect: Duration,
    /// TLS handshake plus the engine's tunnel hello (and sending ours).
    pub handshake: Duration,
    /// TCP connect to a local service.
    pub local_connect: Duration,
    /// After a shutdown: how long streams may finish before the tunnels are aborted.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: DEFAULT_CONNECT_TIMEOUT,
            handshake: DEFAULT_HANDSHAKE_TIMEOUT,
            local_connect: DEFAULT_LOCAL_CONNECT_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// What a running agent can take from its re-read config file ([`crate::AgentCommand::Reload`],
/// on SIGHUP): its host labels and services, announced at once on every tunnel by a heartbeat
/// (and in the AgentHello of every new tunnel). The proxy address, the node name and the
/// identity need a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Announce {
    /// The host's labels.
    pub labels: BTreeMap<String, String>,
    /// What the agent serves.
    pub services: AgentServices,
}

impl AgentSettings {
    /// The reloadable part of these settings.
    pub(crate) fn announce(&self) -> Announce {
        Announce {
            labels: self.labels.clone(),
            services: self.services.clone(),
        }
    }

    /// These settings with `announce` in place of their labels and services.
    pub(crate) fn with_announce(&self, announce: Announce) -> AgentSettings {
        AgentSettings {
            labels: announce.labels,
            services: announce.services,
            ..self.clone()
        }
    }

    /// Settings for the validated agent section of the config file, with default backoff,
    /// timeouts and timers. The server name is the proxy address's host.
    pub fn new(config: &AgentConfig, tls: Arc<ClientConfig>) -> AgentSettings {
        AgentSettings {
            proxy_addr: config.proxy_addr.to_string(),
            server_name: config.proxy_addr.host.clone(),
            tls,
            name: config.name.clone(),
            labels: config.labels.clone(),
            services: config.services.clone(),
            backoff: BackoffConfig::default(),
            timeouts: Timeouts::default(),
            mux: mux::Config::default(),
            cpu_placement: config.cpu_placement,
        }
    }

    /// The [`AgentHello`] these settings announce: a `node` (protocol `ssh`) if SSH is served,
    /// each app as `app` (`http`, `https`) or `tcp`, each database as `db` (`postgres`). Resource
    /// labels are the ones configured for that service; the host's labels travel once, at the
    /// top level.
    pub fn agent_hello(&self) -> AgentHello {
        let mut resources = Vec::new();
        if let Some(ssh) = &self.services.ssh {
            resources.push(Resource {
                kind: ResourceKind::Node,
                name: self.name.clone(),
                labels: ssh.labels.clone(),
                protocol: ResourceProtocol::Ssh,
            });
        }
        for app in &self.services.apps {
            let (kind, protocol) = match app.protocol {
                AppProtocol::Http => (ResourceKind::App, ResourceProtocol::Http),
                AppProtocol::Https => (ResourceKind::App, ResourceProtocol::Https),
                AppProtocol::Tcp => (ResourceKind::Tcp, ResourceProtocol::Tcp),
            };
            resources.push(Resource {
                kind,
                name: app.name.clone(),
                labels: app.labels.clone(),
                protocol,
            });
        }
        for db in &self.services.dbs {
            let protocol = match db.protocol {
                DbProtocol::Postgres => ResourceProtocol::Postgres,
                DbProtocol::Mysql => ResourceProtocol::Mysql,
            };
            resources.push(Resource {
                kind: ResourceKind::Db,
                name: db.name.clone(),
                labels: db.labels.clone(),
                protocol,
            });
        }
        AgentHello::new(&self.name, self.labels.clone(), resources)
    }
}

/// Builds the agent's TLS client configuration: ring only, TLS 1.3 and 1.2, the host
/// certificate `chain` (leaf first) and its `key` as client certificate, `host_ca_roots` as the
/// only trust anchors for the proxy's certificate, ALPN `jaunt-tunnel`.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    host_ca_roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, AgentError> {
    if chain.is_empty() {
        return Err(AgentError::Tls(
            "the host certificate chain is empty".into(),
        ));
    }
    if host_ca_roots.is_empty() {
        return Err(AgentError::Tls(
            "no host CA roots: the proxy's certificate could never be verified".into(),
        ));
    }
    let mut roots = RootCertStore::empty();
    for root in host_ca_roots {
        roots
            .add(root.clone())
            .map_err(|e| AgentError::Tls(format!("a host CA root is not usable: {e}")))?;
    }
    // The engine's provider (ring, with graviola's X25519 where the CPU has it, and wire-only
    // random values from a per-thread pool): a reconnect costs the agent about half the key
    // exchange CPU (ARCHITECTURE.md, "TLS policy").
    let provider = Arc::new(jaunt_engine::server::tls_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| AgentError::Tls(format!("the host certificate or key is not usable: {e}")))?;
    config.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
    Ok(Arc::new(config))
}

/// Settings checked and pre-computed once before the runtime starts.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) proxy: HostPort,
    pub(crate) proxy_addr: String,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) name: String,
    /// The host's labels (a resource's labels overlay them; the agent's authorization check
    /// uses the same merge as the engine).
    pub(crate) labels: BTreeMap<String, String>,
    /// The framed AgentHello, the same on every tunnel (and in every heartbeat until a reload
    /// replaces the whole `Prepared`).
    pub(crate) hello: Vec<u8>,
    pub(crate) resources: usize,
    pub(crate) services: AgentServices,
    pub(crate) timeouts: Timeouts,
    pub(crate) mux: mux::Config,
    /// Database streams' hooks and certificate cache (the hooks' defaults unless
    /// [`crate::run_with_hooks`] set them).
    pub(crate) db: crate::postgres::DbState,
    /// How often each tunnel heartbeats the announcement when nothing changes.
    pub(crate) heartbeat_interval: Duration,
    /// HTTP app streams' hooks and token cache (the hooks' defaults unless
    /// [`crate::run_with_hooks`] set them).
    pub(crate) app: crate::http_app::AppState,
    /// Where the agent's own authorization refusals go (the hooks' default unless
    /// [`crate::run_with_hooks`] set it).
    pub(crate) denials: Denials,
    /// SSH termination (certificates, spool; the hooks' default, none, unless
    /// [`crate::run_with_hooks`] set it).
    pub(crate) ssh: crate::ssh_term::SshState,
}

/// The [`crate::hooks::DenialRecorder`] in use (a newtype so `Prepared` stays `Debug`).
#[derive(Clone)]
pub(crate) struct Denials(pub(crate) std::sync::Arc<dyn crate::hooks::DenialRecorder>);

impl std::fmt::Debug for Denials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Denials")
    }
}

impl Prepared {
    pub(crate) fn new(settings: &AgentSettings) -> Result<Prepared, AgentError> {
        let proxy: HostPort = settings
            .proxy_addr
            .parse()
            .map_err(|e| AgentError::Config {
                what: "proxy_addr",
                why: format!("{:?}: {e}", settings.proxy_addr),
            })?;
        if proxy.port == 0 {
            return Err(AgentError::Config {
                what: "proxy_addr",
                why: "port 0 cannot be dialed".into(),
            });
        }
        let server_name =
            ServerName::try_from(settings.server_name.clone()).map_err(|e| AgentError::Config {
                what: "server_name",
                why: format!(
                    "{:?} is not a DNS name or IP address: {e}",
                    settings.server_name
                ),
            })?;
        settings
            .backoff
            .validate()
            .map_err(|why| AgentError::Config {
                what: "backoff",
                why: why.into(),
            })?;
        for (what, value) in [
            ("timeouts.connect", settings.timeouts.connect),
            ("timeouts.handshake", settings.timeouts.handshake),
            ("timeouts.local_connect", settings.timeouts.local_connect),
        ] {
            if value.is_zero() {
                return Err(AgentError::Config {
                    what,
                    why: "must be above zero".into(),
                });
            }
        }
        if !settings.tls.alpn_protocols.iter().any(|p| p == ALPN_TUNNEL) {
            return Err(AgentError::Config {
                what: "tls",
                why: "the client configuration does not offer ALPN jaunt-tunnel \
                      (build it with jaunt_agent::client_config)"
                    .into(),
            });
        }
        let hello = settings.agent_hello();
        let encoded = hello.encode().map_err(|e| {
            let what = match &e {
                DialError::Invalid { field: "name", .. } => "name",
                DialError::Invalid {
                    field: "labels", ..
                } => "labels",
                _ => "services",
            };
            AgentError::Config {
                what,
                why: format!("cannot be announced to the engine: {e}"),
            }
        })?;
        Ok(Prepared {
            proxy,
            proxy_addr: settings.proxy_addr.clone(),
            server_name,
            name: settings.name.clone(),
            labels: settings.labels.clone(),
            hello: encoded,
            resources: hello.resources.len(),
            services: settings.services.clone(),
            timeouts: settings.timeouts,
            mux: settings.mux,
            db: crate::postgres::DbState::default(),
            heartbeat_interval: jaunt_config::wire::agent_hello::DEFAULT_HEARTBEAT_INTERVAL,
            app: crate::http_app::AppState::default(),
            denials: Denials(std::sync::Arc::new(crate::hooks::IgnoreDenials)),
            ssh: crate::ssh_term::SshState::default(),
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use jaunt_config::file::{AppService, DbService, SshService};
    use rustls_pki_types::PrivatePkcs8KeyDer;

    use super::*;

    fn tls() -> Arc<ClientConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["node1".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        client_config(vec![cert.der().clone()], key, &[cert.der().clone()]).unwrap()
    }

    fn hp(s: &str) -> HostPort {
        s.parse().unwrap()
    }

    fn settings() -> AgentSettings {
        AgentSettings {
            proxy_addr: "proxy.example.com:443".into(),
            server_name: "proxy.example.com".into(),
            tls: tls(),
            name: "node1".into(),
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            services: AgentServices {
                ssh: Some(SshService {
                    addr: hp("127.0.0.1:22"),
                    labels: [("os".to_owned(), "debian".to_owned())].into(),
                }),
                apps: vec![
                    AppService {
                        name: "grafana".into(),
                        uri: "http://127.0.0.1:3000".into(),
                        protocol: AppProtocol::Http,
                        addr: hp("127.0.0.1:3000"),
                        labels: BTreeMap::new(),
                    },
                    AppService {
                        name: "redis".into(),
                        uri: "tcp://127.0.0.1:6379".into(),
                        protocol: AppProtocol::Tcp,
                        addr: hp("127.0.0.1:6379"),
                        labels: BTreeMap::new(),
                    },
                ],
                dbs: vec![DbService {
                    name: "pg".into(),
                    uri: "postgres://127.0.0.1:5432".into(),
                    protocol: DbProtocol::Postgres,
                    addr: hp("127.0.0.1:5432"),
                    labels: BTreeMap::new(),
                }],
            },
            backoff: BackoffConfig::default(),
            timeouts: Timeouts::default(),
            mux: mux::Config::default(),
            cpu_placement: CpuPlacement::default(),
        }
    }

    #[test]
    fn hello_lists_every_service() {
        let hello = settings().agent_hello();
        let listed: Vec<(&str, &str, &str)> = hello
            .resources
            .iter()
            .map(|r| (r.kind.as_str(), r.name.as_str(), r.protocol.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("node", "node1", "ssh"),
                ("app", "grafana", "http"),
                ("tcp", "redis", "tcp"),
                ("db", "pg", "postgres")
            ]
        );
        assert_eq!(hello.labels.get("env").map(String::as_str), Some("prod"));
        assert!(hello.encode().is_ok());
    }

    #[test]
    fn prepare_names_the_bad_setting() {
        assert!(Prepared::new(&settings()).is_ok());
        type Spoil = fn(&mut AgentSettings);
        let cases: [(&str, Spoil); 5] = [
            ("proxy_addr", |s| s.proxy_addr = "no-port".into()),
            ("proxy_addr", |s| s.proxy_addr = "host:0".into()),
            ("server_name", |s| s.server_name = "bad name!".into()),
            ("backoff", |s| s.backoff.base = Duration::ZERO),
            ("labels", |s| {
                s.labels = (0..100).map(|i| (format!("k{i}"), String::new())).collect()
            }),
        ];
        for (what, spoil) in cases {
            let mut s = settings();
            spoil(&mut s);
            match Prepared::new(&s) {
                Err(AgentError::Config { what: got, .. }) => assert_eq!(got, what),
                other => panic!("{what}: {other:?}"),
            }
        }
        let mut s = settings();
        let mut no_alpn = (*s.tls).clone();
        no_alpn.alpn_protocols.clear();
        s.tls = Arc::new(no_alpn);
        assert!(matches!(
            Prepared::new(&s),
            Err(AgentError::Config { what: "tls", .. })
        ));
    }

    #[test]
    fn a_reload_changes_only_labels_and_services() {
        let before = settings();
        let mut announce = before.announce();
        announce.services.apps.truncate(1);
        announce.labels.insert("team".into(), "web".into());
        let after = before.with_announce(announce.clone());
        assert_eq!(after.announce(), announce);
        assert_eq!(
            (after.name.as_str(), after.proxy_addr.as_str()),
            ("node1", "proxy.example.com:443")
        );
        let hello = after.agent_hello();
        assert_eq!(hello.resources.len(), 3);
        assert_eq!(hello.labels.get("team").map(String::as_str), Some("web"));
        assert!(Prepared::new(&after).is_ok());
    }

    #[test]
    fn client_config_refuses_empty_inputs() {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        assert!(client_config(Vec::new(), der(), &[]).is_err());
        let params = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert!(client_config(vec![cert.der().clone()], der(), &[]).is_err());
        let config = client_config(vec![cert.der().clone()], der(), &[cert.der().clone()]).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"jaunt-tunnel".to_vec()]);
    }
}
