//! `jaunt ssh` and `jaunt config`: the system OpenSSH client driven with the Jaunt certificate.
//!
//! - `jaunt ssh [FLAGS] [LOGIN@]NODE [COMMAND]`: OpenSSH's common flags (`-t`/`-tt`/`-T`, `-L`,
//!   `-R`, `-D`, `-A`, `-N`, `-o`, `-v`, `-l`, `-p`) pass through to `ssh`; port and agent
//!   forwarding are refused here first when the certificate does not permit them (sshd enforces
//!   the same from the certificate's extensions). Without a login, the user's single login is
//!   used.
//! - `jaunt ssh LOGIN@KEY=VALUE[,KEY=VALUE] -- COMMAND`: the command on every node with those
//!   labels, at most `--parallel` at once, each output line prefixed with the node's name, a
//!   summary at the end; exit status 0 only if every node succeeded.
//! - A refused dial (no such node, access denied, a lock) is reported by `jaunt proxy ssh`
//!   (the `ProxyCommand`) in a file in `$JAUNT_HOME` named by [`DIAL_REPORT_ENV`]; `jaunt ssh`
//!   then prints that reason instead of OpenSSH's `kex_exchange_identification` noise.
//! - `jaunt config`: an OpenSSH config block (`Host *.<cluster>`) so plain `ssh`, `scp`,
//!   `rsync -e ssh`, `sftp` and Ansible reach nodes as `NODE.<cluster>`.
//! - [`ResourceFilter`]: the `KEY=VALUE` and `--search TEXT` filters of `jaunt ls` and fan-out.
//!
//! Not here: the byte pipe of `jaunt proxy ssh` (`access.rs`), `jaunt scp` (`cli.rs`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context as _};
use clap::{ArgAction, Args};
use jaunt_config::api::ResourceInfo;
use jaunt_config::identity::Identity;

use crate::client::{Client, Trust};
use crate::profile::{Profile, ProfileInfo};

/// Environment variable naming the file where `jaunt proxy ssh` writes why its dial was
/// refused (set by `jaunt ssh` for the `ssh` it runs).
pub const DIAL_REPORT_ENV: &str = "JAUNT_DIAL_REPORT";

/// Default bound of a label fan-out.
pub const DEFAULT_PARALLEL: usize = 16;

/// `jaunt ssh`.
#[derive(Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct SshArgs {
    /// Port of the node's sshd as the agent sees it (passed to ssh; the agent decides).
    #[arg(short = 'p', long)]
    pub port: Option<u16>,
    /// Login on the node (as LOGIN@ in the destination; that one wins).
    #[arg(short = 'l', value_name = "LOGIN")]
    pub login: Option<String>,
    /// Ask for a terminal; -tt forces one even without a local terminal.
    #[arg(short = 't', action = ArgAction::Count, conflicts_with = "no_tty")]
    pub tty: u8,
    /// No terminal.
    #[arg(short = 'T')]
    pub no_tty: bool,
    /// Forward a local port, [BIND:]PORT:HOST:HOSTPORT (needs a role with
    /// permit_port_forwarding; repeatable).
    #[arg(short = 'L', value_name = "SPEC")]
    pub local_forward: Vec<String>,
    /// Forward a remote port, [BIND:]PORT:HOST:HOSTPORT (needs permit_port_forwarding;
    /// repeatable).
    #[arg(short = 'R', value_name = "SPEC")]
    pub remote_forward: Vec<String>,
    /// A local SOCKS proxy, [BIND:]PORT (needs permit_port_forwarding; repeatable).
    #[arg(short = 'D', value_name = "SPEC")]
    pub dynamic_forward: Vec<String>,
    /// Forward your ssh-agent (needs a role with permit_agent_forwarding).
    #[arg(short = 'A')]
    pub forward_agent: bool,
    /// Run no command (for forwarding only).
    #[arg(short = 'N')]
    pub no_command: bool,
    /// An ssh option, KEY=VALUE (repeatable; see ssh_config(5)).
    #[arg(short = 'o', value_name = "KEY=VALUE")]
    pub options: Vec<String>,
    /// Verbose ssh (-v, -vv, -vvv).
    #[arg(short = 'v', action = ArgAction::Count)]
    pub verbose: u8,
    /// Label fan-out: at most this many nodes at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PARALLEL)]
    pub parallel: usize,
    /// [LOGIN@]NODE, or LOGIN@KEY=VALUE[,KEY=VALUE] for every node with those labels.
    pub destination: String,
    /// Command to run instead of a shell (after `--` if it has flags).
    #[arg(allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `jaunt ssh`.
