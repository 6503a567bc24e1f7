//! The audit log end to end through the real `jaunt` binary: agents' events through
//! `POST /v1/audit/events` (who may send what, acknowledged = durable across `kill -9`), and the
//! JSON-lines file sink with rotation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jaunt_config::api::{AgentEvent, DbQueryEvent, EVENTS_PATH};
use jaunt_config::api::{Certs, JoinRequest};
use jaunt_config::identity::unix_now;
use jaunt_control::ca::LocalKeys;
use jaunt_control::client::{Client, Trust};
use jaunt_control::profile::Profile;
use support::*;

/// An agent's API client: joins with a fresh token of `types` as `name`; returns the client
/// (with the host certificate) and the host id control assigned.
fn join_agent(c: &Cluster, types: &str, name: &str) -> (Client, String) {
    let out = ok(c.admin(&["tokens", "add", "--type", types], None));
    let token = out.lines().next().unwrap().trim().to_string();
    let open = Client::new(&c.public_addr, Trust::Pin(c.pin.clone()), None).unwrap();
    let keys = LocalKeys::generate().unwrap();
    let certs: Certs = open
        .post_json(
            "/v1/join",
            &JoinRequest {
                token,
                host_name: name.to_string(),
                tls_public_key: keys.tls_public_pem.clone(),
                ssh_public_key: keys.ssh_public_line(),
            },
        )
        .unwrap();
    let profile = Profile {
        dir: c.dir.path().join(format!("host-{name}")),
    };
    profile.save(&c.public_addr, &keys, &certs).unwrap();
    let client = Client::new(
        &c.public_addr,
        Trust::Roots(profile.host_ca().unwrap()),
        Some(profile.tls_identity(&certs.identity.name).unwrap()),
    )
    .unwrap();
    (client, certs.identity.name)
}

fn query(user: &str, text: &str) -> AgentEvent {
    AgentEvent::DbQuery(DbQueryEvent {
        uid: random_uid(),
        time: unix_now(),
        user: user.into(),
        service: "pg1".into(),
        db_user: user.into(),
        database: "postgres".into(),
        client_addr: "127.0.0.1:40000".into(),
        kind: "query".into(),
        statement: String::new(),
        query: text.into(),
        truncated: false,
        session_id: String::new(),
    })
}

fn uid_of(e: &AgentEvent) -> String {
    match e {
        AgentEvent::DbQuery(q) => q.uid.clone(),
        AgentEvent::AppRequest(r) => r.uid.clone(),
        AgentEvent::AccessDenied(d) => d.uid.clone(),
        AgentEvent::SessionExec(e) => e.uid.clone(),
        AgentEvent::FileTransfer(e) => e.uid.clone(),
        AgentEvent::SessionRecorded(e) => e.uid.clone(),
    }
}

fn random_uid() -> String {
    jaunt_control::audit::uid()
}

/// Posts `body`; returns (status, body text).
fn post(client: &Client, body: &[u8]) -> (u16, String) {
    let (status, answer) = client.request("POST", EVENTS_PATH, Some(body)).unwrap();
    (status, String::from_utf8_lossy(&answer).into_owned())
}

