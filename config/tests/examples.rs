//! The shipped examples (`config/examples/`) parse, and bad configs fail with the exact text an
//! operator would see, line and column included.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use jaunt_config::file::{self, AppProtocol, DbProtocol, Shards, TokenSource};
use jaunt_config::resource::{self, Resource};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

#[test]
fn single_host_example_parses() {
    let config = file::load(&example("single-host.yaml")).unwrap();
    let control = config.control.expect("control");
    assert_eq!(control.cluster_name, "example.com");
    let engine = config.engine.expect("engine");
    assert_eq!(engine.public_addr.to_string(), "proxy.example.com:443");
    assert_eq!(engine.listen_addr.to_string(), "0.0.0.0:443");
    assert_eq!(engine.shards, Shards::Auto);
    assert!(engine.tls.is_some());
    assert_eq!(
        config.audit.file.expect("audit file").max_size_bytes,
        100 * 1024 * 1024
    );
    assert!(config.agent.is_none());
}

#[test]
fn engine_only_example_parses() {
    let config = file::load(&example("engine-only.yaml")).unwrap();
    assert!(config.control.is_none());
    let engine = config.engine.expect("engine");
    assert_eq!(
        engine.control_addr.expect("control_addr").to_string(),
        "control.internal.example.com:3025"
    );
    assert_eq!(engine.max_connections_per_shard, 50_000);
}

#[test]
fn agent_example_parses() {
    let config = file::load(&example("agent.yaml")).unwrap();
    let agent = config.agent.expect("agent");
    assert_eq!(agent.name, "node1");
    assert_eq!(
        agent.token,
        Some(TokenSource::File("/etc/jaunt/token".into()))
    );
    assert!(agent.ca_pin.is_some());
    assert!(agent.services.ssh.is_some());
    assert_eq!(agent.services.apps.len(), 2);
    assert_eq!(agent.services.apps[0].protocol, AppProtocol::Http);
    assert_eq!(agent.services.apps[1].protocol, AppProtocol::Tcp);
    assert_eq!(agent.services.dbs[0].addr.to_string(), "127.0.0.1:5432");
    assert_eq!(agent.services.dbs[1].protocol, DbProtocol::Mysql);
    assert_eq!(agent.services.dbs[1].addr.to_string(), "127.0.0.1:3306");
}