pub fn ssh(args: SshArgs) -> anyhow::Result<ExitCode> {
    let profile = Profile::user_default();
    let (_, info) = crate::access::Dialer::from_profile(&profile)?;
    let (login, target) = match args.destination.rsplit_once('@') {
        Some((login, target)) => (Some(login.to_string()), target.to_string()),
        None => (args.login.clone(), args.destination.clone()),
    };
    if target.is_empty() {
        bail!("say which node: jaunt ssh LOGIN@NODE");
    }
    let login = match login {
        Some(login) if !login.is_empty() => login,
        _ => default_login(&info.identity, &target)?,
    };
    check_permitted(&args, &info.identity)?;
    let flags = ssh_flags(&args)?;
    if target.contains('=') {
        let filter = ResourceFilter::labels(&[target.as_str()])?;
        return fan_out(&profile, &info, &args, &flags, &login, &target, &filter);
    }
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(crate::cli::ssh_options(&profile, &info.user)?);
    cmd.args(&flags);
    cmd.arg("--").arg(format!("{login}@{target}"));
    cmd.args(&args.command);
    let report = DialReport::new(&profile, 0);
    cmd.env(DIAL_REPORT_ENV, &report.path);
    cmd.stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("cannot run ssh: is OpenSSH's client installed?")?;
    let relay = child.stderr.take().map(|stderr| {
        let report = report.path.clone();
        std::thread::spawn(move || relay_stderr(stderr, &report))
    });
    let status = child.wait()?;
    if let Some(relay) = relay {
        let _ = relay.join();
    }
    if let Some(reason) = report.take() {
        eprintln!("error: {reason}");
        return Ok(ExitCode::from(255));
    }
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(255)).unwrap_or(255),
    ))
}

/// The user's only login, or an error that lists the choices.
fn default_login(identity: &Identity, target: &str) -> anyhow::Result<String> {
    match identity.logins.as_slice() {
        [only] => Ok(only.clone()),
        [] => bail!(
            "your certificate carries no login, so you cannot log in to {target}: ask an \
             administrator for a role with logins, then run `jaunt login` again"
        ),
        many => bail!(
            "say which login to use: jaunt ssh LOGIN@{target} (yours: {})",
            many.join(", ")
        ),
    }
}

