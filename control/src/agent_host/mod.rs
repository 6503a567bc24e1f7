//! The agent host's side of Jaunt, in one place: `jaunt agent` and `jaunt start --config
//! agent.yaml` join once with a token, keep the host identity in the data directory, renew it
//! before it expires, follow CA rotations, and run the agent (crate `jaunt-agent`) with hooks
//! that call control. Calls to control are blocking, on plain threads; the agent's tunnels run
//! on glommio.
//!
//! - this file: start-up, joining, the policy poll, renewal, following a CA rotation, SIGHUP;
//! - [`client`]: the one [`HostClient`] every call to control goes through (identity and TLS
//!   configuration built once, reloaded when renewal or a rotation changes them);
//! - [`certs`]: the agent's providers of database certificates, app JWTs and SSH certificates;
//! - [`audit`]: the agent's audit events to control (queue, batches, retries).
//!
//! Control's side of each call (handlers, what it signs and checks) is `service/`,
//! `agent_audit.rs`, `db_cmd.rs` and `agent_ssh.rs`; nothing here is used by them.
//!
//! Identity files live in `DATA_DIR/host/` in the `$JAUNT_HOME` layout (see `profile.rs`), keyed
//! by the host id the cluster assigned.

pub mod audit;
pub mod certs;
pub mod client;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use jaunt_agent::AgentHooks;
use jaunt_config::api::{
    AgentPolicyResponse, Certs, JoinRequest, PingResponse, APP_HOST_ROLE, DB_HOST_ROLE,
};
use jaunt_config::identity::unix_now;

pub use self::client::{host_profile, HostClient};
use crate::ca::LocalKeys;
use crate::client::{Client, Trust};
use crate::profile::{Profile, ProfileInfo};

/// Renew when less than this fraction of the certificate's lifetime is left.
pub const RENEW_AT_REMAINING_FRACTION: f64 = 1.0 / 3.0;
/// How often the renewal thread looks at the certificate.
pub const RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How often the policy thread asks control for the cluster's policy (roles, locks, user CA):
/// a lock reaches the agent within this long (the engine ends sessions on its own snapshot at
/// once; the agent's check is the second line).
pub const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// First retry after a failed policy fetch; doubles per failure up to [`POLICY_RETRY_CAP`].
pub const POLICY_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest wait between policy fetches while control is unreachable.
pub const POLICY_RETRY_CAP: Duration = Duration::from_secs(30);

/// How the agent joins and where it keeps its identity.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub proxy: String,
    pub token: Option<String>,
    pub ca_pin: Option<String>,
    pub insecure: bool,
    pub data_dir: PathBuf,
    pub name: String,
    /// The config file it was started from (`jaunt start --config`), which SIGHUP re-reads;
    /// `None` for `jaunt agent` flags, which cannot change.
    pub config_file: Option<PathBuf>,
}