#[test]
fn roles_example_parses_and_round_trips() {
    let path = example("roles.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let resources = resource::parse_resources("roles.yaml", &text).unwrap();
    let names: Vec<&str> = resources.iter().map(Resource::name).collect();
    assert_eq!(names, ["developer", "dba", "alice@example.com"]);
    let printed = resource::to_yaml(&resources).unwrap();
    assert_eq!(
        resource::parse_resources("printed.yaml", &printed).unwrap(),
        resources
    );
}

/// Every YAML file in examples/ is covered: config files by `file::load`, resource files
/// (documents with `kind:`) by `parse_resources`.
#[test]
fn every_example_yaml_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        if text.lines().any(|line| line.starts_with("kind:")) {
            resource::parse_resources(&name, &text).unwrap_or_else(|e| panic!("{e}"));
        } else {
            file::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert!(seen >= 4, "examples/ has {seen} YAML files");
}

#[test]
fn systemd_unit_has_what_an_edge_host_needs() {
    let unit = std::fs::read_to_string(example("jaunt.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/jaunt start --config /etc/jaunt/jaunt.yaml",
        "LimitNOFILE=1048576",
        "LimitMEMLOCK=infinity",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "User=jaunt",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line:?}");
    }
    assert!(
        !unit.lines().any(|l| l.starts_with("SystemCallFilter=")),
        "would break io_uring"
    );
}

#[test]
fn systemd_takeover_dropin_makes_reload_a_takeover() {
    let dropin = std::fs::read_to_string(example("jaunt-takeover.conf")).unwrap();
    let lines: Vec<&str> = dropin.lines().collect();
    for line in [
        "[Service]",
        "Type=notify",
        "NotifyAccess=all",
        "ExecReload=",
    ] {
        assert!(lines.contains(&line), "missing {line:?}");
    }
    let reload = lines
        .iter()
        .position(|l| *l == "ExecReload=")
        .and_then(|i| lines.get(i + 1))
        .unwrap();
    assert!(
        reload.starts_with("ExecReload=")
            && reload.contains("jaunt start --config /etc/jaunt/jaunt.yaml --takeover"),
        "{reload}"
    );
}

const ENGINE: &str =
    "engine:\n  public_addr: proxy.example.com:443\n  control_addr: c.example.com:3025\n";
const AGENT: &str = "agent:\n  proxy_addr: proxy.example.com:443\n  name: node1\n";

/// (config text, exact error)
fn bad_configs() -> Vec<(String, &'static str)> {
    vec![
        (
            format!("{ENGINE}  shards: lots\n"),
            r#"jaunt.yaml:4:11: engine.shards: expected a number or "auto""#,
        ),
        (
            format!("{ENGINE}  shards: 0\n"),
            r#"jaunt.yaml:4:11: engine.shards: expected a number >= 1 or "auto""#,
        ),
        (
            format!("{ENGINE}  sharts: 4\n"),
            "jaunt.yaml:4:3: engine.sharts: unknown key (expected one of: public_addr, \
             listen_addr, shards, io_memory, diag_addr, handshake_timeout, idle_timeout, \
             max_connections_per_shard, max_handshakes_per_shard, tls, control_addr)",
        ),
        (
            format!("{ENGINE}clustr_name: x\n"),
            "jaunt.yaml:4:1: clustr_name: unknown key (expected one of: version, cluster_name, \
             data_dir, log, control, engine, audit, agent, recordings, storage)",
        ),
        (
            "cluster_name: example.com\ncontrol:\nengine:\n  listen_addr: 0.0.0.0:443\n".into(),
            "jaunt.yaml:3:1: engine.public_addr: required: the host:port users and agents dial, \
             such as proxy.example.com:443",
        ),
        (
            "engine:\n  public_addr: proxy.example.com\n".into(),
            "jaunt.yaml:2:16: engine.public_addr: expected host:port such as \
             proxy.example.com:443 (the port is missing)",
        ),
        (
            "engine:\n  public_addr: proxy.example.com:443\n".into(),
            "jaunt.yaml:1:1: engine.control_addr: required when this host does not run control: \
             where the engine reaches control, such as control.example.com:3025",
        ),
        (
            format!("{ENGINE}  idle_timeout: 1 hour\n"),
            "jaunt.yaml:4:17: engine.idle_timeout: expected a duration such as 30m or 12h",
        ),
        (
            format!("{ENGINE}  handshake_timeout: 10\n"),
            "jaunt.yaml:4:22: engine.handshake_timeout: expected a duration such as 30m or 12h \
             (add a unit to 10, such as 10s)",
        ),
        (
            format!("{ENGINE}  io_memory: 64 kilobytes\n"),
            "jaunt.yaml:4:14: engine.io_memory: expected a size in bytes such as 65536, 64KiB \
             or 10MiB",
        ),
        (
            format!("{ENGINE}  tls:\n    key_file: /etc/jaunt/tls.key\n"),
            "jaunt.yaml:4:3: engine.tls.cert_file: required with key_file (set both or neither)",
        ),
        (
            format!("{AGENT}  ca_pin: sha256:abc\n"),
            r#"jaunt.yaml:4:11: agent.ca_pin: expected "sha256:" followed by 64 hex characters"#,
        ),
        (
            format!("{AGENT}  services:\n    apps:\n      - name: grafana\n        uri: ftp://127.0.0.1:21\n"),
            "jaunt.yaml:7:9: agent.services.apps[0].uri: expected a URI starting with http://, \
             https:// or tcp:// (found ftp://)",
        ),
        (
            format!("{AGENT}  services:\n    dbs: [ {{ name: pg1, uri: '127.0.0.1:5432' }} ]\n"),
            "jaunt.yaml:5:25: agent.services.dbs[0].uri: expected a URI starting with postgres:// or mysql://",
        ),
        (
            format!("{AGENT}  token: abc\n  token_file: /etc/jaunt/token\n"),
            "jaunt.yaml:5:3: agent.token_file: set token or token_file, not both",
        ),
        (
            format!("{AGENT}  labels: {{ env: [prod] }}\n"),
            "jaunt.yaml:4:18: agent.labels.env: expected a string, found a list",
        ),
        (
            "control:\n  second_factor: sms\ncluster_name: example.com\n".into(),
            r#"jaunt.yaml:2:18: control.second_factor: unknown value "sms" (expected one of: otp, off)"#,
        ),
        (
            "control:\ncluster_name: example.com\naudit:\n  queue_capacity: many\n".into(),
            r#"jaunt.yaml:4:19: audit.queue_capacity: expected a whole number, found "many""#,
        ),
        (
            "control:\ncluster_name: example.com\naudit: { on_overflow: block }\n".into(),
            r#"jaunt.yaml:3:23: audit.on_overflow: unknown value "block" (expected one of: reject, drop)"#,
        ),
        (
            "control:\n  listen_addr: 127.0.0.1:3025\n".into(),
            "jaunt.yaml:1:1: cluster_name: required when this host runs control \
             (a DNS-style name such as example.com)",
        ),
        (
            "version: v2\ncontrol:\ncluster_name: example.com\n".into(),
            r#"jaunt.yaml:1:1: version: unsupported version "v2" (expected v1)"#,
        ),
        (
            "data_dir: /var/lib/jaunt\n".into(),
            "jaunt.yaml:1:1: nothing to run: add a control, engine or agent section",
        ),
        (
            format!("{ENGINE}  shards: [auto\n"),
            "jaunt.yaml:5:1: invalid YAML: did not find expected ',' or ']', \
             while parsing a flow sequence at line 4 column 11",
        ),
    ]
}

#[test]
fn bad_configs_fail_with_exact_messages() {
    let mut failures = Vec::new();
    for (text, expected) in bad_configs() {
        match file::parse("jaunt.yaml", &text) {
            Ok(_) => failures.push(format!("accepted:\n{text}")),
            Err(error) if error.to_string() != expected => failures.push(format!(
                "config:\n{text}\nexpected: {expected}\n     got: {error}"
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn bad_resources_fail_with_exact_messages() {
    let role = "kind: role\nversion: v1\nmetadata:\n  name: dev\nspec:\n";
    let cases = [
        (
            format!("{role}  allow:\n    logins: [ubuntu]\n    node_lables: {{ env: dev }}\n"),
            "roles.yaml:8:5: spec.allow.node_lables: unknown key (expected one of: logins, \
             node_labels, app_labels, db_labels, db_users, db_names, rules)",
        ),
        (
            format!("{role}  options:\n    max_session_ttl: 1 day\n"),
            "roles.yaml:7:22: spec.options.max_session_ttl: expected a duration such as 30m or 12h",
        ),
        (
            format!("{role}  options:\n    permit_pty: maybe\n"),
            r#"roles.yaml:7:17: spec.options.permit_pty: expected a boolean, found "maybe""#,
        ),
        (
            format!("{role}  allow:\n    rules: [ {{ resources: [role], verbs: [edit] }} ]\n"),
            r#"roles.yaml:7:43: spec.allow.rules[0].verbs[0]: unknown verb "edit" (expected one of: list, read, create, update, delete, join, *)"#,
        ),
        (
            format!("{role}  {{}}\n---\nkind: lock\nversion: v1\nmetadata: {{ name: l1 }}\nspec:\n  target: {{}}\n"),
            "roles.yaml:12:3: spec.target: expected exactly one of: user, role, node, login",
        ),
    ];
    for (text, expected) in cases {
        let error = resource::parse_resources("roles.yaml", &text).unwrap_err();
        assert_eq!(error.to_string(), expected, "\n{text}");
    }
}

/// Truncated files (every prefix of every example) and pathological nesting produce an error or
/// a config, never a panic or a hang.
#[test]
fn truncated_and_pathological_input_never_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for end in (0..=text.len()).filter(|&end| text.is_char_boundary(end)) {
            let prefix = &text[..end];
            let _ = file::parse("prefix.yaml", prefix);
            let _ = resource::parse_resources("prefix.yaml", prefix);
        }
    }
    let deep = format!("engine: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    assert!(file::parse("deep.yaml", &deep).is_err());
    let deep_map = format!("kind: role\nspec: {}\n", "{a: ".repeat(5_000));
    assert!(resource::parse_resources("deep.yaml", &deep_map).is_err());
    let aliases = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                   c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                   e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
                   g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
    assert!(file::parse("laughs.yaml", aliases).is_err());
    assert!(resource::parse_resources("laughs.yaml", aliases).is_err());
}