/// Port and agent forwarding need the roles' permission (the certificate's flags).
fn check_permitted(args: &SshArgs, identity: &Identity) -> anyhow::Result<()> {
    let option_key = |o: &String| {
        o.split(['=', ' ', '\t'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let forwarding_option = args.options.iter().map(option_key).find(|k| {
        matches!(
            k.as_str(),
            "localforward" | "remoteforward" | "dynamicforward"
        )
    });
    let wants_ports = !args.local_forward.is_empty()
        || !args.remote_forward.is_empty()
        || !args.dynamic_forward.is_empty()
        || forwarding_option.is_some();
    if wants_ports && !identity.permit_port_forwarding {
        bail!(
            "port forwarding (-L, -R, -D) is not permitted by your roles: it needs a role with \
             options.permit_port_forwarding: true (then run `jaunt login` again)"
        );
    }
    let agent_option = args.options.iter().any(|o| {
        option_key(o) == "forwardagent" && {
            let value = o[o.find(['=', ' ', '\t']).map_or(o.len(), |i| i + 1)..].trim();
            !value.eq_ignore_ascii_case("no")
        }
    });
    if (args.forward_agent || agent_option) && !identity.permit_agent_forwarding {
        bail!(
            "agent forwarding (-A) is not permitted by your roles: it needs a role with \
             options.permit_agent_forwarding: true (then run `jaunt login` again)"
        );
    }
    Ok(())
}

/// The pass-through flags for `ssh`, in its own syntax.
fn ssh_flags(args: &SshArgs) -> anyhow::Result<Vec<String>> {
    let mut flags = Vec::new();
    for _ in 0..args.tty {
        flags.push("-t".to_string());
    }
    if args.no_tty {
        flags.push("-T".into());
    }
    for (flag, specs) in [
        ("-L", &args.local_forward),
        ("-R", &args.remote_forward),
        ("-D", &args.dynamic_forward),
    ] {
        for spec in specs {
            flags.push(flag.into());
            flags.push(spec.clone());
        }
    }
    if args.forward_agent {
        flags.push("-A".into());
    }
    if args.no_command {
        flags.push("-N".into());
    }
    for option in &args.options {
        let key = option.split(['=', ' ', '\t']).next().unwrap_or_default();
        if key.is_empty() || key.len() == option.len() {
            bail!("-o {option:?}: expected KEY=VALUE, e.g. -o ServerAliveInterval=30");
        }
        flags.push("-o".into());
        flags.push(option.clone());
    }
    if args.verbose > 0 {
        flags.push(format!("-{}", "v".repeat(usize::from(args.verbose.min(3)))));
    }
    if let Some(port) = args.port {
        flags.push("-p".into());
        flags.push(port.to_string());
    }
    Ok(flags)
}

/// Copies ssh's stderr to ours, unless the dial was refused: then what ssh says about the
/// closed proxy is noise next to the reason `jaunt ssh` prints.
fn relay_stderr(mut from: impl Read, report: &Path) {
    let stderr = std::io::stderr();
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // `jaunt proxy ssh` writes its report before it exits, and ssh speaks of the closed
        // proxy only after that exit.
        if report.exists() {
            continue;
        }
        let mut out = stderr.lock();
        let _ = out.write_all(&buf[..n]);
        let _ = out.flush();
    }
}

/// Where one `ssh` run's `jaunt proxy ssh` reports a refused dial: a file in `$JAUNT_HOME`
/// (private to the user), removed when read.
struct DialReport {
    path: PathBuf,
}

impl DialReport {
    fn new(profile: &Profile, index: usize) -> DialReport {
        let path = profile
            .dir
            .join(format!("dial-report.{}.{index}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        DialReport { path }
    }

    /// The refusal, if the dial was refused.
    fn take(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let _ = std::fs::remove_file(&self.path);
        Some(text.trim().to_string())
    }
}

impl Drop for DialReport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The user-facing text of an engine refusal: an unknown node points at `jaunt ls`.
pub fn refusal_text(kind_noun: &str, error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    if text.starts_with(&format!("no such {kind_noun} ")) {
        format!("{text}; see `jaunt ls`")
    } else {
        text
    }
}

/// Writes a refused dial's reason where `jaunt ssh` looks for it (if it ran us).
pub fn report_refusal(reason: &str) {
    if let Some(path) = std::env::var_os(DIAL_REPORT_ENV) {
        let _ = std::fs::write(path, reason);
    }
}

/// A control API client as the logged-in user.
pub fn user_client(profile: &Profile, info: &ProfileInfo) -> anyhow::Result<Client> {
    Ok(Client::new(
        &info.proxy,
        Trust::Roots(profile.host_ca()?),
        Some(profile.tls_identity(&info.user)?),
    )?)
}

/// Runs the command on every node matching `filter`, `--parallel` at a time.
fn fan_out(
    profile: &Profile,
    info: &ProfileInfo,
    args: &SshArgs,
    flags: &[String],
    login: &str,
    selector: &str,
    filter: &ResourceFilter,
) -> anyhow::Result<ExitCode> {
    if args.command.is_empty() {
        bail!("say what to run on every node with {selector}: jaunt ssh {login}@{selector} -- COMMAND");
    }
    if args.tty > 0 {
        bail!("-t: a label fan-out runs commands without a terminal");
    }
    // Only the nodes this user may reach (an older control ignores the parameter).
    let inventory: Vec<ResourceInfo> =
        user_client(profile, info)?.get_json("/v1/inventory?reachable=1")?;
    let nodes: Vec<String> = inventory
        .iter()
        .filter(|r| r.kind == "node" && filter.matches(r))
        .map(|r| r.name.clone())
        .collect();
    if nodes.is_empty() {
        bail!("no node has the labels {selector}; see `jaunt ls {selector}`");
    }
    let options = crate::cli::ssh_options(profile, &info.user)?;
    let next = AtomicUsize::new(0);
    let results: Mutex<BTreeMap<usize, Result<(), String>>> = Mutex::new(BTreeMap::new());
    let out = Mutex::new(());
    let workers = args.parallel.clamp(1, nodes.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(node) = nodes.get(i) else { break };
                let result = run_on_node(profile, &options, flags, login, node, i, args, &out);
                if let Ok(mut r) = results.lock() {
                    r.insert(i, result);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(i, r)| {
            r.as_ref()
                .err()
                .map(|why| format!("{} ({why})", nodes.get(*i).map_or("?", |n| n)))
        })
        .collect();
    let ok = nodes.len() - failed.len();
    if failed.is_empty() {
        eprintln!("jaunt: {} nodes: {ok} succeeded", nodes.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "jaunt: {} nodes: {ok} succeeded, {} failed: {}",
            nodes.len(),
            failed.len(),
            failed.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

/// One node of a fan-out: its output lines, prefixed, as they come.
#[allow(clippy::too_many_arguments)]
fn run_on_node(
    profile: &Profile,
    options: &[String],
    flags: &[String],
    login: &str,
    node: &str,
    index: usize,
    args: &SshArgs,
    out: &Mutex<()>,
) -> Result<(), String> {
    let report = DialReport::new(profile, index + 1);
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(options)
        .args(flags)
        .args(["-n", "-o", "BatchMode=yes", "--"])
        .arg(format!("{login}@{node}"))
        .args(&args.command)
        .env(DIAL_REPORT_ENV, &report.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run ssh: {e}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let report_path = report.path.clone();
    std::thread::scope(|s| {
        if let Some(stdout) = stdout {
            s.spawn(|| prefix_lines(stdout, node, false, out, None));
        }
        if let Some(stderr) = stderr {
            s.spawn(|| prefix_lines(stderr, node, true, out, Some(&report_path)));
        }
    });
    let status = child.wait().map_err(|e| e.to_string())?;
    if let Some(reason) = report.take() {
        let _guard = out.lock();
        eprintln!("{node}: error: {reason}");
        return Err("refused".into());
    }
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(format!("exit {code}")),
        None => Err("killed".into()),
    }
}

/// Copies lines from `from` to stdout (or stderr) with `node: ` in front; whole lines under
/// `out`'s lock so nodes never interleave within a line. Lines after a refused dial (the
/// report exists) are ssh's noise and dropped.
fn prefix_lines(
    from: impl Read,
    node: &str,
    to_stderr: bool,
    out: &Mutex<()>,
    report: Option<&Path>,
) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if report.is_some_and(Path::exists) {
            continue;
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let _guard = out.lock();
        let mut prefixed = format!("{node}: ").into_bytes();
        prefixed.extend_from_slice(&line);
        let _ = if to_stderr {
            std::io::stderr().write_all(&prefixed)
        } else {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&prefixed).and_then(|()| stdout.flush())
        };
    }
}

/// Which resources `jaunt ls` lists and a fan-out reaches: every `KEY=VALUE` must be among
/// the resource's labels, and `--search` text must occur (ignoring case) in its name, kind,
/// protocol, agent or a `key=value` label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceFilter {
    labels: Vec<(String, String)>,
    search: Option<String>,
}

impl ResourceFilter {
    /// From `KEY=VALUE[,KEY=VALUE]` arguments.
    pub fn labels(args: &[&str]) -> anyhow::Result<ResourceFilter> {
        let mut labels = Vec::new();
        for arg in args {
            for pair in arg.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow!("{pair:?}: expected KEY=VALUE"))?;
                if key.is_empty() {
                    bail!("{pair:?}: the label key is empty");
                }
                labels.push((key.to_string(), value.to_string()));
            }
        }
        Ok(ResourceFilter {
            labels,
            search: None,
        })
    }

    /// Also require `text` (ignoring case).
    pub fn with_search(mut self, text: Option<&str>) -> ResourceFilter {
        self.search = text.map(str::to_lowercase).filter(|t| !t.is_empty());
        self
    }

    /// Whether `resource` passes.
    pub fn matches(&self, resource: &ResourceInfo) -> bool {
        let labels_match = self
            .labels
            .iter()
            .all(|(k, v)| resource.labels.get(k) == Some(v));
        let search_match = self.search.as_ref().is_none_or(|text| {
            [
                &resource.name,
                &resource.kind,
                &resource.protocol,
                &resource.agent,
            ]
            .iter()
            .any(|field| field.to_lowercase().contains(text))
                || resource
                    .labels
                    .iter()
                    .any(|(k, v)| format!("{k}={v}").to_lowercase().contains(text))
        });
        labels_match && search_match
    }
}

/// `jaunt config`: the OpenSSH config block for the logged-in cluster.
pub fn config() -> anyhow::Result<()> {
    let profile = Profile::user_default();
    let (_, info) = crate::access::Dialer::from_profile(&profile)?;
    print!("{}", config_block(&profile, &info)?);
    Ok(())
}

fn config_block(profile: &Profile, info: &ProfileInfo) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the jaunt binary")?;
    let quote = |p: &Path| format!("\"{}\"", p.display());
    let home = std::env::var_os("JAUNT_HOME")
        .map(|home| {
            format!(
                "env JAUNT_HOME={} ",
                crate::cli::shell_quote(&PathBuf::from(home).display().to_string())
            )
        })
        .unwrap_or_default();
    Ok(format!(
        "# Jaunt cluster {cluster} through {proxy}, as {user} (from `jaunt config`).\n\
         # Nodes are NODE.{cluster}: ssh root@node1.{cluster}\n\
         Host *.{cluster}\n\
         \x20   UserKnownHostsFile {known_hosts}\n\
         \x20   GlobalKnownHostsFile /dev/null\n\
         \x20   StrictHostKeyChecking yes\n\
         \x20   IdentityFile {key}\n\
         \x20   CertificateFile {cert}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   ProxyCommand {home}{exe} proxy ssh %r@%h:%p\n",
        cluster = info.cluster,
        proxy = info.proxy,
        user = info.user,
        known_hosts = quote(&profile.known_hosts_path()),
        key = quote(&profile.ssh_key_path(&info.user)),
        cert = quote(&profile.ssh_cert_path(&info.user)),
        exe = crate::cli::shell_quote(&exe.display().to_string()),
    ))
}

/// The node name in a `ProxyCommand` host: `node1.<cluster>` (from `jaunt config`) is
/// `node1`.
pub fn node_name<'a>(host: &'a str, cluster: &str) -> &'a str {
    host.strip_suffix(cluster)
        .and_then(|h| h.strip_suffix('.'))
        .filter(|h| !h.is_empty())
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> ResourceInfo {
        ResourceInfo {
            kind: "node".into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            protocol: "ssh".into(),
            host_id: "h1".into(),
            agent: name.into(),
            shards: vec![0],
        }
    }

    #[test]
    fn label_and_search_filters() {
        let web = node("web1", &[("env", "prod"), ("team", "web")]);
        let db = node("db1", &[("env", "staging")]);
        let prod = ResourceFilter::labels(&["env=prod"]).unwrap();
        assert!(prod.matches(&web) && !prod.matches(&db));
        let both = ResourceFilter::labels(&["env=prod,team=web"]).unwrap();
        assert!(both.matches(&web));
        let other = ResourceFilter::labels(&["env=prod", "team=db"]).unwrap();
        assert!(!other.matches(&web));
        let search = ResourceFilter::default().with_search(Some("STAG"));
        assert!(search.matches(&db) && !search.matches(&web));
        assert!(ResourceFilter::default().matches(&web));
        assert!(ResourceFilter::labels(&["env"]).is_err());
        assert!(ResourceFilter::labels(&["=x"]).is_err());
    }

    #[test]
    fn cluster_suffix_is_stripped_from_node_names() {
        assert_eq!(
            node_name("node1.dev.jaunt.local", "dev.jaunt.local"),
            "node1"
        );
        assert_eq!(node_name("node1", "dev.jaunt.local"), "node1");
        assert_eq!(
            node_name("dev.jaunt.local", "dev.jaunt.local"),
            "dev.jaunt.local"
        );
        assert_eq!(
            node_name("xdev.jaunt.local", "dev.jaunt.local"),
            "xdev.jaunt.local"
        );
    }

    #[test]
    fn a_single_login_is_the_default() {
        let mut id: Identity = serde_json::from_value(serde_json::json!({
            "kind": "user", "name": "alice", "cluster": "c", "not_before": 0, "expires": 1,
            "logins": ["root"],
        }))
        .unwrap();
        assert_eq!(default_login(&id, "node1").unwrap(), "root");
        id.logins = vec!["root".into(), "deploy".into()];
        let err = default_login(&id, "node1").unwrap_err().to_string();
        assert!(
            err.contains("root, deploy") && err.contains("LOGIN@node1"),
            "{err}"
        );
        id.logins.clear();
        assert!(default_login(&id, "node1").is_err());
    }
}