/// Runs the agent described by `config` until SIGTERM/SIGINT: join (or load the identity),
/// start the renewal thread, run the tunnels.
pub fn run(config: &jaunt_config::file::AgentConfig, opts: AgentOptions) -> anyhow::Result<()> {
    crate::profile::create_private_dir(&opts.data_dir)?;
    // Two agents on one data directory would share (and fight over) one host identity.
    let _lock = crate::exclusive::lock_data_dir(&opts.data_dir, "jaunt agent")?;
    let mut info = ensure_identity(&opts)?;
    check_services(&info.identity.roles, config)?;
    let host = Arc::new(HostClient::load(&opts.proxy, &opts.data_dir)?);
    let tls = tls_config(host.profile(), &info)?;
    let settings = jaunt_agent::AgentSettings::new(config, tls);
    let (tx, rx) = crossbeam_channel::unbounded();

    // SIGTERM/SIGINT: drain and stop. SIGHUP: re-read the config file, announce its labels and
    // services without dropping a tunnel.
    {
        let tx = tx.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ])
        .context("installing signal handlers")?;
        let running = config.clone();
        let config_file = opts.config_file.clone();
        std::thread::spawn(move || {
            for signal in signals.forever() {
                if signal != signal_hook::consts::SIGHUP {
                    let _ = tx.send(jaunt_agent::AgentCommand::Shutdown);
                    return;
                }
                if let Some(command) = reload_command(config_file.as_deref(), &running) {
                    if tx.send(command).is_err() {
                        return;
                    }
                }
            }
        });
    }
    // Policy: ask control once before the agent starts (so it is in force before the first
    // tunnel can carry a stream), then every few seconds on a thread; a new version is compiled
    // here, off the agent's executor, and swapped in whole.
    {
        let tx = tx.clone();
        let host = Arc::clone(&host);
        let mut poller = PolicyPoller::default();
        poller.poll(&host, &tx);
        std::thread::Builder::new()
            .name("jaunt-agent-policy".into())
            .spawn(move || loop {
                std::thread::sleep(policy_delay(poller.failures));
                if !poller.poll(&host, &tx) {
                    return;
                }
            })
            .context("starting the policy thread")?;
    }
    // Renewal: look every minute; renew in the last third of the lifetime.
    {
        let tx = tx.clone();
        let host = Arc::clone(&host);
        std::thread::spawn(move || loop {
            std::thread::sleep(RENEW_CHECK_INTERVAL);
            if !needs_renewal(&info, unix_now()) {
                continue;
            }
            match host
                .renew()
                .and_then(|fresh| Ok((tls_config(host.profile(), &fresh)?, fresh)))
            {
                Ok((tls, fresh)) => {
                    info = fresh;
                    if tx.send(jaunt_agent::AgentCommand::ReplaceTls(tls)).is_err() {
                        return;
                    }
                    eprintln!(
                        "jaunt agent: host certificate renewed until {}",
                        crate::audit::rfc3339(info.identity.expires)
                    );
                }
                Err(e) => eprintln!("jaunt agent: renewal failed (will retry): {e:#}"),
            }
        });
    }
    // Recordings: the spool in DATA_DIR/recordings and the thread that uploads finished ones
    // to control (deleting each only once control has stored it).
    let (_uploader_stop, uploader_stopped) = crossbeam_channel::bounded::<()>(0);
    let opened = jaunt_agent::recording::Spool::open(
        &crate::recordings::upload::spool_dir(&opts.data_dir),
        jaunt_agent::recording::SpoolLimits::default(),
    );
    // The same spool (one byte count) is where the SSH termination writes.
    let ssh_spool = opened.as_ref().ok().cloned();
    match opened {
        Ok(spool) => {
            let host = Arc::clone(&host);
            std::thread::Builder::new()
                .name("jaunt-agent-recordings".into())
                .spawn(move || {
                    let connect = || -> anyhow::Result<Client> { Ok(host.client()) };
                    crate::recordings::upload::run(
                        &spool,
                        &connect,
                        &uploader_stopped,
                        crate::recordings::upload::IDLE_POLL,
                    );
                })
                .context("starting the recordings uploader")?;
        }
        Err(e) => eprintln!("jaunt agent: recordings spool unusable, nothing is uploaded: {e}"),
    }
    eprintln!(
        "jaunt agent: {} serving as {} through {}",
        opts.name,
        host.user(),
        opts.proxy
    );
    if let Some(addr) = &config.metrics_addr {
        let bound = crate::agent_metrics::start(&addr.to_string())?;
        eprintln!("jaunt agent: metrics on http://{bound}/metrics");
    }
    let mut hooks = agent_hooks(&host);
    hooks.ssh = ssh_recording(&host, ssh_spool);
    jaunt_agent::run_with_policy(settings, hooks, jaunt_agent::PolicyMode::Enforce, rx)
        .map_err(|e| anyhow!("agent: {e}"))
}

