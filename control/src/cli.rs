//! The `jaunt` command line: the daemon (`start`), the admin verbs and the user verbs.
//!
//! Output contract (scripts rely on it): `tokens add` prints the token alone on its first line;
//! `--format json` prints machine-readable JSON on stdout; errors go to stderr as
//! `error: ...` with a non-zero exit code (1 for failures, 2 for usage errors).

use std::io::{BufRead as _, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use jaunt_config::api::*;
use jaunt_config::identity::{unix_now, Identity};
use jaunt_config::resource::Resource;

use crate::ca::LocalKeys;
use crate::client::{Client, ClientError, Trust};
use crate::daemon::{self, DaemonConfig};
use crate::profile::{self, Profile};
use crate::service::DEFAULT_TOKEN_TTL_SECS;

/// Jaunt: identity-aware access to servers, databases and apps through one TLS port, with
/// short-lived certificates instead of passwords or VPNs.
#[derive(Parser, Debug)]
#[command(
    name = "jaunt",
    version,
    propagate_version = true,
    max_term_width = 100
)]
#[command(after_help = "Run a dev cluster:   jaunt start --dev\n\
Log in:              jaunt login --proxy HOST:PORT --user NAME\n\
Docs: README.md and ARCHITECTURE.md in the source tree.")]
pub struct Cli {
    /// Data directory of the control host. Admin commands given --data-dir act as the local
    /// admin of that cluster; without it they use your `jaunt login` identity.
    #[arg(long, global = true, env = "JAUNT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Log filter for the daemon and the client (e.g. info, debug, jaunt_control=trace).
    #[arg(
        long,
        global = true,
        env = "JAUNT_LOG",
        default_value = "warn",
        value_name = "FILTER"
    )]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Jaunt daemon (control, engine and/or agent, as the config says).
    Start(StartArgs),
    /// Log in to a cluster: get short-lived X.509 and SSH certificates.
    Login(LoginArgs),
    /// Remove the keys and certificates `jaunt login` stored.
    Logout,
    /// Show your login (user, roles, logins, expiry), or with --data-dir the cluster's status.
    Status(FormatArg),
    /// Manage users (admin).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Manage join tokens for agents (admin).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Create or update resources (roles, users, tokens, locks) from a YAML file (admin).
    Create(CreateArgs),
    /// List resources: roles, users, tokens, locks, nodes, apps, dbs (admin).
    Get(GetArgs),
    /// Remove a resource: role/NAME, user/NAME, token/ID, lock/ID, node/NAME (a node that is not
    /// connected) (admin).
    Rm(RmArgs),
    /// Lock a user, role, node or login: refuses new logins and sessions (admin).
    Lock(LockArgs),
    /// Certificate authority operations (admin).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Search the audit log (admin).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Live sessions: list them, or end one (roles need the `session` rule: `list`, `delete`).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Watch a live SSH session read-only, as it happens (roles need the `session` rule:
    /// `join`). The session's user is told that an observer joined. Ctrl-C leaves.
    Join {
        /// The session id, as `jaunt sessions ls` shows it.
        id: String,
    },
    /// Session recordings stored by control (roles need the `recording` rule: `list`).
    #[command(subcommand)]
    Recordings(RecordingsCommand),
    /// Replay a session recording in the terminal (roles need the `recording` rule: `read`).
    Play {
        /// The recording id, as `jaunt recordings ls` shows it.
        id: String,
        /// Replay speed: 2 is twice as fast; 0 prints everything at once (as does a stdout
        /// that is not a terminal).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// text: the terminal output, replayed; cast: the asciicast v2 file; json: the events.
        #[arg(long, value_enum, default_value_t = PlayFormatArg::Text)]
        format: PlayFormatArg,
    },
    /// List the nodes, apps and databases you can reach (`jaunt ls nodes env=prod`).
    Ls {
        /// nodes, apps or dbs (default: all); or a first KEY=VALUE label filter.
        kind: Option<String>,
        /// Only resources with these labels (KEY=VALUE, comma-separated or repeated).
        #[arg(value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Only resources whose name, kind, protocol, agent or a label contains TEXT.
        #[arg(long, value_name = "TEXT")]
        search: Option<String>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// SSH to a node through the cluster with the system `ssh` and your certificate; with
    /// LOGIN@KEY=VALUE, run a command on every node with those labels.
    Ssh(crate::ssh_cmd::SshArgs),
    /// Print an OpenSSH config block for this cluster (append it to ~/.ssh/config): plain
    /// ssh, scp, rsync, sftp and Ansible then reach NODE.<cluster>.
    Config,
    /// Copy files to or from a node with the system `scp` (NODE:PATH as with scp; -r etc. pass through).
    #[command(trailing_var_arg = true)]
    Scp {
        /// Arguments for scp, e.g. `-r ./dir root@node1:/tmp/`.
        #[arg(allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Run an agent: join with a token (once), dial out to the proxy, serve SSH, apps and
    /// databases from this host.
    Agent(AgentArgs),
    /// Local proxies and pipes through the cluster.
    #[command(subcommand)]
    Proxy(ProxyCommand),
    /// Databases: connect with psql through the cluster.
    #[command(subcommand)]
    Db(DbCommand),
    /// Print the version.
    Version,
    /// Print a shell completion script: `jaunt completion bash > /etc/bash_completion.d/jaunt`,
    /// `jaunt completion zsh > "${fpath[1]}/_jaunt"`, `jaunt completion fish >
    /// ~/.config/fish/completions/jaunt.fish`.
    Completion {
        /// bash, zsh or fish.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false, id = "lock_target")]
struct LockTargetArgs {
    /// Lock this user.
    #[arg(long, group = "lock_target")]
    user: Option<String>,
    /// Lock everyone holding this role.
    #[arg(long, group = "lock_target")]
    role: Option<String>,
    /// Lock this node.
    #[arg(long, group = "lock_target")]
    node: Option<String>,
    /// Lock this OS login everywhere.
    #[arg(long, group = "lock_target")]
    login: Option<String>,
}

#[derive(Args, Debug)]
struct LockArgs {
    #[command(flatten)]
    target: LockTargetArgs,
    /// Lift the lock by itself after this long (default: until `jaunt rm lock/ID`).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Shown to the people the lock refuses.
    #[arg(long)]
    message: Option<String>,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// The cluster's public address.
    #[arg(long, value_name = "HOST:PORT")]
    proxy: String,
    /// Join token (from `jaunt tokens add`); needed only the first time.
    #[arg(long, env = "JAUNT_TOKEN", conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the join token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Join only a cluster whose CA has this pin (printed by `jaunt tokens add`).
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "insecure")]
    ca_pin: Option<String>,
    /// Join without checking the cluster's CA (dangerous: throwaway test clusters only).
    #[arg(long)]
    insecure: bool,
    /// This node's name (what users dial); default: the host name.
    #[arg(long)]
    name: Option<String>,
    /// Labels, e.g. env=prod,team=db.
    #[arg(long, default_value = "")]
    labels: String,
    /// Serve SSH by forwarding to this local sshd.
    #[arg(long, value_name = "HOST:PORT")]
    ssh: Option<String>,
    /// Serve an app: NAME=http://HOST:PORT or NAME=tcp://HOST:PORT (repeatable).
    #[arg(long = "app", value_name = "NAME=URI")]
    apps: Vec<String>,
    /// Serve a database: NAME=postgres://HOST:PORT (repeatable).
    #[arg(long = "db", value_name = "NAME=URI")]
    dbs: Vec<String>,
    /// Serve the agent's Prometheus /metrics (plain HTTP, unauthenticated) on this address,
    /// e.g. 127.0.0.1:9101 (port 0: any free port, printed).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ProxyCommand {
    /// A stdin/stdout pipe to a node's sshd: the ProxyCommand `jaunt ssh` gives ssh.
    Ssh {
        /// LOGIN@NODE[:PORT] (ssh's `%r@%h:%p`).
        target: String,
    },
    /// A local listener that forwards every connection to a TCP app through the cluster.
    Tcp {
        /// The app's name.
        name: String,
        /// Local port (0 or absent: any free port, printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// A local HTTP listener for a web app: any HTTP client (curl, a browser) connected to it
    /// reaches the app through the cluster as you; the app receives your identity in the
    /// `Jaunt-Jwt-Assertion` header (verify it with https://PROXY/.well-known/jwks.json).
    App {
        /// The app's name (`jaunt ls apps`).
        name: String,
        /// Local port (0 or absent: any free port, printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// A local PostgreSQL or MySQL listener (as the database speaks): any client (psql,
    /// mariadb, an IDE, an app) connected to it reaches the database through the cluster as
    /// --db-user, with no password and no TLS to the listener.
    Db {
        /// The database's name (`jaunt ls dbs`).
        name: String,
        /// Local port (0 or absent: any free port, printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// The database user to log in as (one of your certificate's db users).
        #[arg(long, value_name = "USER")]
        db_user: String,
        /// The database to open (one of your certificate's db names); default: the client's.
        #[arg(long, value_name = "NAME")]
        db_name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DbCommand {
    /// Run the database's client (psql; mariadb or mysql) connected to it through the cluster;
    /// exits with the client's exit code.
    #[command(trailing_var_arg = true)]
    Connect {
        /// The database's name (`jaunt ls dbs`).
        name: String,
        /// The database user to log in as (one of your certificate's db users).
        #[arg(long, value_name = "USER")]
        db_user: String,
        /// The database to open (one of your certificate's db names); default: the user's.
        #[arg(long, value_name = "NAME")]
        db_name: Option<String>,
        /// Arguments for the client, after `--` (e.g. `-- -tAc 'select 1'` for psql,
        /// `-- -e 'select 1'` for mariadb).
        #[arg(allow_hyphen_values = true)]
        psql_args: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct StartArgs {
    /// Config file (jaunt.yaml); see config/examples/.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Run a single-host dev cluster on an embedded default (SQLite in the data dir, no second
    /// factor, an admin user whose password is written to DATA_DIR/admin-password).
    #[arg(long)]
    dev: bool,
    /// Public address users and agents dial (dev mode). Port 0 picks a free port. `localhost`
    /// (listening on 127.0.0.1) gives web apps names: `<app>.localhost`.
    #[arg(long, value_name = "HOST:PORT", default_value = "localhost:3080")]
    public_addr: String,
    /// Diagnostics address for /metrics, /healthz and /readyz (served by the engine).
    #[arg(long, value_name = "HOST:PORT")]
    diag_addr: Option<String>,
    /// Replace the daemon running on the same data directory without refusing a connection:
    /// take over its listening sockets; it stops accepting, drains its live sessions and
    /// exits. Starts afresh if none runs. Same configuration needed (addresses, shards).
    #[arg(long)]
    takeover: bool,
    /// How long the daemon being replaced (--takeover) or stopped (SIGTERM) lets live sessions
    /// and tunnels go on before it cuts them (e.g. 30s, 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    drain_timeout: String,
}

#[derive(Args, Debug)]
struct LoginArgs {
    /// The cluster's public address.
    #[arg(long, value_name = "HOST:PORT", env = "JAUNT_PROXY")]
    proxy: String,
    /// Your user name.
    #[arg(long, env = "JAUNT_USER")]
    user: String,
    /// Read the password from standard input (one line) instead of prompting.
    #[arg(long)]
    password_stdin: bool,
    /// One-time code from your authenticator app, if the cluster asks for one.
    #[arg(long, value_name = "CODE")]
    otp: Option<String>,
    /// Trust the proxy if its CA's public key has this SHA-256 (printed by `jaunt start`).
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "insecure")]
    ca_pin: Option<String>,
    /// Do not verify the proxy's certificate at all (dangerous: for throwaway test clusters).
    #[arg(long)]
    insecure: bool,
    /// Requested certificate lifetime (capped by the cluster and your roles), e.g. 1h.
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SessionsCommand {
    /// List the live sessions: id, user, login, node, kind, start, recorded.
    Ls(FormatArg),
    /// End a live session (within a second); the audit log records who ended it.
    Kill {
        /// The session id, as `jaunt sessions ls` shows it.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum RecordingsCommand {
    /// List recordings: id, session, user, login, node, kind, start, duration, size.
    Ls {
        /// Only this user's recordings.
        #[arg(long)]
        user: Option<String>,
        /// Only recordings on this node.
        #[arg(long)]
        node: Option<String>,
        /// Only recordings started within this long, e.g. 24h.
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Write a recording's asciicast v2 file (as `jaunt play ID --format cast`), to --out or
    /// stdout.
    Export {
        /// The recording id, as `jaunt recordings ls` shows it.
        id: String,
        /// Write here instead of stdout (created with mode 0600).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PlayFormatArg {
    Text,
    Cast,
    Json,
}

#[derive(Args, Debug)]
struct FormatArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum UsersCommand {
    /// Add a user; prints a generated password unless --password-stdin is given.
    Add {
        name: String,
        /// Roles, comma-separated (built in: access, editor).
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// OS logins the user may use (the `logins` trait), comma-separated.
        #[arg(long, value_delimiter = ',')]
        logins: Vec<String>,
        /// Database users (the `db_users` trait), comma-separated.
        #[arg(long, value_delimiter = ',')]
        db_users: Vec<String>,
        /// Database names (the `db_names` trait), comma-separated.
        #[arg(long, value_delimiter = ',')]
        db_names: Vec<String>,
        /// Read the password from standard input (one line).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Change a user's roles and traits; what is not given stays as it is. A list flag given
    /// replaces that trait (`--logins ''` clears it). Passwords: `jaunt users reset`.
    Update {
        name: String,
        /// Roles, comma-separated (replace the user's roles).
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
        /// OS logins the user may use (the `logins` trait), comma-separated.
        #[arg(long, value_delimiter = ',')]
        logins: Option<Vec<String>>,
        /// Database users (the `db_users` trait), comma-separated.
        #[arg(long, value_delimiter = ',')]
        db_users: Option<Vec<String>>,
        /// Database names (the `db_names` trait), comma-separated.
        #[arg(long, value_delimiter = ',')]
        db_names: Option<Vec<String>>,
        /// Any trait, as NAME=VALUE[,VALUE...] (repeatable; `NAME=` clears it), for roles'
        /// `{{external.NAME}}` and `{{internal.NAME}}`.
        #[arg(long = "trait", value_name = "NAME=VALUES")]
        traits: Vec<String>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Remove a user.
    Rm { name: String },
    /// List users.
    Ls(FormatArg),
    /// Reset a user's password (and second factor, where enabled).
    Reset {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        format: FormatArg,
    },
}

#[derive(Subcommand, Debug)]
enum TokensCommand {
    /// Create a join token. Prints the token alone on the first line, then the agent command.
    Add {
        /// What may join with it: node, app, db, engine (comma-separated).
        #[arg(long = "type", value_delimiter = ',', required = true)]
        types: Vec<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "30m", value_name = "DURATION")]
        ttl: String,
        /// The token works for one join only.
        #[arg(long)]
        single_use: bool,
        #[command(flatten)]
        format: FormatArg,
    },
    /// List join tokens (ids only: tokens are stored hashed).
    Ls(FormatArg),
    /// Remove a join token by id (from `tokens ls`) or by the token itself.
    Rm { id: String },
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// YAML file with one or more resources separated by `---`.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: PathBuf,
}

#[derive(Args, Debug)]
struct GetArgs {
    /// roles, users, tokens, locks, nodes, apps or dbs.
    kind: String,
    #[command(flatten)]
    format: FormatArg,
}

#[derive(Args, Debug)]
struct RmArgs {
    /// KIND/NAME, e.g. role/dba, user/alice, token/3fa1..., lock/ID, node/NAME (not connected).
    target: String,
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Rotate a CA in phases: init (new key, trusted beside the old), update_clients (new
    /// certificates from the new CA), update_servers (engines, agents and control re-issued),
    /// standby (old CA dropped); rollback returns to the old CA from any phase before standby.
    /// With --grace and no --phase, the phases advance on their own.
    Rotate {
        /// user, host, db, jwt or all.
        #[arg(long = "type", value_name = "TYPE")]
        ty: String,
        /// init, update_clients, update_servers, standby or rollback.
        #[arg(long, value_name = "PHASE")]
        phase: Option<String>,
        /// Advance to the next phase by itself after this long (e.g. 30m).
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
        /// Change the phase even though connected agents have not confirmed the current one.
        #[arg(long)]
        force: bool,
    },
    /// Print a CA's public half, ready for sshd or known_hosts.
    Export {
        /// user-ssh (sshd TrustedUserCAKeys), host-ssh (known_hosts @cert-authority line),
        /// user-tls, host-tls, db (PEM certificates).
        #[arg(long = "type", value_name = "TYPE")]
        ty: String,
    },
    /// Make an SSH host key here and have the host CA certify it, for an OpenSSH server.
    SignHost {
        /// Host name the certificate is for (its principal).
        #[arg(long)]
        host: String,
        /// Directory for NAME, NAME.pub and NAME-cert.pub.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Certificate lifetime.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Make a TLS key here and have the db CA certify it, for a PostgreSQL server
    /// (ssl_cert_file, ssl_key_file; ssl_ca_file is `jaunt ca export --type db`) or a
    /// MySQL/MariaDB server (ssl_cert, ssl_key, ssl_ca).
    SignDb {
        /// Host names or IP addresses the agent dials the server by, comma-separated (the
        /// first names the files; localhost also covers 127.0.0.1 and ::1).
        #[arg(long, value_name = "HOST[,HOST..]")]
        host: String,
        /// Directory for HOST.crt, HOST.key (0600) and jaunt-db-ca.crt.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Certificate lifetime (default: the cluster's host certificate lifetime).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Search audit events.
    Search {
        /// Events at or after this time: a duration ago (1h) or RFC 3339.
        #[arg(long)]
        since: Option<String>,
        /// Events at or before this time: a duration ago or RFC 3339.
        #[arg(long)]
        until: Option<String>,
        /// Event type, e.g. user.login (prefix match on dotted types).
        #[arg(long = "type")]
        ty: Option<String>,
        /// Only events by or about this user.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        format: FormatArg,
    },
}

/// The command line as clap sees it: the derived [`Cli`], with `--data-dir` (a global flag,
/// accepted by every subcommand as before) described per subcommand: what it means there, or
/// hidden from the help of commands that do not read it (`jaunt ssh`, `jaunt login`, ...), so
/// their `--help` does not repeat the control host's text.
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    let data_dir = |help: Option<&'static str>| {
        let arg = clap::Arg::new("data_dir")
            .long("data-dir")
            .global(true)
            .env("JAUNT_DATA_DIR")
            .value_name("DIR")
            .value_parser(clap::value_parser!(PathBuf));
        match help {
            Some(help) => arg.help(help),
            None => arg.hide(true),
        }
    };
    const ADMIN: &str = "Act as the local admin of the control host with this data directory \
                         (default: your `jaunt login` identity)";
    let mut cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|sc| sc.get_name().to_string())
        .collect();
    for name in names {
        let help = match name.as_str() {
            "start" => Some("The daemon's data directory (store, CA keys, control.addr)"),
            "agent" => Some("The agent's data directory (its identity and certificates)"),
            "status" => Some(
                "Show the status of the cluster with this data directory (on its control host)",
            ),
            "users" | "tokens" | "create" | "get" | "rm" | "lock" | "ca" | "audit" | "sessions" => {
                Some(ADMIN)
            }
            _ => None,
        };
        cmd = cmd.mut_subcommand(name, |sc| sc.arg(data_dir(help)));
    }
    cmd
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    use clap::FromArgMatches as _;
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if matches!(cli.command, Command::Start(_) | Command::Agent(_)) {
        // The data path's processes: transparent huge pages off (see `thp.rs`; before the
        // re-exec, which keeps it), and glibc's `rep movsb` copies off (see `memcpy.rs`).
        crate::thp::disable_transparent_huge_pages();
        crate::memcpy::reexec_without_rep_movsb();
    }
    init_logging(&cli.log);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour only for a terminal: a log file or journal gets plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data_dir = cli.data_dir.clone();
    match cli.command {
        Command::Start(args) => start(args, data_dir).map(|()| ExitCode::SUCCESS),
        Command::Login(args) => login(args).map(|()| ExitCode::SUCCESS),
        Command::Logout => {
            if Profile::user_default().remove()? {
                println!("Logged out.");
            } else {
                println!("Not logged in.");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(f) => status(data_dir.as_deref(), f.format),
        Command::Ls {
            kind,
            labels,
            search,
            format,
        } => {
            // `jaunt ls env=prod`: the first positional is a label filter, not a kind.
            let (kind, mut filters) = match kind {
                Some(k) if k.contains('=') => (None, vec![k]),
                k => (k, Vec::new()),
            };
            filters.extend(labels);
            let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
            let filter =
                crate::ssh_cmd::ResourceFilter::labels(&filters)?.with_search(search.as_deref());
            ls(kind.as_deref(), &filter, format.format).map(|()| ExitCode::SUCCESS)
        }
        Command::Ssh(args) => crate::ssh_cmd::ssh(args),
        Command::Config => crate::ssh_cmd::config().map(|()| ExitCode::SUCCESS),
        Command::Scp { args } => scp(&args),
        Command::Lock(args) => {
            lock(&admin_client(data_dir.as_deref())?, args).map(|()| ExitCode::SUCCESS)
        }
        Command::Agent(args) => agent(args, data_dir).map(|()| ExitCode::SUCCESS),
        Command::Proxy(ProxyCommand::Ssh { target }) => {
            proxy_ssh(&target).map(|()| ExitCode::SUCCESS)
        }
        Command::Proxy(ProxyCommand::Tcp { name, port }) => {
            proxy_local(&name, port, jaunt_config::wire::dial::DialKind::Tcp)
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Proxy(ProxyCommand::App { name, port }) => {
            proxy_local(&name, port, jaunt_config::wire::dial::DialKind::App)
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Proxy(ProxyCommand::Db {
            name,
            port,
            db_user,
            db_name,
        }) => crate::db_cmd::proxy(&name, port, &db_user, db_name.as_deref())
            .map(|()| ExitCode::SUCCESS),
        Command::Db(DbCommand::Connect {
            name,
            db_user,
            db_name,
            psql_args,
        }) => crate::db_cmd::connect(&name, &db_user, db_name.as_deref(), &psql_args),
        Command::Completion { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut command(), "jaunt", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("jaunt {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Users(c) => {
            users(&admin_client(data_dir.as_deref())?, c).map(|()| ExitCode::SUCCESS)
        }
        Command::Sessions(c) => {
            sessions(&admin_client(data_dir.as_deref())?, c).map(|()| ExitCode::SUCCESS)
        }
        Command::Join { id } => join(&id).map(|()| ExitCode::SUCCESS),
        Command::Recordings(c) => {
            recordings(&admin_client(data_dir.as_deref())?, c).map(|()| ExitCode::SUCCESS)
        }
        Command::Play { id, speed, format } => {
            use std::io::IsTerminal as _;
            let format = match format {
                PlayFormatArg::Text => crate::recordings::cmd::PlayFormat::Text,
                PlayFormatArg::Cast => crate::recordings::cmd::PlayFormat::Cast,
                PlayFormatArg::Json => crate::recordings::cmd::PlayFormat::Json,
            };
            let stdout = std::io::stdout();
            let tty = stdout.is_terminal();
            crate::recordings::cmd::play(
                &admin_client(data_dir.as_deref())?,
                &id,
                format,
                speed,
                &mut stdout.lock(),
                tty,
            )
            .map(|()| ExitCode::SUCCESS)
        }
        Command::Tokens(c) => {
            tokens(&admin_client(data_dir.as_deref())?, c).map(|()| ExitCode::SUCCESS)
        }
        Command::Create(a) => {
            create(&admin_client(data_dir.as_deref())?, &a.file).map(|()| ExitCode::SUCCESS)
        }
        Command::Get(a) => get(
            &admin_client(data_dir.as_deref())?,
            &a.kind,
            a.format.format,
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Rm(a) => {
            rm(&admin_client(data_dir.as_deref())?, &a.target).map(|()| ExitCode::SUCCESS)
        }
        Command::Ca(c) => ca(&admin_client(data_dir.as_deref())?, c).map(|()| ExitCode::SUCCESS),
        Command::Audit(AuditCommand::Search {
            since,
            until,
            ty,
            user,
            format,
        }) => audit_search(
            &admin_client(data_dir.as_deref())?,
            since,
            until,
            ty,
            user,
            format.format,
        )
        .map(|()| ExitCode::SUCCESS),
    }
}

// ---- start ----

/// Default data directory: `$XDG_DATA_HOME/jaunt` or `~/.local/share/jaunt` for dev clusters.
fn default_dev_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("jaunt")
}

/// Default data directory of an agent started from flags.
fn default_agent_data_dir() -> PathBuf {
    default_dev_data_dir().join("agent")
}

fn agent(args: AgentArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    // The flags become an agent config section, so flags and files share one validation.
    let mut yaml = format!("agent:\n  proxy_addr: {}\n", quote(&args.proxy));
    if let Some(name) = &args.name {
        let _ = writeln!(yaml, "  name: {}", quote(name));
    }
    let labels = crate::agent_host::parse_labels(&args.labels)?;
    if !labels.is_empty() {
        yaml.push_str("  labels:\n");
        for (k, v) in &labels {
            let _ = writeln!(yaml, "    {}: {}", quote(k), quote(v));
        }
    }
    if let Some(addr) = &args.metrics_addr {
        let _ = writeln!(yaml, "  metrics_addr: {}", quote(addr));
    }
    yaml.push_str("  services:\n");
    if let Some(ssh) = &args.ssh {
        let _ = writeln!(yaml, "    ssh: {{ addr: {} }}", quote(ssh));
    }
    if !args.apps.is_empty() {
        yaml.push_str("    apps:\n");
        for a in &args.apps {
            let (n, u) = crate::agent_host::parse_named(a, "--app")?;
            let _ = writeln!(
                yaml,
                "      - {{ name: {}, uri: {} }}",
                quote(&n),
                quote(&u)
            );
        }
    }
    if !args.dbs.is_empty() {
        yaml.push_str("    dbs:\n");
        for d in &args.dbs {
            let (n, u) = crate::agent_host::parse_named(d, "--db")?;
            let _ = writeln!(
                yaml,
                "      - {{ name: {}, uri: {} }}",
                quote(&n),
                quote(&u)
            );
        }
    }
    let config = jaunt_config::file::parse("flags", &yaml).map_err(|e| anyhow!("{e}"))?;
    let Some(agent) = config.agent else {
        bail!("internal: no agent section built from flags")
    };
    let token = match (args.token, args.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(
            std::fs::read_to_string(&f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let opts = crate::agent_host::AgentOptions {
        proxy: agent.proxy_addr.to_string(),
        token,
        ca_pin: args.ca_pin,
        insecure: args.insecure,
        data_dir: data_dir.unwrap_or_else(default_agent_data_dir),
        name: agent.name.clone(),
        config_file: None,
    };
    crate::agent_host::run(&agent, opts)
}

fn start(args: StartArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let drain_timeout = std::time::Duration::from_secs(
        parse_duration_secs(&args.drain_timeout).context("--drain-timeout")?,
    );
    let mut cfg = if args.dev {
        let data_dir = data_dir.unwrap_or_else(default_dev_data_dir);
        DaemonConfig {
            cluster: jaunt_config::file::DEV_CLUSTER_NAME.to_string(),
            data_dir,
            public_addr: args.public_addr.clone(),
            // `localhost` listens on 127.0.0.1 (as the config file's dev default does), not on
            // whichever of ::1 and 127.0.0.1 the resolver lists first.
            public_listen: match args.public_addr.rsplit_once(':') {
                Some(("localhost", port)) => format!("127.0.0.1:{port}"),
                _ => args.public_addr.clone(),
            },
            control_listen: "127.0.0.1:0".to_string(),
            second_factor: false,
            user_ttl_secs: crate::service::DEFAULT_USER_TTL_SECS,
            host_ttl_secs: crate::service::DEFAULT_HOST_TTL_SECS,
            dev: true,
            engine: daemon::EngineSettings::dev(args.diag_addr.clone()),
            audit_file: None,
            audit_retention: jaunt_config::file::DEFAULT_AUDIT_RETENTION.as_std(),
            recordings: jaunt_config::file::RecordingsConfig::File,
            storage: jaunt_config::file::StorageConfig::Sqlite,
            takeover: false,
            drain_timeout,
        }
    } else {
        let Some(path) = args.config else {
            bail!("say what to run: `jaunt start --dev` for a dev cluster, or `jaunt start --config jaunt.yaml`");
        };
        let config = jaunt_config::file::load(&path).map_err(|e| anyhow!("{e}"))?;
        // SIGHUP re-reads it (the daemon's limits, an agent's labels and services).
        daemon::set_config_file(&path);
        if config.control.is_none() && config.engine.is_none() {
            if let Some(agent) = &config.agent {
                let token = match &agent.token {
                    Some(jaunt_config::file::TokenSource::Value(t)) => Some(t.clone()),
                    Some(jaunt_config::file::TokenSource::File(f)) => Some(
                        std::fs::read_to_string(f)
                            .with_context(|| format!("agent.token_file {}", f.display()))?
                            .trim()
                            .to_string(),
                    ),
                    None => None,
                };
                let opts = crate::agent_host::AgentOptions {
                    proxy: agent.proxy_addr.to_string(),
                    token,
                    ca_pin: agent.ca_pin.map(|p| format!("sha256:{}", hex::encode(p.0))),
                    insecure: false,
                    data_dir: data_dir.unwrap_or_else(|| config.data_dir.clone()),
                    name: agent.name.clone(),
                    config_file: Some(path.clone()),
                };
                return crate::agent_host::run(agent, opts);
            }
        }
        if config.agent.is_some() {
            bail!("running an agent in the same process as control is not supported yet: start the agent with its own config");
        }
        daemon_config_from_file(config, data_dir)?
    };
    cfg.takeover = args.takeover;
    cfg.drain_timeout = drain_timeout;
    daemon::run(cfg)
}

fn daemon_config_from_file(
    config: jaunt_config::file::Config,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<DaemonConfig> {
    let Some(control) = config.control.as_ref() else {
        bail!("this config has no `control` section: running only an engine or an agent arrives with those components");
    };
    let Some(engine) = config.engine.as_ref() else {
        bail!("this config has a `control` section but no `engine`: give engine.public_addr so users can reach the cluster");
    };
    Ok(DaemonConfig {
        audit_file: config.audit.file.clone(),
        audit_retention: config.audit.retention.as_std(),
        recordings: config.recordings.clone(),
        storage: config.storage.clone(),
        cluster: control.cluster_name.clone(),
        data_dir: data_dir.unwrap_or_else(|| config.data_dir.clone()),
        public_addr: engine.public_addr.to_string(),
        public_listen: engine.listen_addr.to_string(),
        control_listen: control.listen_addr.to_string(),
        second_factor: control.second_factor == jaunt_config::file::SecondFactor::Otp,
        user_ttl_secs: control.user_cert_ttl.as_secs(),
        host_ttl_secs: control.host_cert_ttl.as_secs(),
        dev: false,
        engine: daemon::EngineSettings {
            shards: engine
                .shards
                .resolve(std::thread::available_parallelism().map_or(1, |n| n.get()))
                .get(),
            io_memory: usize::try_from(engine.io_memory_bytes).unwrap_or(usize::MAX),
            diag_addr: Some(engine.diag_addr.to_string()),
            handshake_timeout: engine.handshake_timeout.as_std(),
            idle_timeout: engine.idle_timeout.as_std(),
            max_connections_per_shard: engine.max_connections_per_shard as usize,
            max_handshakes_per_shard: engine.max_handshakes_per_shard as usize,
            tls_files: engine
                .tls
                .as_ref()
                .map(|t| (t.cert_file.clone(), t.key_file.clone())),
            audit_queue_capacity: config.audit.queue_capacity,
            audit_overflow: config.audit.on_overflow,
        },
        takeover: false,
        drain_timeout: daemon::DRAIN_TIMEOUT,
    })
}

// ---- login, logout, status ----

fn read_secret(from_stdin: bool, prompt: &str) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            bail!("standard input was empty: pipe the password in, e.g. `jaunt ... --password-stdin < file`");
        }
        return Ok(line);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to ask for a password on: pass --password-stdin and pipe it in");
    }
    rpassword::prompt_password(prompt).context("reading the password")
}

fn login(args: LoginArgs) -> anyhow::Result<()> {
    let profile = Profile::user_default();
    let trust = if let Some(pin) = &args.ca_pin {
        Trust::Pin(pin.clone())
    } else if args.insecure {
        Trust::Insecure
    } else {
        match profile.load()? {
            Some(info) if info.proxy == args.proxy => Trust::Roots(profile.host_ca()?),
            _ => bail!(
                "the proxy's CA is not known here yet: pass --ca-pin sha256:... (printed by `jaunt start` and `jaunt status --data-dir` on the control host), or --insecure for a throwaway test cluster"
            ),
        }
    };
    let client = Client::new(&args.proxy, trust, None)?;
    let ping: PingResponse = client.get_json("/v1/ping")?;
    let password = read_secret(
        args.password_stdin,
        &format!("Password for {}@{}: ", args.user, ping.cluster_name),
    )?;
    let otp = match (args.otp, ping.second_factor.as_str()) {
        (Some(code), _) => Some(code),
        (None, "otp") if std::io::stdin().is_terminal() && !args.password_stdin => Some(
            rpassword::prompt_password("One-time code: ").context("reading the one-time code")?,
        ),
        (None, "otp") => bail!("this cluster requires a one-time code: pass --otp CODE"),
        (None, _) => None,
    };
    let ttl_secs = args.ttl.as_deref().map(parse_duration_secs).transpose()?;
    let keys = LocalKeys::generate()?;
    let req = LoginRequest {
        user: args.user.clone(),
        password,
        otp,
        tls_public_key: keys.tls_public_pem.clone(),
        ssh_public_key: keys.ssh_public_line(),
        ttl_secs,
    };
    let certs: Certs = client.post_json("/v1/login", &req)?;
    let info = profile.save(&args.proxy, &keys, &certs)?;
    println!("Logged in to {} as {}.", info.cluster, info.user);
    print_identity(&profile, &info.identity);
    Ok(())
}

fn print_identity(profile: &Profile, id: &Identity) {
    let now = unix_now();
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    println!("  user:      {}", id.name);
    println!("  cluster:   {}", id.cluster);
    println!("  roles:     {}", list(&id.roles));
    println!("  logins:    {}", list(&id.logins));
    println!("  db users:  {}", list(&id.db_users));
    println!("  db names:  {}", list(&id.db_names));
    let state = if id.expires <= now {
        "EXPIRED: run `jaunt login` again".to_string()
    } else {
        format!("valid for {}", human_duration(id.expires - now))
    };
    println!(
        "  expires:   {} ({state})",
        crate::audit::rfc3339(id.expires)
    );
    println!("  keys:      {}", profile.dir.join("keys").display());
}

fn status(data_dir: Option<&Path>, format: Format) -> anyhow::Result<ExitCode> {
    if let Some(dir) = data_dir {
        let client = admin_client(Some(dir))?;
        let st: StatusResponse = client.get_json("/v1/status")?;
        if format != Format::Text {
            return print_structured(&st, format).map(|()| ExitCode::SUCCESS);
        }
        println!("Cluster:      {}", st.cluster_name);
        println!("Version:      {}", st.version);
        println!("Public addr:  {}", st.public_addr);
        println!("CA pin:       {}", st.ca_pin);
        println!("Certificate authorities:");
        for ca in &st.cas {
            println!("  {:<10} {}", ca.r#type, ca.fingerprint);
        }
        // Rotation phases (issue 13): each CA's phase and, during a rotation, both pins.
        println!("CA rotation:");
        for ca in st
            .cas
            .iter()
            .filter(|c| c.r#type.ends_with("-tls") || c.r#type == "jwt")
        {
            let name = ca.r#type.trim_end_matches("-tls");
            match (&ca.phase, &ca.additional) {
                (Some(phase), Some(other)) => println!(
                    "  {name:<10} {phase:<15} signing {} also trusted {other}",
                    ca.fingerprint
                ),
                (Some(phase), None) => println!("  {name:<10} {phase}"),
                (None, _) => {}
            }
        }
        let connected = st.hosts.iter().filter(|h| h.connected).count();
        println!(
            "Agents:       {} joined, {} connected",
            st.hosts.len(),
            connected
        );
        for h in &st.hosts {
            println!(
                "  {:<20} {:<34} {:<12} {}",
                h.name,
                h.id,
                h.types.join(","),
                match (h.connected, h.ca_phase_confirmed) {
                    (true, Some(false)) => "connected (CA phase not confirmed yet)",
                    (true, _) => "connected",
                    (false, _) => "not connected",
                }
            );
        }
        let healthy = st.members.iter().filter(|m| m.health == "healthy").count();
        println!(
            "Controls and engines: {} listed, {} healthy",
            st.members.len(),
            healthy
        );
        let now = jaunt_config::identity::unix_now();
        for m in &st.members {
            println!(
                "  engine {:<22} control {:<22} {:<12} seen {}s ago",
                m.public_addr,
                m.control_addr,
                m.health,
                now.saturating_sub(m.last_seen)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let profile = Profile::user_default();
    let Some(info) = profile.load()? else {
        eprintln!("Not logged in: run `jaunt login --proxy HOST:PORT --user NAME`.");
        return Ok(ExitCode::FAILURE);
    };
    if format != Format::Text {
        return print_structured(&info, format).map(|()| ExitCode::SUCCESS);
    }
    println!("Profile:     {}", profile.dir.display());
    println!("  proxy:     {}", info.proxy);
    print_identity(&profile, &info.identity);
    Ok(ExitCode::SUCCESS)
}

// ---- resource access ----

/// `ssh` options that make the system client use the Jaunt certificate, trust the cluster's
/// host CA and reach the node through `jaunt proxy ssh`.
pub(crate) fn ssh_options(profile: &Profile, user: &str) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("locating the jaunt binary")?;
    let key = profile.ssh_key_path(user);
    if !key.exists() {
        bail!("no SSH key in {}: run `jaunt login`", profile.dir.display());
    }
    Ok(vec![
        "-o".into(),
        format!(
            "ProxyCommand={} proxy ssh %r@%h:%p",
            shell_quote(&exe.display().to_string())
        ),
        "-o".into(),
        format!(
            "UserKnownHostsFile={}",
            profile.known_hosts_path().display()
        ),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "IdentityAgent=none".into(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        format!("CertificateFile={}", profile.ssh_cert_path(user).display()),
    ])
}

pub(crate) fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn run_child(mut cmd: std::process::Command, what: &str) -> anyhow::Result<ExitCode> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {what}: is OpenSSH's client installed?"))?;
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}

fn ls(
    kind: Option<&str>,
    filter: &crate::ssh_cmd::ResourceFilter,
    format: Format,
) -> anyhow::Result<()> {
    let profile = Profile::user_default();
    let Some(info) = profile.load()? else {
        bail!("not logged in: run `jaunt login --proxy HOST:PORT --user NAME`");
    };
    if info.identity.expires <= unix_now() {
        bail!(
            "your certificate expired at {}: run `jaunt login` again",
            crate::audit::rfc3339(info.identity.expires)
        );
    }
    let client = Client::new(
        &info.proxy,
        Trust::Roots(profile.host_ca()?),
        Some(profile.tls_identity(&info.user)?),
    )?;
    match kind.map(|k| k.trim_end_matches('s')) {
        Some(k @ ("node" | "app" | "db")) => list_resources(&client, k, filter, format, false),
        Some(other) => bail!("unknown kind {other:?}: expected nodes, apps or dbs"),
        None => {
            let mut all: Vec<ResourceInfo> = client.get_json("/v1/inventory")?;
            all.retain(|r| filter.matches(r));
            if format != Format::Text {
                return print_structured(&all, format);
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|r| {
                    let labels = r
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    vec![r.kind.clone(), r.name.clone(), r.protocol.clone(), labels]
                })
                .collect();
            print_table(&["KIND", "NAME", "PROTOCOL", "LABELS"], &rows);
            Ok(())
        }
    }
}

fn scp(args: &[String]) -> anyhow::Result<ExitCode> {
    let profile = Profile::user_default();
    let (_, info) = crate::access::Dialer::from_profile(&profile)?;
    let mut cmd = std::process::Command::new("scp");
    cmd.args(ssh_options(&profile, &info.user)?);
    cmd.args(args);
    run_child(cmd, "scp")
}

fn proxy_ssh(target: &str) -> anyhow::Result<()> {
    let (login, rest) = target
        .split_once('@')
        .ok_or_else(|| anyhow!("expected LOGIN@NODE[:PORT], got {target:?}"))?;
    // The port is the agent's business (it knows where its sshd listens); accept and ignore it.
    let node = rest.rsplit_once(':').map_or(rest, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            rest
        }
    });
    let (dialer, info) = crate::access::Dialer::from_profile(&Profile::user_default())?;
    // `node1.<cluster>` is how `jaunt config` names nodes to plain ssh.
    let node = crate::ssh_cmd::node_name(node, &info.cluster);
    let request = jaunt_config::wire::dial::DialRequest {
        join: None,
        kind: jaunt_config::wire::dial::DialKind::Ssh,
        target: node.to_string(),
        login: Some(login.to_string()),
        db_user: None,
        db_name: None,
    };
    let session = dialer.dial(&request).map_err(|e| {
        let reason = crate::ssh_cmd::refusal_text("node", &e);
        crate::ssh_cmd::report_refusal(&reason);
        anyhow!(reason)
    })?;
    crate::access::pipe_stdio(session)
}

/// `jaunt proxy tcp|app NAME [--port P]`: a local listener that forwards to the app.
fn proxy_local(
    name: &str,
    port: u16,
    kind: jaunt_config::wire::dial::DialKind,
) -> anyhow::Result<()> {
    let profile = Profile::user_default();
    let (dialer, info) = crate::access::Dialer::from_profile(&profile)?;
    // Refuse now, not at the first connection, a name the cluster does not serve.
    let client = Client::new(
        &info.proxy,
        Trust::Roots(profile.host_ca()?),
        Some(profile.tls_identity(&info.user)?),
    )?;
    let inventory: Vec<ResourceInfo> = client.get_json("/v1/inventory")?;
    check_app_listed(&inventory, name, kind)?;
    if dialer.names_apps_by_sni() && kind == jaunt_config::wire::dial::DialKind::App {
        dialer.app_server_name(name)?;
    }
    let request = jaunt_config::wire::dial::DialRequest {
        join: None,
        kind,
        target: name.to_string(),
        login: None,
        db_user: None,
        db_name: None,
    };
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    println!(
        "Proxying {name} on 127.0.0.1:{}",
        listener.local_addr()?.port()
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    crate::access::serve_local(listener, std::sync::Arc::new(dialer), request)
}

/// Refuses `name` unless the cluster lists an app of `kind` by that name, pointing at the
/// right command when it is the other kind of app.
fn check_app_listed(
    inventory: &[ResourceInfo],
    name: &str,
    kind: jaunt_config::wire::dial::DialKind,
) -> anyhow::Result<()> {
    use jaunt_config::wire::dial::DialKind;
    let (want, noun, other_cmd) = match kind {
        DialKind::App => ("app", "web app", "jaunt proxy tcp"),
        _ => ("tcp", "TCP app", "jaunt proxy app"),
    };
    if inventory.iter().any(|r| r.kind == want && r.name == name) {
        return Ok(());
    }
    if let Some(r) = inventory
        .iter()
        .find(|r| r.name == name && matches!(r.kind.as_str(), "app" | "tcp"))
    {
        bail!(
            "{name} is a {} app, not a {noun}: use `{other_cmd} {name}`",
            if r.kind == "tcp" { "TCP" } else { "web" }
        );
    }
    bail!("no such {noun}: {name} (see `jaunt ls apps`)")
}

// ---- admin connection ----

/// A control API client acting as the local admin (`--data-dir`) or as the logged-in user.
fn admin_client(data_dir: Option<&Path>) -> anyhow::Result<Client> {
    let local = |dir: &Path| -> anyhow::Result<Client> {
        let profile = Profile::admin(dir);
        let info = profile.load()?.ok_or_else(|| {
            anyhow!("{} holds no admin identity: is this the data dir of a control host that has started?", dir.display())
        })?;
        let addr = std::fs::read_to_string(dir.join("control.addr"))
            .map(|s| s.trim().to_string())
            .unwrap_or(info.proxy.clone());
        Ok(Client::new(
            &addr,
            Trust::Roots(profile.host_ca()?),
            Some(profile.tls_identity(&info.user)?),
        )?)
    };
    if let Some(dir) = data_dir {
        return local(dir);
    }
    let profile = Profile::user_default();
    if let Some(info) = profile.load()? {
        if info.identity.expires <= unix_now() {
            bail!(
                "your certificate expired at {}: run `jaunt login` again",
                crate::audit::rfc3339(info.identity.expires)
            );
        }
        return Ok(Client::new(
            &info.proxy,
            Trust::Roots(profile.host_ca()?),
            Some(profile.tls_identity(&info.user)?),
        )?);
    }
    let dev = default_dev_data_dir();
    if Profile::admin(&dev).load()?.is_some() {
        return local(&dev);
    }
    bail!("not logged in: run `jaunt login`, or pass --data-dir DIR on the control host")
}

// ---- users ----

fn users(client: &Client, cmd: UsersCommand) -> anyhow::Result<()> {
    match cmd {
        UsersCommand::Add {
            name,
            roles,
            logins,
            db_users,
            db_names,
            password_stdin,
            format,
        } => {
            let password = if password_stdin {
                Some(read_secret(true, "")?)
            } else {
                None
            };
            let req = UserAddRequest {
                name: name.clone(),
                roles,
                logins,
                db_users,
                db_names,
                password,
            };
            let creds: UserCredentials = client.post_json("/v1/users", &req)?;
            print_credentials(client, &creds, format.format, "created")
        }
        UsersCommand::Update {
            name,
            roles,
            logins,
            db_users,
            db_names,
            traits,
            format,
        } => {
            let mut changes: Vec<(String, Vec<String>)> = Vec::new();
            for (key, values) in [
                ("logins", logins),
                ("db_users", db_users),
                ("db_names", db_names),
            ] {
                if let Some(values) = values {
                    changes.push((key.to_string(), values));
                }
            }
            for item in &traits {
                let Some((key, values)) = item.split_once('=') else {
                    bail!("--trait {item:?}: expected NAME=VALUE[,VALUE...]");
                };
                if key.trim().is_empty() {
                    bail!("--trait {item:?}: the trait has no name");
                }
                changes.push((
                    key.trim().to_string(),
                    values.split(',').map(str::to_string).collect(),
                ));
            }
            if roles.is_none() && changes.is_empty() {
                bail!("say what to change: --roles, --logins, --db-users, --db-names or --trait");
            }
            let users: Vec<UserInfo> = client.get_json("/v1/users")?;
            let Some(info) = users.into_iter().find(|u| u.name == name) else {
                bail!("there is no user {name:?} (see `jaunt users ls`; add one with `jaunt users add`)");
            };
            let mut user = user_resource(info);
            if let Some(roles) = roles {
                let roles: Vec<String> =
                    roles.into_iter().filter(|r| !r.trim().is_empty()).collect();
                if roles.is_empty() {
                    bail!("--roles: a user needs at least one role");
                }
                user.spec.roles = roles;
            }
            for (key, values) in changes {
                let values: Vec<String> = values
                    .into_iter()
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                if values.is_empty() {
                    user.spec.traits.remove(&key);
                } else {
                    user.spec.traits.insert(key, values);
                }
            }
            client.post_json::<_, serde_json::Value>(
                "/v1/resources",
                &Resource::User(user.clone()),
            )?;
            if format.format != Format::Text {
                return print_structured(&user, format.format);
            }
            println!("User {name} updated: roles {}.", user.spec.roles.join(","));
            for (key, values) in &user.spec.traits {
                println!("  {key}: {}", values.join(","));
            }
            println!("Changes apply from the user's next `jaunt login`.");
            Ok(())
        }
        UsersCommand::Rm { name } => {
            client.delete(&format!("/v1/users/{}", encode(&name)))?;
            println!("User {name} removed.");
            Ok(())
        }
        UsersCommand::Ls(f) => {
            let users: Vec<UserInfo> = client.get_json("/v1/users")?;
            if f.format != Format::Text {
                return print_structured(&users, f.format);
            }
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        u.roles.join(","),
                        u.traits
                            .get("logins")
                            .map(|l| l.join(","))
                            .unwrap_or_default(),
                        crate::audit::rfc3339(u.created),
                    ]
                })
                .collect();
            print_table(&["NAME", "ROLES", "LOGINS", "CREATED"], &rows);
            Ok(())
        }
        UsersCommand::Reset {
            name,
            password_stdin,
            format,
        } => {
            let password = if password_stdin {
                Some(read_secret(true, "")?)
            } else {
                None
            };
            let creds: UserCredentials = client.post_json(
                &format!("/v1/users/{}/reset", encode(&name)),
                &UserResetRequest { password },
            )?;
            print_credentials(client, &creds, format.format, "reset")
        }
    }
}

fn print_credentials(
    client: &Client,
    creds: &UserCredentials,
    format: Format,
    verb: &str,
) -> anyhow::Result<()> {
    if format != Format::Text {
        return print_structured(creds, format);
    }
    println!("User {} {verb}.", creds.name);
    if let Some(p) = &creds.password {
        println!("  password:   {p}");
    }
    if let (Some(secret), Some(url)) = (&creds.otp_secret, &creds.otp_url) {
        println!("  OTP secret: {secret}");
        println!("  OTP URL:    {url}");
        println!("  (add it to an authenticator app; `jaunt login` asks for its code)");
    }
    if let Ok(ping) = client.get_json::<PingResponse>("/v1/ping") {
        println!(
            "Log in with: jaunt login --proxy {} --user {} --ca-pin {}",
            ping.public_addr, creds.name, ping.host_ca_pin
        );
    }
    Ok(())
}

// ---- tokens ----

fn tokens(client: &Client, cmd: TokensCommand) -> anyhow::Result<()> {
    match cmd {
        TokensCommand::Add {
            types,
            ttl,
            single_use,
            format,
        } => {
            let ttl_secs = if ttl.is_empty() {
                DEFAULT_TOKEN_TTL_SECS
            } else {
                parse_duration_secs(&ttl)?
            };
            let resp: TokenAddResponse = client.post_json(
                "/v1/tokens",
                &TokenAddRequest {
                    types: types.clone(),
                    ttl_secs,
                    single_use,
                    token: None,
                },
            )?;
            if format.format != Format::Text {
                return print_structured(&resp, format.format);
            }
            println!("{}", resp.token);
            println!();
            println!(
                "The token joins {} and expires at {} (in {}){}.",
                types.join(", "),
                crate::audit::rfc3339(resp.info.expires),
                human_duration(resp.info.expires.saturating_sub(unix_now())),
                if single_use { "; it works once" } else { "" }
            );
            println!("Run this on the agent host:");
            let mut cmd = format!(
                "  jaunt agent --proxy {} --token {} --ca-pin {}",
                resp.proxy_addr, resp.token, resp.ca_pin
            );
            if types.iter().any(|t| t == "node") {
                cmd.push_str(" --ssh 127.0.0.1:22");
            }
            println!("{cmd}");
            Ok(())
        }
        TokensCommand::Ls(f) => {
            let list: Vec<TokenInfo> = client.get_json("/v1/tokens")?;
            if f.format != Format::Text {
                return print_structured(&list, f.format);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.types.join(","),
                        crate::audit::rfc3339(t.expires),
                        if t.single_use { "yes" } else { "no" }.to_string(),
                    ]
                })
                .collect();
            print_table(&["ID", "TYPES", "EXPIRES", "SINGLE-USE"], &rows);
            Ok(())
        }
        TokensCommand::Rm { id } => {
            client.delete(&format!("/v1/tokens/{}", encode(&id)))?;
            println!("Token {id} removed.");
            Ok(())
        }
    }
}

// ---- create, get, rm ----

fn create(client: &Client, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().to_string(),
    );
    let resources =
        jaunt_config::resource::parse_resources(&name, &text).map_err(|e| anyhow!("{e}"))?;
    if resources.is_empty() {
        bail!("{name}: no resources found");
    }
    for r in &resources {
        let resp: serde_json::Value = client.post_json("/v1/resources", r)?;
        let kind = resp
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or("resource");
        match r {
            Resource::Token(_) => {
                let token = resp
                    .get("token")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default();
                println!("token {token} created");
            }
            _ => {
                let rname = resp
                    .get("name")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default();
                let updated = resp
                    .get("updated")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                println!(
                    "{kind} {rname} {}",
                    if updated { "updated" } else { "created" }
                );
                if let Some(pw) = resp
                    .pointer("/credentials/password")
                    .and_then(|v| v.as_str())
                {
                    println!("  password: {pw}");
                }
                if let Some(url) = resp
                    .pointer("/credentials/otp_url")
                    .and_then(|v| v.as_str())
                {
                    println!("  OTP URL:  {url}");
                }
            }
        }
    }
    Ok(())
}

/// `jaunt recordings ls`.
fn recordings(client: &Client, cmd: RecordingsCommand) -> anyhow::Result<()> {
    let (user, node, since, format) = match cmd {
        RecordingsCommand::Ls {
            user,
            node,
            since,
            format,
        } => (user, node, since, format),
        RecordingsCommand::Export { id, out } => {
            let cast = crate::recordings::cmd::PlayFormat::Cast;
            return match out {
                Some(path) => {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    crate::recordings::cmd::play(client, &id, cast, 0.0, &mut file, false)?;
                    eprintln!("recording {id} written to {}", path.display());
                    Ok(())
                }
                None => crate::recordings::cmd::play(
                    client,
                    &id,
                    cast,
                    0.0,
                    &mut std::io::stdout().lock(),
                    false,
                ),
            };
        }
    };
    let mut query = Vec::new();
    if let Some(u) = &user {
        query.push(format!("user={}", url_path_segment(u)));
    }
    if let Some(n) = &node {
        query.push(format!("node={}", url_path_segment(n)));
    }
    if let Some(s) = &since {
        let secs = parse_duration_secs(s).context("--since")?;
        query.push(format!("since={}", unix_now().saturating_sub(secs)));
    }
    let path = if query.is_empty() {
        "/v1/recordings".to_string()
    } else {
        format!("/v1/recordings?{}", query.join("&"))
    };
    let list: Vec<crate::recordings::RecordingInfo> = client.get_json(&path)?;
    if format.format != Format::Text {
        return print_structured(&list, format.format);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.session_id.clone(),
                r.user.clone(),
                r.login.clone(),
                r.node.clone(),
                match (&r.command, r.kind.as_str()) {
                    (Some(c), k) => format!("{k}: {c}"),
                    (None, k) => k.to_string(),
                },
                crate::audit::rfc3339(r.started),
                r.ended
                    .map(|e| human_duration(e.saturating_sub(r.started)))
                    .unwrap_or_default(),
                format!(
                    "{}{}",
                    r.size,
                    if r.interrupted { " (interrupted)" } else { "" }
                ),
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "SESSION", "USER", "LOGIN", "NODE", "KIND", "STARTED", "DURATION", "BYTES",
        ],
        &rows,
    );
    Ok(())
}

/// `jaunt sessions ls|kill`.
fn sessions(client: &Client, cmd: SessionsCommand) -> anyhow::Result<()> {
    match cmd {
        SessionsCommand::Ls(FormatArg { format }) => {
            let live: Vec<jaunt_engine::server::LiveSessionInfo> =
                client.get_json("/v1/sessions")?;
            if format != Format::Text {
                return print_structured(&live, format);
            }
            let rows: Vec<Vec<String>> = live
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.user.clone(),
                        s.login
                            .clone()
                            .or_else(|| s.db_user.clone())
                            .unwrap_or_default(),
                        s.target.clone(),
                        match &s.observing {
                            Some(watched) => format!("observer of {watched}"),
                            None => s.kind.as_str().to_string(),
                        },
                        crate::audit::rfc3339(s.started),
                        if s.recorded { "yes" } else { "no" }.to_string(),
                    ]
                })
                .collect();
            print_table(
                &["ID", "USER", "LOGIN", "NODE", "KIND", "STARTED", "RECORDED"],
                &rows,
            );
            Ok(())
        }
        SessionsCommand::Kill { id } => {
            client.delete(&format!("/v1/sessions/{}", url_path_segment(&id)))?;
            println!("session {id} ended");
            Ok(())
        }
    }
}

/// `jaunt join ID`: asks control which node the session is on (and whether it may be
/// watched), then dials that node's agent through the engine for a read-only copy of the
/// session's terminal output, written to stdout as it comes.
fn join(id: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let profile = Profile::user_default();
    let (dialer, info) = crate::access::Dialer::from_profile(&profile)?;
    let client = Client::new(
        &info.proxy,
        Trust::Roots(profile.host_ca()?),
        Some(profile.tls_identity(&info.user)?),
    )?;
    let session: jaunt_engine::server::LiveSessionInfo =
        client.get_json(&format!("/v1/sessions/{}", url_path_segment(id)))?;
    let request = jaunt_config::wire::dial::DialRequest {
        join: Some(session.id.clone()),
        kind: jaunt_config::wire::dial::DialKind::Ssh,
        target: session.target.clone(),
        login: Some(session.login.clone().unwrap_or_else(|| "-".into())),
        db_user: None,
        db_name: None,
    };
    let stream = dialer.dial(&request).map_err(|e| {
        anyhow!(
            "cannot join session {id}: {}",
            crate::ssh_cmd::refusal_text("node", &e)
        )
    })?;
    eprintln!(
        "Watching session {} of {} ({}@{}), read-only; Ctrl-C to leave.\r",
        session.id,
        session.user,
        session.login.as_deref().unwrap_or("?"),
        session.target
    );
    let _ = std::io::stderr().flush();
    let piped = crate::access::pipe_to_stdout(stream);
    eprintln!(
        "\r\n{}\r",
        why_join_ended(&client, &session.id, piped.err())
    );
    Ok(())
}

/// Why the observer's stream of session `id` closed, in words: the watched session ended, or
/// the observer's own session was ended (`sessions kill`, a lock, a role change) while the
/// watched one goes on. Asks control whether `id` is still live; a session that is ending may
/// still be listed for a moment, so a live answer is asked again for up to a second.
fn why_join_ended(client: &Client, id: &str, pipe: Option<anyhow::Error>) -> String {
    let path = format!("/v1/sessions/{}", url_path_segment(id));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match client.get_json::<jaunt_engine::server::LiveSessionInfo>(&path) {
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(_) => {
                return format!(
                    "You are no longer watching session {id}: your observer session was ended \
                     (`jaunt sessions kill`, or your roles changed); session {id} goes on."
                )
            }
            Err(ClientError::Api { status: 404, .. }) => return "The session ended.".to_string(),
            Err(ClientError::Api {
                status: 401 | 403,
                message,
            }) => {
                return format!(
                    "You are no longer watching session {id}: your observer session was ended, \
                     and control now refuses you: {message}"
                )
            }
            Err(e) => {
                let how = pipe.map_or_else(|| "closed".to_string(), |p| format!("failed: {p:#}"));
                return format!(
                    "The connection watching session {id} {how}; cannot tell whether the \
                     session goes on: {e}"
                );
            }
        }
    }
}

/// `text` safe as one URL path segment (percent-encoding everything but unreserved bytes).
fn url_path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn get(client: &Client, kind: &str, format: Format) -> anyhow::Result<()> {
    match kind.trim_end_matches('s') {
        "role" => {
            let roles: Vec<jaunt_config::resource::Role> = client.get_json("/v1/roles")?;
            match format {
                Format::Yaml => print_yaml_docs(&roles),
                Format::Json => print_structured(&roles, format),
                Format::Text => {
                    let rows: Vec<Vec<String>> = roles
                        .iter()
                        .map(|r| {
                            vec![
                                r.metadata.name.clone(),
                                r.metadata.description.clone().unwrap_or_default(),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "DESCRIPTION"], &rows);
                    Ok(())
                }
            }
        }
        // YAML is resource documents, as `jaunt create -f` reads them.
        "user" if format == Format::Yaml => {
            let users: Vec<UserInfo> = client.get_json("/v1/users")?;
            let docs: Vec<Resource> = users
                .into_iter()
                .map(|u| Resource::User(user_resource(u)))
                .collect();
            print!("{}", jaunt_config::resource::to_yaml(&docs)?);
            Ok(())
        }
        "user" => users(client, UsersCommand::Ls(FormatArg { format })),
        // Tokens are stored hashed: the secret cannot be printed, so each document has no
        // name and `create -f` makes a new token with the same types, use and remaining TTL.
        "token" if format == Format::Yaml => {
            let tokens: Vec<TokenInfo> = client.get_json("/v1/tokens")?;
            let now = unix_now();
            println!(
                "# Tokens are stored hashed, so their secrets are not here: `jaunt create -f` of this \
                 file makes NEW tokens\n# with the same types, single use and remaining TTL."
            );
            for token in &tokens {
                print!("{}", token_document(token, now));
            }
            Ok(())
        }
        "token" => tokens(client, TokensCommand::Ls(FormatArg { format })),
        "lock" => {
            let locks: Vec<jaunt_config::resource::Lock> = client.get_json("/v1/locks")?;
            match format {
                Format::Yaml => print_yaml_docs(&locks),
                Format::Json => print_structured(&locks, format),
                Format::Text => {
                    let rows: Vec<Vec<String>> = locks
                        .iter()
                        .map(|l| {
                            vec![
                                l.metadata.name.clone(),
                                l.target_text(),
                                l.spec.message.clone().unwrap_or_default(),
                            ]
                        })
                        .collect();
                    print_table(&["ID", "TARGET", "MESSAGE"], &rows);
                    Ok(())
                }
            }
        }
        "node" | "app" | "db" => list_resources(
            client,
            kind.trim_end_matches('s'),
            &crate::ssh_cmd::ResourceFilter::default(),
            format,
            true,
        ),
        _ => {
            bail!("unknown kind {kind:?}: expected roles, users, tokens, locks, nodes, apps or dbs")
        }
    }
}

/// A listed user as the resource `jaunt create -f` reads.
fn user_resource(info: UserInfo) -> jaunt_config::resource::User {
    use jaunt_config::resource::{Metadata, User, UserSpec};
    let mut metadata = Metadata::named(info.name);
    metadata.description = info.description;
    metadata.labels = info.labels;
    User {
        metadata,
        spec: UserSpec {
            roles: info.roles,
            traits: info.traits,
        },
    }
}

/// A listed token as a `kind: token` document without its secret (no `metadata.name`, so
/// `jaunt create -f` generates one); see `jaunt get tokens --format yaml`.
fn token_document(info: &TokenInfo, now: u64) -> String {
    let types: Vec<String> = info
        .types
        .iter()
        .map(|t| serde_json::Value::from(t.as_str()).to_string())
        .collect();
    format!(
        "---\n# token {id}\nkind: token\nversion: v1\nmetadata: {{}}\nspec:\n  types: [{types}]\n  \
         ttl: {ttl}s\n  single_use: {single}\n",
        id = info.id,
        types = types.join(", "),
        ttl = info.expires.saturating_sub(now).max(60),
        single = info.single_use,
    )
}

/// Connected resources of one kind (`node`, `app` (web and TCP apps), `db`) as a table or JSON.
fn list_resources(
    client: &Client,
    kind: &str,
    filter: &crate::ssh_cmd::ResourceFilter,
    format: Format,
    show_agent: bool,
) -> anyhow::Result<()> {
    let all: Vec<ResourceInfo> = client.get_json("/v1/inventory")?;
    let items: Vec<&ResourceInfo> = all
        .iter()
        .filter(|r| r.kind == kind || (kind == "app" && r.kind == "tcp"))
        .filter(|r| filter.matches(r))
        .collect();
    if format != Format::Text {
        return print_structured(&items, format);
    }
    let labels = |r: &ResourceInfo| {
        r.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let mut row = vec![r.name.clone(), r.protocol.clone(), labels(r)];
            if show_agent {
                row.push(format!("{} ({})", r.agent, r.host_id));
                row.push("connected".to_string());
            }
            row
        })
        .collect();
    if show_agent {
        print_table(&["NAME", "PROTOCOL", "LABELS", "AGENT", "STATE"], &rows);
    } else {
        print_table(&["NAME", "PROTOCOL", "LABELS"], &rows);
    }
    Ok(())
}

fn rm(client: &Client, target: &str) -> anyhow::Result<()> {
    let Some((kind, name)) = target.split_once('/') else {
        bail!("say what to remove as KIND/NAME, e.g. role/dba, user/alice, token/ID, lock/ID");
    };
    let path = match kind.trim_end_matches('s') {
        "role" => format!("/v1/roles/{}", encode(name)),
        "user" => format!("/v1/users/{}", encode(name)),
        "token" => format!("/v1/tokens/{}", encode(name)),
        "lock" => format!("/v1/locks/{}", encode(name)),
        "node" => format!("/v1/hosts/{}", encode(name)),
        _ => bail!("cannot remove {kind:?}: expected role, user, token, lock or node"),
    };
    client.delete(&path)?;
    println!("{kind} {name} removed");
    Ok(())
}

// ---- lock ----

fn lock(client: &Client, args: LockArgs) -> anyhow::Result<()> {
    use jaunt_config::resource::{Lock, LockSpec, LockTarget, Metadata};
    let t = args.target;
    let target = if let Some(u) = t.user {
        LockTarget::User(u)
    } else if let Some(r) = t.role {
        LockTarget::Role(r)
    } else if let Some(n) = t.node {
        LockTarget::Node(n)
    } else if let Some(l) = t.login {
        LockTarget::Login(l)
    } else {
        bail!("say what to lock: --user, --role, --node or --login");
    };
    let ttl = args
        .ttl
        .as_deref()
        .map(|s| {
            s.parse::<jaunt_config::duration::Duration>()
                .map_err(|e| anyhow!("--ttl {s:?}: {e}"))
        })
        .transpose()?;
    let mut id_bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id_bytes)
        .map_err(|_| anyhow!("no randomness"))?;
    let lock = Lock {
        metadata: Metadata::named(hex::encode(id_bytes)),
        spec: LockSpec {
            target: target.clone(),
            message: args.message,
            ttl,
        },
    };
    // A lock on a user that does not exist is kept (the user may be created later, or exist
    // in an identity provider), but it is most likely a typo: say so.
    if let LockTarget::User(name) = &target {
        if let Ok(users) = client.get_json::<Vec<UserInfo>>("/v1/users") {
            if !users.iter().any(|u| &u.name == name) {
                eprintln!(
                    "warning: there is no user {name:?} (see `jaunt users ls`); the lock is kept \
                     and applies if such a user appears"
                );
            }
        }
    }
    let resp: serde_json::Value = client.post_json("/v1/resources", &Resource::Lock(lock))?;
    let id = resp
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    println!("Locked {} {} (lock/{id}).", target.kind(), target.value());
    Ok(())
}

// ---- ca ----

fn ca(client: &Client, cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Rotate {
            ty,
            phase,
            grace,
            force,
        } => {
            let grace_secs = grace.as_deref().map(parse_duration_secs).transpose()?;
            let resp: jaunt_config::api::RotateResponse = client.post_json(
                "/v1/ca/rotate",
                &jaunt_config::api::RotateRequest {
                    r#type: ty,
                    phase,
                    grace_secs,
                    force,
                },
            )?;
            for ca in &resp.cas {
                println!("{} CA: phase {}", ca.r#type, ca.phase);
                println!("  signing:    {}", ca.signing);
                if let Some(other) = &ca.additional {
                    println!("  also trusted: {other}");
                }
                if let Some(at) = ca.next_phase_at {
                    println!("  next phase at {}", crate::audit::rfc3339(at));
                }
            }
            Ok(())
        }
        CaCommand::Export { ty } => {
            let export: CaExport = client.get_json(&format!("/v1/ca/{}", encode(&ty)))?;
            print!("{}", export.text);
            Ok(())
        }
        CaCommand::SignHost { host, out, ttl } => {
            let ttl_secs = ttl.as_deref().map(parse_duration_secs).transpose()?;
            let key =
                ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
            let public = key.public_key().to_openssh()?;
            let resp: SignHostResponse = client.post_json(
                "/v1/ca/sign-host",
                &SignHostRequest {
                    host: host.clone(),
                    ssh_public_key: public.clone(),
                    ttl_secs,
                },
            )?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let key_path = out.join(&host);
            profile::write_private(
                &key_path,
                key.to_openssh(ssh_key::LineEnding::LF)?.as_bytes(),
            )?;
            write_public(&out.join(format!("{host}.pub")), &format!("{public}\n"))?;
            write_public(
                &out.join(format!("{host}-cert.pub")),
                &format!("{}\n", resp.ssh_cert.trim()),
            )?;
            println!("Wrote {0}, {0}.pub and {0}-cert.pub.", key_path.display());
            println!("For sshd_config:");
            println!("  HostKey {}", key_path.display());
            println!("  HostCertificate {}-cert.pub", key_path.display());
            // The same layout as the README's walk-through (`--out /etc/ssh/jaunt`).
            let user_ca = out.join("user_ca.pub");
            println!(
                "  TrustedUserCAKeys {}   # from: jaunt ca export --type user-ssh > {}",
                user_ca.display(),
                user_ca.display()
            );
            Ok(())
        }
        CaCommand::SignDb { host, out, ttl } => {
            let ttl_secs = ttl.as_deref().map(parse_duration_secs).transpose()?;
            crate::db_cmd::sign_db(client, &host, &out, ttl_secs)
        }
    }
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    profile::write_private(path, text.as_bytes())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", path.display()))
}

// ---- audit ----

fn audit_search(
    client: &Client,
    since: Option<String>,
    until: Option<String>,
    ty: Option<String>,
    user: Option<String>,
    format: Format,
) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if let Some(s) = since {
        query.push(format!("since={}", parse_time(&s)?));
    }
    if let Some(u) = until {
        query.push(format!("until={}", parse_time(&u)?));
    }
    if let Some(t) = ty {
        query.push(format!("type={}", encode(&t)));
    }
    if let Some(u) = user {
        query.push(format!("user={}", encode(&u)));
    }
    let path = if query.is_empty() {
        "/v1/audit".to_string()
    } else {
        format!("/v1/audit?{}", query.join("&"))
    };
    let events: Vec<serde_json::Value> = client.get_json(&path)?;
    if format != Format::Text {
        return print_structured(&events, format);
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            let mut rest = e.as_object().cloned().unwrap_or_default();
            for k in ["time", "code", "event", "user", "uid"] {
                rest.remove(k);
            }
            human_times(&mut rest);
            vec![
                s("time"),
                s("code"),
                s("event"),
                s("user"),
                serde_json::Value::Object(rest).to_string(),
            ]
        })
        .collect();
    print_table(&["TIME", "CODE", "EVENT", "USER", "DETAILS"], &rows);
    Ok(())
}

/// Event fields that hold unix seconds (`expires` of logins, certificates and tokens, ...).
const AUDIT_TIME_FIELDS: &[&str] = &["expires", "not_before", "started", "ended"];

/// For the text table: the unix-seconds fields of an event's details as RFC 3339 UTC, as its
/// `time` column is. `--format json|yaml` keeps the numbers.
fn human_times(details: &mut serde_json::Map<String, serde_json::Value>) {
    for key in AUDIT_TIME_FIELDS {
        if let Some(value) = details.get_mut(*key) {
            if let Some(secs) = value.as_u64() {
                *value = crate::audit::rfc3339(secs).into();
            }
        }
    }
}

/// `1h` (that long ago) or an RFC 3339 time, as unix seconds.
fn parse_time(s: &str) -> anyhow::Result<u64> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return u64::try_from(t.unix_timestamp()).map_err(|_| anyhow!("{s}: before 1970"));
    }
    let ago = parse_duration_secs(s)
        .map_err(|_| anyhow!("{s:?}: expected a duration such as 1h, or an RFC 3339 time"))?;
    Ok(unix_now().saturating_sub(ago))
}

// ---- helpers ----

fn parse_duration_secs(s: &str) -> anyhow::Result<u64> {
    let d: jaunt_config::duration::Duration = s.parse().map_err(|e| anyhow!("{s:?}: {e}"))?;
    Ok(d.as_secs())
}

/// `12h0m`, `29m59s`, `3d4h` (the web UI shows the same).
pub use jaunt_config::duration::human as human_duration;

/// Percent-encodes a path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print_structured<T: serde::Serialize + ?Sized>(value: &T, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// Resources as YAML documents separated by `---`, the shape `jaunt create -f` reads.
fn print_yaml_docs<T: serde::Serialize>(items: &[T]) -> anyhow::Result<()> {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            println!("---");
        }
        print!("{}", serde_yaml_ng::to_string(item)?);
    }
    Ok(())
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!(
                    "{:<w$}  ",
                    c,
                    w = widths.get(i).copied().unwrap_or(0)
                ));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        command().debug_assert();
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(human_duration(12 * 3600), "12h0m");
        assert_eq!(human_duration(1799), "29m59s");
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(3 * 86400 + 4 * 3600), "3d4h");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(encode("alice@example.com"), "alice@example.com");
    }
}