#[test]
fn agents_send_their_own_events_and_nothing_else() {
    let c = Cluster::dev();
    let (db_agent, db_host) = join_agent(&c, "db", "dbhost");

    // A batch is committed under the certificate's host, visible to `jaunt audit search`.
    let events = vec![query("alice", "select 1"), query("bob", "select 2")];
    let (status, answer) = post(&db_agent, &serde_json::to_vec(&events).unwrap());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, r#"{"accepted":2}"#);
    let found = c.audit_events(Some("db.query"));
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0]["code"], "JA2200I");
    assert_eq!(found[0]["user"], "alice");
    assert_eq!(found[0]["query"], "select 1");
    assert_eq!(found[0]["host"], db_host.as_str());
    assert_eq!(found[0]["host_name"], "dbhost");
    assert_eq!(found[0]["uid"], uid_of(&events[0]).as_str());
    let alice = ok(c.admin(
        &["audit", "search", "--user", "bob", "--format", "json"],
        None,
    ));
    assert!(
        alice.contains("select 2") && !alice.contains("select 1"),
        "{alice}"
    );

    // Speaking for another host: `host` is not a field an agent sends.
    let mut v = serde_json::to_value(vec![query("alice", "x")]).unwrap();
    v[0]["host"] = "someone-else".into();
    let (status, answer) = post(&db_agent, &serde_json::to_vec(&v).unwrap());
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("unknown field `host`"), "{answer}");
    // Not an agent event type.
    let mut v = serde_json::to_value(vec![query("alice", "x")]).unwrap();
    v[0]["event"] = "session.end".into();
    let (status, answer) = post(&db_agent, &serde_json::to_vec(&v).unwrap());
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("session.end"), "{answer}");
    // A bad field names the event and the field.
    let mut v = serde_json::to_value(vec![query("alice", "x"), query("alice", "y")]).unwrap();
    v[1]["uid"] = "not-hex".into();
    let (status, answer) = post(&db_agent, &serde_json::to_vec(&v).unwrap());
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("event 1: uid"), "{answer}");
    // Too many events in one batch; too many bytes.
    let many: Vec<AgentEvent> = (0..1001).map(|i| query("alice", &i.to_string())).collect();
    let (status, answer) = post(&db_agent, &serde_json::to_vec(&many).unwrap());
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("at most 1000"), "{answer}");
    let big: Vec<AgentEvent> = (0..40)
        .map(|_| query("alice", &"x".repeat(16_000)))
        .collect();
    let (status, answer) = post(&db_agent, &serde_json::to_vec(&big).unwrap());
    assert_eq!(status, 413, "{answer}");
    // Nothing of a refused batch was kept.
    assert_eq!(c.audit_events(Some("db.query")).len(), 2);

    // A host without the db role cannot send db.query; a user cannot send anything.
    let (node_agent, _) = join_agent(&c, "node", "nodehost");
    let (status, answer) = post(
        &node_agent,
        &serde_json::to_vec(&vec![query("alice", "select 3")]).unwrap(),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("db token"), "{answer}");
    let admin = Profile::admin(&c.data_dir);
    let info = admin.load().unwrap().unwrap();
    let as_admin = Client::new(
        &c.public_addr,
        Trust::Roots(admin.host_ca().unwrap()),
        Some(admin.tls_identity(&info.user).unwrap()),
    )
    .unwrap();
    let (status, answer) = post(
        &as_admin,
        &serde_json::to_vec(&vec![query("alice", "select 4")]).unwrap(),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("host certificates"), "{answer}");
    assert_eq!(c.audit_events(Some("db.query")).len(), 2);

    // Any joined host may report a stream its own authorization check refused.
    let denial = AgentEvent::AccessDenied(jaunt_config::api::AccessDeniedEvent {
        uid: random_uid(),
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        user: "mallory".into(),
        roles: vec!["access".into()],
        kind: "ssh".into(),
        target: "nodehost".into(),
        login: Some("root".into()),
        db_user: None,
        client_addr: "127.0.0.1:40001".into(),
        reason: "access to node nodehost denied: locked".into(),
    });
    let (status, answer) = post(&node_agent, &serde_json::to_vec(&vec![denial]).unwrap());
    assert_eq!(status, 200, "{answer}");
    let denied = c.audit_events(Some("access.denied"));
    assert!(
        denied.iter().any(|e| e["user"] == "mallory"
            && e["host_name"] == "nodehost"
            && e["login"] == "root"),
        "{denied:?}"
    );
}

