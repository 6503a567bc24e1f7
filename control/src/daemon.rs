//! `jaunt start`: open the store, load or create the CAs, serve the control API, and stop
//! cleanly on SIGTERM or SIGINT.
//!
//! Listeners: the control API always listens on `control.listen_addr` (mTLS, ALPN
//! `jaunt-control`). Until the engine serves the public port, the same API is also served
//! directly on the public address, so `jaunt login --proxy PUBLIC_ADDR` works in both worlds:
//! clients always offer ALPN `jaunt-control`, which the engine passes through untouched.
//!
//! Files written to the data directory: `jaunt.db` (the store), `control.addr` and `public.addr`
//! (the bound addresses, so port 0 works), `admin/` (the local admin identity the admin verbs use
//! on this host) and, in dev mode, `admin-password` (0600).

use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use jaunt_config::api::{Certs, ALPN_CONTROL};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};

use crate::auth;
use crate::ca::{self, LocalKeys};
use crate::http::{self, Limits};
use crate::profile::{self, Profile};
use crate::service::{Control, Settings, LOCAL_ADMIN};
use crate::store::{Store, StoredUser};

/// The local admin identity lives a year and is re-issued at every start.
pub const ADMIN_TTL_SECS: u64 = 365 * 24 * 3600;
/// The control API's own server certificate, re-issued at every start.
pub const SERVER_CERT_TTL_SECS: u64 = 365 * 24 * 3600;

/// What `jaunt start` runs with, whether it came from `--dev` or a config file.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub cluster: String,
    pub data_dir: PathBuf,
    /// What users and agents dial (HOST:PORT). Port 0 means "whatever the public listener got".
    pub public_addr: String,
    /// Where to bind the public port.
    pub public_listen: String,
    /// Where to bind the control API.
    pub control_listen: String,
    pub second_factor: bool,
    pub user_ttl_secs: u64,
    pub host_ttl_secs: u64,
    pub dev: bool,
}

/// Runs until SIGTERM or SIGINT; returns after a clean shutdown.
pub fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    profile::create_private_dir(&cfg.data_dir)?;
    let store = Arc::new(
        Store::open(&cfg.data_dir.join("jaunt.db"))
            .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?,
    );
    let public_listener = bind(&cfg.public_listen, "public address")?;
    let public_bound = public_listener.local_addr()?;
    let public_addr = advertised(&cfg.public_addr, public_bound.port());
    let control_listener = bind(&cfg.control_listen, "control.listen_addr")?;
    let control_bound = control_listener.local_addr()?;

    let settings = Settings {
        cluster: cfg.cluster.clone(),
        public_addr: public_addr.clone(),
        second_factor: cfg.second_factor,
        user_ttl_secs: cfg.user_ttl_secs,
        host_ttl_secs: cfg.host_ttl_secs,
    };
    let control = Arc::new(Control::bootstrap(store.clone(), settings)?);
    let admin_password = if cfg.dev {
        Some(ensure_dev_admin(&control, &cfg)?)
    } else {
        None
    };

    // The control API's server certificate, from the host CA, for every name it is reached by.
    let host = host_part(&public_addr);
    let mut names = vec![
        host.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.dedup();
    let server_keys = LocalKeys::generate()?;
    let now = unix_now();
    let server_identity = Identity {
        kind: IdentityKind::Host,
        name: "jaunt-control".into(),
        roles: vec!["control".into()],
        logins: vec![],
        db_users: vec![],
        db_names: vec![],
        traits: Default::default(),
        cluster: cfg.cluster.clone(),
        not_before: now.saturating_sub(60),
        expires: now + SERVER_CERT_TTL_SECS,
        permit_pty: false,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
    };
    let leaf = control.cas.host.sign_x509(
        &server_identity,
        &ca::spki_pem_to_der(&server_keys.tls_public_pem)?,
        &names,
    )?;
    let chain = vec![leaf, control.cas.host.cert_der().clone()];
    let client_roots = vec![
        control.cas.user.cert_der().clone(),
        control.cas.host.cert_der().clone(),
    ];
    let tls = http::server_config(chain, server_keys.tls_private_der()?, client_roots)?;

    write_admin_identity(&control, &cfg, &control_bound.to_string())?;
    profile::write_private(
        &cfg.data_dir.join("control.addr"),
        format!("{control_bound}\n").as_bytes(),
    )?;
    profile::write_private(
        &cfg.data_dir.join("public.addr"),
        format!("{public_addr}\n").as_bytes(),
    )?;

    let handler: Arc<dyn Fn(&http::Request) -> http::Response + Send + Sync> = {
        let control = control.clone();
        Arc::new(move |req: &http::Request| control.handle(req))
    };
    let control_server = http::serve(
        control_listener,
        tls.clone(),
        handler.clone(),
        Limits::default(),
    )?;
    let public_server = http::serve(public_listener, tls, handler, Limits::default())?;

    print_banner(
        &cfg,
        &public_addr,
        &control_bound.to_string(),
        control.cas.host.pin(),
        admin_password.as_deref(),
    );
    tracing::info!(public = %public_bound, control = %control_bound, alpn = ALPN_CONTROL, "jaunt started");

    wait_for_shutdown_signal()?;
    tracing::info!("shutting down");
    public_server.shutdown();
    control_server.shutdown();
    println!("jaunt stopped");
    Ok(())
}

fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    let resolved: Vec<_> = addr
        .to_socket_addrs()
        .with_context(|| format!("{what} {addr}: cannot resolve"))?
        .collect();
    TcpListener::bind(resolved.as_slice()).with_context(|| format!("{what} {addr}: cannot listen"))
}

/// `HOST:PORT` with port 0 replaced by the port actually bound.
fn advertised(addr: &str, bound_port: u16) -> String {
    match addr.rsplit_once(':') {
        Some((host, "0")) => format!("{host}:{bound_port}"),
        _ => addr.to_string(),
    }
}

/// The host of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_part(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// In dev mode, an `admin` user with the `editor` and `access` roles whose password is in
/// `DATA_DIR/admin-password`; created once, kept across restarts.
fn ensure_dev_admin(control: &Control, cfg: &DaemonConfig) -> anyhow::Result<String> {
    let path = cfg.data_dir.join("admin-password");
    if let (Ok(existing), Ok(Some(_))) = (
        std::fs::read_to_string(&path),
        control.store.get_user(LOCAL_ADMIN),
    ) {
        return Ok(existing.trim().to_string());
    }
    let password = auth::random_password()?;
    let user = jaunt_config::resource::User::new(
        LOCAL_ADMIN,
        vec!["editor".into(), "access".into()],
        [("logins".to_string(), vec!["root".to_string()])]
            .into_iter()
            .collect(),
    );
    let stored = StoredUser {
        name: LOCAL_ADMIN.into(),
        spec: serde_json::to_string(&user)?,
        password_hash: auth::hash_password(&password)?,
        otp_secret: None,
        created: unix_now(),
    };
    if !control.store.insert_user(&stored)? {
        control
            .store
            .set_user_credentials(LOCAL_ADMIN, &stored.password_hash, None)?;
    }
    profile::write_private(&path, format!("{password}\n").as_bytes())?;
    Ok(password)
}

/// Issues the local admin identity (role `editor`) into `DATA_DIR/admin`.
fn write_admin_identity(
    control: &Control,
    cfg: &DaemonConfig,
    control_addr: &str,
) -> anyhow::Result<()> {
    let keys = LocalKeys::generate()?;
    let now = unix_now();
    let identity = Identity {
        kind: IdentityKind::User,
        name: LOCAL_ADMIN.into(),
        roles: vec!["editor".into()],
        logins: vec![],
        db_users: vec![],
        db_names: vec![],
        traits: Default::default(),
        cluster: cfg.cluster.clone(),
        not_before: now.saturating_sub(60),
        expires: now + ADMIN_TTL_SECS,
        permit_pty: false,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
    };
    let tls =
        control
            .cas
            .user
            .sign_x509(&identity, &ca::spki_pem_to_der(&keys.tls_public_pem)?, &[])?;
    let ssh = control
        .cas
        .user
        .sign_ssh(&identity, keys.ssh_key.public_key())?;
    let certs = Certs {
        identity,
        tls_cert: ca::cert_pem(&tls),
        ssh_cert: ssh.to_openssh()?,
        host_ca_tls: control.cas.host.cert_pem().to_string(),
        user_ca_tls: control.cas.user.cert_pem().to_string(),
        host_ca_ssh: control.cas.host.ssh_public_line(),
        user_ca_ssh: control.cas.user.ssh_public_line(),
    };
    Profile::admin(&cfg.data_dir).save(control_addr, &keys, &certs)?;
    Ok(())
}

fn print_banner(
    cfg: &DaemonConfig,
    public_addr: &str,
    control_addr: &str,
    pin: &str,
    admin_password: Option<&str>,
) {
    println!("Jaunt {} is running.", env!("CARGO_PKG_VERSION"));
    println!("  cluster:      {}", cfg.cluster);
    println!("  public addr:  {public_addr}");
    println!("  control API:  {control_addr}");
    println!("  data dir:     {}", cfg.data_dir.display());
    println!("  CA pin:       {pin}");
    if admin_password.is_some() {
        let pw = cfg.data_dir.join("admin-password");
        println!();
        println!("Log in as the dev admin (password in {}):", pw.display());
        println!(
            "  jaunt login --proxy {public_addr} --user admin --ca-pin {pin} --password-stdin < {}",
            pw.display()
        );
    }
    println!();
    println!(
        "Admin commands on this host: jaunt users add NAME --roles access --data-dir {}",
        cfg.data_dir.display()
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "signal received");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(advertised("127.0.0.1:0", 4321), "127.0.0.1:4321");
        assert_eq!(
            advertised("proxy.example.com:443", 4321),
            "proxy.example.com:443"
        );
        assert_eq!(host_part("[::1]:443"), "::1");
        assert_eq!(host_part("proxy.example.com:443"), "proxy.example.com");
    }
}