/// The hooks `jaunt agent` runs the agent with: certificates and tokens from control, and
/// recorders that send the audit events to control's audit log (and log them as the default
/// recorders do; the default recorders alone if the sender cannot start).
pub fn agent_hooks(host: &Arc<HostClient>) -> AgentHooks {
    let recorders = match audit::AgentAuditRecorder::start(
        audit::ControlPoster {
            host: Arc::clone(host),
        },
        audit::DEFAULT_QUEUE_CAPACITY,
    ) {
        Ok(recorder) => AgentHooks {
            db_queries: recorder.clone(),
            app_requests: recorder.clone(),
            ssh_events: recorder.clone(),
            denials: recorder,
            ..AgentHooks::default()
        },
        Err(e) => {
            tracing::error!(error = %e, "audit: cannot start the event sender; queries and app requests are only logged");
            AgentHooks::default()
        }
    };
    AgentHooks {
        db_certs: Some(Arc::new(certs::ControlDbCerts {
            host: Arc::clone(host),
        })),
        app_tokens: Some(Arc::new(certs::ControlAppTokens {
            host: Arc::clone(host),
        })),
        ..recorders
    }
}

/// SSH termination for `jaunt agent`: certificates from control, recordings into `spool`
/// (the one the uploader drains). `None` (every SSH session spliced, unrecorded; strict roles
/// refused) without a spool.
pub fn ssh_recording(
    host: &Arc<HostClient>,
    spool: Option<jaunt_agent::recording::Spool>,
) -> Option<jaunt_agent::SshRecording> {
    let Some(spool) = spool else {
        eprintln!("jaunt agent: SSH sessions will not be recorded (strict roles refuse them)");
        return None;
    };
    Some(jaunt_agent::SshRecording {
        certs: Arc::new(certs::ControlSshCerts {
            host: Arc::clone(host),
        }),
        spool,
        live: jaunt_agent::LiveSessions::default(),
    })
}

/// The policy thread's state: fetches `GET /v1/agent/policy` (at start and every
/// [`POLICY_POLL_INTERVAL`], backing off from [`POLICY_RETRY_BASE`] to [`POLICY_RETRY_CAP`]
/// while it fails) and sends each new version to the agent. A policy that does not compile is
/// refused and the previous one stays.
#[derive(Default)]
struct PolicyPoller {
    current: Option<String>,
    failures: u32,
    /// The CA generation this agent has applied (trust written, certificate renewed if asked):
    /// sent back on every poll so control knows it follows the current rotation phase.
    confirmed: String,
    /// The engines last handed to the agent ([`jaunt_agent::AgentCommand::SetEngines`]).
    engines: Vec<String>,
}

impl PolicyPoller {
    /// One fetch; `false` once the agent is gone.
    fn poll(
        &mut self,
        host: &HostClient,
        tx: &crossbeam_channel::Sender<jaunt_agent::AgentCommand>,
    ) -> bool {
        let fetched = fetch_policy(host, &self.confirmed, &self.engines).and_then(|response| {
            if self.current.as_deref() == Some(response.version.as_str()) {
                return Ok(None);
            }
            let policy = jaunt_agent::ClusterPolicy::from_response(&response)
                .map_err(|e| anyhow!("the cluster's policy is not usable: {e}"))?;
            Ok(Some((response, policy)))
        });
        match fetched {
            Ok(None) => self.failures = 0,
            Ok(Some((response, policy))) => {
                self.failures = 0;
                if response.ca_generation != self.confirmed {
                    match follow_rotation(host, &response, tx) {
                        Ok(true) => {
                            // Database certificates issued before the phase change may come
                            // from a CA that signs no more or is no longer trusted.
                            if !self.confirmed.is_empty()
                                && tx.send(jaunt_agent::AgentCommand::ForgetDbCerts).is_err()
                            {
                                return false;
                            }
                            self.confirmed = response.ca_generation.clone();
                            // Confirm at once rather than at the next poll.
                            let _ = fetch_policy(host, &self.confirmed, &self.engines);
                        }
                        Ok(false) => return false,
                        Err(e) => {
                            // Not confirmed: the next poll (a new version is not needed)
                            // tries again.
                            eprintln!(
                                "jaunt agent: following the CA rotation failed (will retry): {e:#}"
                            );
                            self.failures = self.failures.saturating_add(1);
                            return true;
                        }
                    }
                }
                let first = self.current.is_none();
                self.current = Some(response.version.clone());
                let command = jaunt_agent::AgentCommand::ReplacePolicy(std::sync::Arc::new(policy));
                if tx.send(command).is_err() {
                    return false;
                }
                // Every engine of the cluster: the agent keeps tunnels to each.
                let mut engines = response.engines.clone();
                engines.sort();
                if engines != self.engines && !engines.is_empty() {
                    self.engines = engines.clone();
                    if tx
                        .send(jaunt_agent::AgentCommand::SetEngines(engines))
                        .is_err()
                    {
                        return false;
                    }
                }
                if first {
                    eprintln!(
                        "jaunt agent: cluster policy received ({} roles, {} locks): user \
                         streams are re-checked here",
                        response.roles.len(),
                        response.locks.len()
                    );
                }
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                // The first failure and then every tenth, so an outage does not flood the log.
                if self.failures == 1 || self.failures.is_multiple_of(10) {
                    eprintln!(
                        "jaunt agent: cannot get the cluster's policy (will retry; {}): {e:#}",
                        if self.current.is_some() {
                            "the last one stays in force"
                        } else {
                            "user streams are refused until it arrives"
                        }
                    );
                }
            }
        }
        true
    }
}