#[test]
fn acknowledged_agent_events_survive_kill_9() {
    const THREADS: usize = 4;
    const BATCH: usize = 10;
    const MAX_BATCHES: usize = 150;
    const KILL_AFTER_EVENTS: usize = 600;
    let c = Cluster::dev();
    let (client, _) = join_agent(&c, "db", "dbhost");
    let client = Arc::new(client);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers: Vec<std::thread::JoinHandle<bool>> = Vec::new();
    for t in 0..THREADS {
        let (client, acked) = (client.clone(), acked.clone());
        writers.push(std::thread::spawn(move || {
            for b in 0..MAX_BATCHES {
                let events: Vec<AgentEvent> = (0..BATCH)
                    .map(|i| query("alice", &format!("select {t}-{b}-{i}")))
                    .collect();
                let body = serde_json::to_vec(&events).unwrap();
                match client.request("POST", EVENTS_PATH, Some(&body)) {
                    Ok((200, _)) => acked.lock().unwrap().extend(events.iter().map(uid_of)),
                    Ok((status, answer)) => panic!(
                        "refused a valid batch: {status} {}",
                        String::from_utf8_lossy(&answer)
                    ),
                    // The process is gone: this writer was cut mid-stream.
                    Err(_) => return true,
                }
            }
            false
        }));
    }
    // Kill once enough has been acknowledged (observed, not timed), with writers in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < KILL_AFTER_EVENTS {
        assert!(
            Instant::now() < deadline,
            "only {} events acknowledged",
            acked.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = c;
    c.child.kill().unwrap(); // SIGKILL
    c.child.wait().unwrap();
    let cut = writers
        .into_iter()
        .map(|w| w.join().unwrap())
        .filter(|cut| *cut)
        .count();
    assert!(cut > 0, "the kill came after every writer had finished");
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(acked.len() >= KILL_AFTER_EVENTS);

    let db = c.data_dir.join("jaunt.db");
    let store = jaunt_control::store::Store::open(&db).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    drop(store);

    // Restart on the same data dir: every acknowledged event is in `jaunt audit search`.
    let c2 = Cluster::dev_on(&c.data_dir);
    let found: HashSet<String> = c2
        .audit_events(Some("db.query"))
        .iter()
        .filter_map(|e| e["uid"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|u| !found.contains(*u)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}

/// Lines of the JSON-lines audit file and its rotated files, oldest first; asserts that no
/// file is over `max_size` (each holds at least one line).
fn audit_file_lines(path: &Path, max_files: u32, max_size: u64) -> (Vec<serde_json::Value>, u32) {
    let mut rotated = 0;
    let mut files: Vec<PathBuf> = Vec::new();
    for n in (1..=max_files).rev() {
        let p = PathBuf::from(format!("{}.{n}", path.display()));
        if p.exists() {
            rotated += 1;
            files.push(p);
        }
    }
    files.push(path.to_path_buf());
    let mut lines = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(
            text.len() as u64 <= max_size || text.lines().count() == 1,
            "{} is {} bytes, over {max_size}",
            f.display(),
            text.len()
        );
        assert!(text.is_empty() || text.ends_with('\n'), "{}", f.display());
        for line in text.lines() {
            lines.push(
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", f.display())),
            );
        }
    }
    (lines, rotated)
}

#[test]
fn the_audit_file_holds_every_committed_event_in_order_across_rotations() {
    use jaunt_control::audit::Audit;
    use jaunt_control::audit_file::AuditFile;
    // In process: the store and the sink as the daemon wires them, with writers racing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let store = Arc::new(jaunt_control::store::Store::open(&dir.path().join("jaunt.db")).unwrap());
    let config = jaunt_config::file::AuditFileConfig {
        path: path.clone(),
        max_size_bytes: 4096,
        max_files: 1000,
    };
    let audit = Audit::with_file(
        store.clone(),
        Some(Arc::new(AuditFile::open(&config).unwrap())),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let audit = audit.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    audit.emit(
                        jaunt_control::audit::TOKEN_CREATED,
                        Some("admin"),
                        &serde_json::json!({"user": "admin", "n": format!("{t}-{i}")}),
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (lines, rotated) = audit_file_lines(&path, config.max_files, config.max_size_bytes);
    assert!(rotated >= 5, "rotated {rotated} times");
    let stored: Vec<serde_json::Value> = store
        .audit_search(&Default::default())
        .unwrap()
        .iter()
        .map(|e| serde_json::from_str(&e.event).unwrap())
        .collect();
    assert_eq!(stored.len(), 400);
    assert_eq!(
        lines, stored,
        "the file is the store's events, in commit order"
    );
}

#[test]
fn a_cluster_writes_and_rotates_its_audit_file() {
    const MAX_SIZE: u64 = 8 * 1024;
    const MAX_FILES: u32 = 500;
    let c = Cluster::with_config(
        "cluster_name: audit.test\n\
         data_dir: DATA_DIR\n\
         control:\n  listen_addr: 127.0.0.1:0\n\
         engine:\n  public_addr: 127.0.0.1:0\n  listen_addr: 127.0.0.1:0\n  diag_addr: 127.0.0.1:0\n\
         audit:\n  file: { path: DATA_DIR/audit.jsonl, max_size: 8KiB, max_files: 500 }\n",
    );
    let path = c.data_dir.join("audit.jsonl");
    // Events of every source: control's own (tokens, a join) and an agent's batches.
    for _ in 0..10 {
        ok(c.admin(&["tokens", "add", "--type", "node"], None));
    }
    let (agent, _) = join_agent(&c, "db", "dbhost");
    for b in 0..5 {
        let events: Vec<AgentEvent> = (0..50)
            .map(|i| query("alice", &format!("select {b}, {i}")))
            .collect();
        let (status, answer) = post(&agent, &serde_json::to_vec(&events).unwrap());
        assert_eq!(status, 200, "{answer}");
    }
    let stored = c.audit_events(None);
    assert!(stored.len() >= 260, "{}", stored.len());
    // The file lags the store by at most the write after a commit: poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (lines, rotated) = loop {
        let (lines, rotated) = audit_file_lines(&path, MAX_FILES, MAX_SIZE);
        if lines.len() >= stored.len() || Instant::now() > deadline {
            break (lines, rotated);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(rotated >= 3, "rotated {rotated} times");
    let in_file: Vec<&str> = lines.iter().map(|l| l["uid"].as_str().unwrap()).collect();
    let in_store: Vec<&str> = stored.iter().map(|l| l["uid"].as_str().unwrap()).collect();
    let unique: BTreeSet<&str> = in_file.iter().copied().collect();
    assert_eq!(unique.len(), in_file.len(), "no event twice in the file");
    assert_eq!(
        in_file[..in_store.len()],
        in_store[..],
        "every committed event, in order"
    );
    assert_eq!(
        lines[..stored.len()],
        stored[..],
        "the same JSON as audit search"
    );
}