/// The fallback poll's interval: [`POLICY_POLL_INTERVAL`], or `JAUNT_AGENT_POLICY_POLL_SECS`
/// when set (engines push every change over the tunnel, so the poll only covers a push that
/// could not be delivered; tests set it high to see that the push alone is enough).
fn policy_poll_interval() -> Duration {
    std::env::var("JAUNT_AGENT_POLICY_POLL_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&secs| secs > 0)
        .map_or(POLICY_POLL_INTERVAL, Duration::from_secs)
}

/// How long the policy thread waits after `failures` failed fetches in a row.
pub fn policy_delay(failures: u32) -> Duration {
    if failures == 0 {
        return policy_poll_interval();
    }
    let doublings = failures.saturating_sub(1).min(16);
    POLICY_RETRY_BASE
        .saturating_mul(1u32 << doublings)
        .min(POLICY_RETRY_CAP)
}

/// One `GET /v1/agent/policy` with the host client (renewal reloads it), confirming the CA
/// generation `confirmed` this agent has applied. Asks the configured proxy first, then the
/// cluster's other engines: with the configured one down, the policy still comes from another.
fn fetch_policy(
    host: &HostClient,
    confirmed: &str,
    engines: &[String],
) -> anyhow::Result<AgentPolicyResponse> {
    let path = if confirmed.is_empty() {
        "/v1/agent/policy".to_string()
    } else {
        format!("/v1/agent/policy?confirmed={confirmed}")
    };
    let mut first_error = None;
    let others = engines.iter().filter(|e| *e != host.proxy());
    for proxy in std::iter::once(host.proxy()).chain(others.map(String::as_str)) {
        let client = if proxy == host.proxy() {
            Ok(host.client())
        } else {
            host.client_to(proxy)
        };
        let fetched = client
            .map_err(anyhow::Error::from)
            .and_then(|client| Ok(client.get_json(&path)?));
        match fetched {
            Ok(response) => return Ok(response),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| anyhow!("no engine to ask")))
}

/// Writes the host CAs a policy names (`AgentPolicyResponse::host_ca`, PEM) to `profile`'s host
/// CA file, the trust for the engine's certificate, unless it holds them already; `Ok(true)`
/// when it wrote. Nothing to write when `host_ca` is empty. The first step of
/// [`apply_rotation`].
pub fn write_host_ca(profile: &Profile, host_ca: &[String]) -> anyhow::Result<bool> {
    if host_ca.is_empty() {
        return Ok(false);
    }
    let bundle: String = host_ca
        .iter()
        .map(|pem| format!("{}\n", pem.trim_end()))
        .collect();
    let path = profile.host_ca_path();
    if std::fs::read_to_string(&path).ok().as_deref() == Some(bundle.as_str()) {
        return Ok(false);
    }
    crate::profile::write_private(&path, bundle.as_bytes())?;
    Ok(true)
}

/// What [`apply_rotation`] changed.
#[derive(Default)]
pub struct Followed {
    /// The TLS for the agent's next tunnels, when the trust or the certificate changed.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The host identity, when its certificate was renewed.
    pub renewed: Option<ProfileInfo>,
}

/// A CA rotation phase as an agent follows it, with no restart and no token: the host CAs the
/// policy names become the trust for the engine's certificate (written to the host profile),
/// and when control says the host certificate is not from the signing host CA
/// (`update_servers`, `rollback`) it is renewed now. The host client is reloaded with each
/// change. The user CAs travel in the policy itself. The one implementation for `jaunt agent`
/// and loadtest's emulated agents.
pub fn apply_rotation(
    host: &HostClient,
    response: &AgentPolicyResponse,
) -> anyhow::Result<Followed> {
    let profile = host.profile();
    let Some(mut info) = profile.load()? else {
        bail!("the host identity is gone from {}", profile.dir.display());
    };
    let mut changed = false;
    let mut renewed = None;
    if write_host_ca(profile, &response.host_ca)? {
        host.reload()?;
        changed = true;
    }
    if response.renew_host_cert {
        info = host.renew()?;
        renewed = Some(info.clone());
        changed = true;
    }
    let tls = if changed {
        Some(tls_config(profile, &info)?)
    } else {
        None
    };
    Ok(Followed { tls, renewed })
}

/// [`apply_rotation`] for `jaunt agent`: new tunnels' TLS replaced. `Ok(false)` once the agent
/// is gone.
fn follow_rotation(
    host: &HostClient,
    response: &AgentPolicyResponse,
    tx: &crossbeam_channel::Sender<jaunt_agent::AgentCommand>,
) -> anyhow::Result<bool> {
    let followed = apply_rotation(host, response)?;
    if let Some(info) = &followed.renewed {
        eprintln!(
            "jaunt agent: host certificate re-issued by the rotated host CA (until {})",
            crate::audit::rfc3339(info.identity.expires)
        );
    }
    if let Some(tls) = followed.tls {
        if tx.send(jaunt_agent::AgentCommand::ReplaceTls(tls)).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// SIGHUP: the [`jaunt_agent::AgentCommand::Reload`] for the re-read config file, or `None`
/// (logged) when there is no file to re-read (`jaunt agent` flags cannot change) or it does not
/// load. The proxy address and the node name need a restart: a change to them is named and the
/// rest of the file still applies.
fn reload_command(
    path: Option<&std::path::Path>,
    running: &jaunt_config::file::AgentConfig,
) -> Option<jaunt_agent::AgentCommand> {
    let Some(path) = path else {
        eprintln!(
            "jaunt agent: SIGHUP: nothing to reload (started from flags, which cannot change; \
             start from a config file with `jaunt start --config agent.yaml` to reload it)"
        );
        return None;
    };
    let agent = match jaunt_config::file::load(path) {
        Ok(config) => match config.agent {
            Some(agent) => agent,
            None => {
                eprintln!(
                    "jaunt agent: reloading {} failed (the current services stay): the file no \
                     longer has an agent section",
                    path.display()
                );
                return None;
            }
        },
        Err(e) => {
            eprintln!(
                "jaunt agent: reloading {} failed (the current services stay): {e}",
                path.display()
            );
            return None;
        }
    };
    for (key, differs) in [
        ("agent.proxy_addr", agent.proxy_addr != running.proxy_addr),
        ("agent.name", agent.name != running.name),
    ] {
        if differs {
            eprintln!(
                "jaunt agent: {key} changed in {}: it applies after a restart, not on SIGHUP",
                path.display()
            );
        }
    }
    eprintln!(
        "jaunt agent: reloaded {}: announcing {} app(s), {} database(s){}",
        path.display(),
        agent.services.apps.len(),
        agent.services.dbs.len(),
        if agent.services.ssh.is_some() {
            " and ssh"
        } else {
            ""
        }
    );
    Some(jaunt_agent::AgentCommand::Reload {
        labels: agent.labels,
        services: agent.services,
    })
}

fn tls_config(
    profile: &Profile,
    info: &ProfileInfo,
) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    let (chain, key) = profile.tls_identity(&info.user)?;
    let roots = profile.host_ca()?;
    jaunt_agent::client_config(chain, key, &roots).map_err(|e| anyhow!("host TLS: {e}"))
}

/// Refuses, at start, services the host's join token does not cover: control issues database
/// client certificates only to hosts that joined with a `db` token and app JWTs only to `app`
/// hosts, so such a service would be listed and then fail every user's connection.
pub fn check_services(
    roles: &[String],
    config: &jaunt_config::file::AgentConfig,
) -> anyhow::Result<()> {
    use jaunt_config::file::AppProtocol;
    let has = |role: &str| roles.iter().any(|r| r == role);
    let mut missing = Vec::new();
    if !has(DB_HOST_ROLE) {
        if let Some(db) = config.services.dbs.first() {
            missing.push((DB_HOST_ROLE, format!("database {}", db.name)));
        }
    }
    if !has(APP_HOST_ROLE) {
        if let Some(app) = config
            .services
            .apps
            .iter()
            .find(|a| a.protocol != AppProtocol::Tcp)
        {
            missing.push((APP_HOST_ROLE, format!("web app {}", app.name)));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let needed: Vec<&str> = missing.iter().map(|(role, _)| *role).collect();
    let what: Vec<&str> = missing.iter().map(|(_, what)| what.as_str()).collect();
    let mut types: Vec<String> = roles.to_vec();
    types.extend(needed.iter().map(|r| r.to_string()));
    bail!(
        "this agent joined with a token of type {} and cannot serve {} (that needs a token of \
         type {}): create one with `jaunt tokens add --type {}` and restart the agent with \
         --token NEW_TOKEN, or remove the {}",
        if roles.is_empty() {
            "(none)".to_string()
        } else {
            roles.join(",")
        },
        what.join(" and "),
        needed.join(" and "),
        types.join(","),
        if missing.len() == 1 {
            "service"
        } else {
            "services"
        },
    )
}

/// Where the agent keeps the SHA-256 of the token it joined with, so that a restart with the
/// same `--token` (a unit file that keeps it) is a plain restart and a different one joins again.
fn joined_token_path(data_dir: &std::path::Path) -> PathBuf {
    host_profile(data_dir).dir.join("joined-token.sha256")
}

fn token_digest(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

/// Loads the stored host identity, or joins with the token to get one. A token other than the
/// one the stored identity joined with joins again (new types, a new host id); if that join
/// fails the agent stops with the reason instead of carrying on with the old identity.
pub fn ensure_identity(opts: &AgentOptions) -> anyhow::Result<ProfileInfo> {
    let profile = host_profile(&opts.data_dir);
    if let Some(info) = profile.load()? {
        let joined_with = std::fs::read_to_string(joined_token_path(&opts.data_dir)).ok();
        let new_token = opts
            .token
            .as_deref()
            .filter(|t| joined_with.as_deref().map(str::trim) != Some(token_digest(t).as_str()));
        if new_token.is_some() {
            eprintln!(
                "jaunt agent: --token differs from the token this agent joined with (host {}): \
                 joining again with it",
                info.user
            );
            return join(opts, &profile).map_err(|e| {
                anyhow!(
                    "{e:#}\nthe new --token was not used and the stored identity (host {}) is \
                     unchanged; start without --token to keep using it",
                    info.user
                )
            });
        }
        if info.identity.expires > unix_now() {
            return Ok(info);
        }
        eprintln!("jaunt agent: the stored host certificate expired; joining again");
    }
    join(opts, &profile)
}

fn join(opts: &AgentOptions, profile: &Profile) -> anyhow::Result<ProfileInfo> {
    let Some(token) = opts.token.as_deref() else {
        bail!(
            "this agent has not joined yet ({} holds no identity): pass --token (from `jaunt tokens add`)",
            profile.dir.display()
        );
    };
    let trust = match (&opts.ca_pin, opts.insecure) {
        (Some(pin), _) => Trust::Pin(pin.clone()),
        (None, true) => Trust::Insecure,
        (None, false) => bail!("pass --ca-pin sha256:... (printed by `jaunt tokens add`) so the agent knows it joins the right cluster, or --insecure for a throwaway test cluster"),
    };
    let client = Client::new(&opts.proxy, trust, None)?;
    let _ping: PingResponse = client
        .get_json("/v1/ping")
        .context("reaching the cluster")?;
    let keys = LocalKeys::generate()?;
    let certs: Certs = client
        .post_json(
            "/v1/join",
            &JoinRequest {
                token: token.to_string(),
                host_name: opts.name.clone(),
                tls_public_key: keys.tls_public_pem.clone(),
                ssh_public_key: keys.ssh_public_line(),
            },
        )
        .context("joining the cluster")?;
    let info = profile.save(&opts.proxy, &keys, &certs)?;
    std::fs::write(joined_token_path(&opts.data_dir), token_digest(token))
        .with_context(|| format!("writing {}", joined_token_path(&opts.data_dir).display()))?;
    eprintln!(
        "jaunt agent: joined {} as host {} ({}, type {})",
        info.cluster,
        info.user,
        opts.name,
        info.identity.roles.join(",")
    );
    Ok(info)
}

/// True when `info`'s certificate should be renewed at `now`.
pub fn needs_renewal(info: &ProfileInfo, now: u64) -> bool {
    let lifetime = info
        .identity
        .expires
        .saturating_sub(info.identity.not_before)
        .max(1);
    let left = info.identity.expires.saturating_sub(now);
    (left as f64) < (lifetime as f64) * RENEW_AT_REMAINING_FRACTION
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(text: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("label {pair:?}: expected key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Parses `NAME=URI`.
pub fn parse_named(text: &str, what: &str) -> anyhow::Result<(String, String)> {
    let (name, uri) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("{what} {text:?}: expected NAME=URI"))?;
    if name.is_empty() || uri.is_empty() {
        bail!("{what} {text:?}: expected NAME=URI");
    }
    Ok((name.to_string(), uri.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn renewal_starts_in_the_last_third() {
        let mut info: ProfileInfo = serde_json::from_value(serde_json::json!({
            "proxy": "p:1", "user": "h", "cluster": "c",
            "identity": {"kind": "host", "name": "h", "cluster": "c", "not_before": 0, "expires": 300}
        }))
        .unwrap();
        assert!(!needs_renewal(&info, 100));
        assert!(!needs_renewal(&info, 199));
        assert!(needs_renewal(&info, 201));
        info.identity.expires = 0;
        assert!(needs_renewal(&info, 0));
    }

    #[test]
    fn policy_fetches_back_off_and_cap() {
        assert_eq!(policy_delay(0), POLICY_POLL_INTERVAL);
        assert_eq!(policy_delay(1), POLICY_RETRY_BASE);
        assert_eq!(policy_delay(2), POLICY_RETRY_BASE * 2);
        assert_eq!(policy_delay(5), POLICY_RETRY_BASE * 16);
        assert_eq!(policy_delay(6), POLICY_RETRY_CAP);
        assert_eq!(policy_delay(u32::MAX), POLICY_RETRY_CAP);
    }

    #[test]
    fn flags_parse() {
        assert_eq!(parse_labels("env=prod, team=db").unwrap().len(), 2);
        assert!(parse_labels("oops").is_err());
        assert_eq!(
            parse_named("grafana=http://127.0.0.1:3000", "app")
                .unwrap()
                .0,
            "grafana"
        );
        assert!(parse_named("=x", "app").is_err());
    }
}
