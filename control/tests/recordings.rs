//! Recordings: the agent's uploader to control's storage, and the `s3` backend against a real
//! local S3-compatible server.
//!
//! The S3 stand-in is **moto** (PyPI `moto[server]`, `moto_server`), started on 127.0.0.1 port 0
//! by each test; `.ci/run` installs it. Without `moto_server` on PATH the S3 tests fail in CI
//! (`CI=true`) and are skipped with a printed reason elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jaunt_agent::recording::{RecordingEnd, RecordingKind, RecordingMeta, Spool, SpoolLimits};
use jaunt_config::file::S3Config;
use jaunt_control::recordings::s3::S3Backend;
use jaunt_control::recordings::{http1, sigv4, Backend, CompleteUpload, Recordings};
use support::*;

fn meta(session: &str, user: &str) -> RecordingMeta {
    RecordingMeta {
        session_id: session.into(),
        user: user.into(),
        login: "root".into(),
        node: "node1".into(),
        kind: RecordingKind::Shell,
        width: 80,
        height: 24,
        command: None,
        started: jaunt_config::identity::unix_now(),
        record_input: false,
    }
}

/// A finished recording of `lines` output lines in `spool`; returns its id.
fn record(spool: &Spool, session: &str, lines: usize) -> String {
    let mut rec = spool.start(meta(session, "alice")).unwrap();
    for i in 0..lines {
        rec.output(format!("line {i} of session {session}: {}\r\n", "x".repeat(60)).as_bytes())
            .unwrap();
    }
    rec.finish(RecordingEnd {
        exit_status: Some(0),
        bytes_in: 3,
        bytes_out: 100,
    })
    .unwrap()
    .0
}

fn wait_until(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_agent_uploads_spooled_recordings_to_control_and_empties_its_spool() {
    let c = Cluster::dev();
    // Recordings an earlier agent run left in its spool: one big (several upload chunks), one
    // interrupted by a crash.
    let agent_data = c.dir.path().join("agent-rec1");
    let spool_dir = agent_data.join("recordings");
    let spool = Spool::open(&spool_dir, SpoolLimits::default()).unwrap();
    let big = record(&spool, "s-big", 12_000);
    let mut cut = spool.start(meta("s-cut", "bob")).unwrap();
    cut.output(b"half a session").unwrap();
    let cut_id = cut.id().0.clone();
    std::mem::forget(cut);
    let big_bytes = std::fs::read(spool_dir.join(format!("{big}.cast"))).unwrap();
    assert!(big_bytes.len() > 3 * 256 * 1024, "{}", big_bytes.len());
    let cut_bytes = std::fs::read(spool_dir.join(format!("{cut_id}.cast"))).unwrap();
    drop(spool);

    let (_agent, _) = start_agent(&c, "rec1", &[]);
    let stored = c.data_dir.join("recordings");
    wait_until(
        "both recordings in control",
        Duration::from_secs(30),
        || {
            stored.join(format!("{big}.json")).exists()
                && stored.join(format!("{cut_id}.json")).exists()
        },
    );
    assert_eq!(
        std::fs::read(stored.join(format!("{big}.cast"))).unwrap(),
        big_bytes
    );
    assert_eq!(
        std::fs::read(stored.join(format!("{cut_id}.cast"))).unwrap(),
        cut_bytes
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored.join(format!("{cut_id}.json"))).unwrap())
            .unwrap();
    assert_eq!(info["interrupted"], true);
    assert_eq!(info["user"], "bob");
    assert_eq!(info["session_id"], "s-cut");
    // Deleted from the spool only after control acknowledged.
    wait_until("the spool to empty", Duration::from_secs(10), || {
        std::fs::read_dir(&spool_dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.ends_with(".cast") || n.ends_with(".json")
            })
            .count()
            == 0
    });
    let uploads = c.audit_events(Some("recording.upload"));
    assert!(
        uploads.iter().any(|e| e["recording_id"] == big.as_str()),
        "{uploads:?}"
    );

    // `jaunt recordings ls`, with filters and formats.
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(c.admin(&["recordings", "ls", "--format", "json"], None)))
            .unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let text = ok(c.admin(&["recordings", "ls", "--user", "bob"], None));
    assert!(text.contains(&cut_id) && !text.contains(&big), "{text}");
    assert!(text.contains("(interrupted)"), "{text}");
    let yaml = ok(c.admin(
        &["recordings", "ls", "--since", "1h", "--format", "yaml"],
        None,
    ));
    assert!(yaml.contains(&big), "{yaml}");

    // `jaunt play`: not a terminal, so at once; the cast file as stored; the events as JSON.
    let played = ok(c.admin(&["play", &big], None));
    assert!(
        played.contains("line 11999 of session s-big"),
        "{}",
        played.len()
    );
    assert!(!played.contains("[0."), "only the output is printed");
    let cast = c.admin(&["play", &big, "--format", "cast"], None);
    assert!(cast.status.success());
    assert!(
        cast.stdout == big_bytes,
        "--format cast writes the file as stored"
    );
    let exported = c.dir.path().join("exported.cast");
    ok(c.admin(
        &[
            "recordings",
            "export",
            &big,
            "--out",
            exported.to_str().unwrap(),
        ],
        None,
    ));
    assert!(
        std::fs::read(&exported).unwrap() == big_bytes,
        "export writes the file as stored"
    );
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&ok(c.admin(&["play", &cut_id, "--format", "json"], None))).unwrap();
    assert_eq!(events[0]["code"], "o");
    assert_eq!(events[0]["data"], "half a session");
    let missing = fails(c.admin(&["play", "0123456789abcdef"], None));
    assert!(missing.contains("no recording"), "{missing}");

    // Reading recordings is a role rule: the built-in access role has none.
    ok(c.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "access",
            "--logins",
            "root",
            "--password-stdin",
        ],
        Some("correct horse battery\n"),
    ));
    ok(c.login("carol", "correct horse battery", &[]));
    let denied = fails(c.run(&["recordings", "ls"], None));
    assert!(
        denied.contains("allows list on recording"),
        "a clear refusal: {denied}"
    );
    let denied = fails(c.run(&["play", &big], None));
    assert!(
        denied.contains("allows read on recording"),
        "a clear refusal: {denied}"
    );
}

// ---- S3 against moto ----

/// `moto_server` on 127.0.0.1, port 0, checking SigV4 signatures (its IAM knows one user,
/// made by the first three unauthenticated calls, whose key the tests use); killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
    access_key_id: String,
    secret_access_key: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto's S3 server, or `None` (skipped, reason printed) outside CI when it is missing.
fn moto() -> Option<Moto> {
    let found = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("moto_server (PyPI moto[server]) is missing: .ci/run must install it");
        }
        eprintln!("SKIPPED: moto_server is not installed (pip install 'moto[server]')");
        return None;
    }
    let mut child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", "0"])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(at) = line.find("http://127.0.0.1:") {
                let _ = tx.send(line[at..].trim().to_string());
            }
        }
    });
    let endpoint = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("moto_server did not say where it listens");
    let mut moto = Moto {
        child,
        endpoint,
        access_key_id: String::new(),
        secret_access_key: String::new(),
    };
    // The three calls moto lets through unchecked: a user, its S3 policy, its access key.
    iam(&moto, "Action=CreateUser&UserName=jaunt&Version=2010-05-08");
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#;
    iam(
        &moto,
        &format!(
            "Action=PutUserPolicy&UserName=jaunt&PolicyName=s3&PolicyDocument={}&Version=2010-05-08",
            sigv4::encode(policy, true)
        ),
    );
    let key = iam(
        &moto,
        "Action=CreateAccessKey&UserName=jaunt&Version=2010-05-08",
    );
    let tag = |name: &str| {
        let start = key.find(&format!("<{name}>")).unwrap() + name.len() + 2;
        key[start..start + key[start..].find('<').unwrap()].to_string()
    };
    moto.access_key_id = tag("AccessKeyId");
    moto.secret_access_key = tag("SecretAccessKey");
    Some(moto)
}

/// One IAM Query API call to moto (signed with a throwaway key: these calls are not checked).
fn iam(moto: &Moto, form: &str) -> String {
    let endpoint = http1::Endpoint::parse(&moto.endpoint).unwrap();
    let amz_date = sigv4::amz_date(jaunt_config::identity::unix_now());
    let payload = sigv4::sha256_hex(form.as_bytes());
    let mut headers = vec![
        ("host".to_string(), endpoint.authority()),
        ("x-amz-date".to_string(), amz_date.clone()),
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        ),
    ];
    let signed = sigv4::sign(
        &sigv4::Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            payload_sha256: &payload,
        },
        &sigv4::Scope {
            region: "us-east-1",
            service: "iam",
            amz_date: &amz_date,
            normalize_path: true,
        },
        &sigv4::Credentials {
            access_key_id: "AKIDSETUP".into(),
            secret_access_key: "setup".into(),
            session_token: None,
        },
    );
    headers.push(("authorization".to_string(), signed.authorization));
    let r = http1::Client::new()
        .send(&endpoint, "POST", "/", &headers, form.as_bytes())
        .unwrap();
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "IAM {form}: {body}");
    body
}

fn s3_config(moto: &Moto, dir: &Path) -> S3Config {
    let creds = dir.join("s3-credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            moto.access_key_id, moto.secret_access_key
        ),
    )
    .unwrap();
    S3Config {
        bucket: "jaunt-recordings".into(),
        endpoint: Some(moto.endpoint.clone()),
        region: "us-east-1".into(),
        path_style: true,
        credentials_file: Some(creds),
        // Not `rec/`: moto (5.x) checks a signature over a query's `%2F` as if it were `/`,
        // and refuses AWS's own SDK (boto3) the same way for any prefix with a slash.
        prefix: "rec-".into(),
    }
}

fn spooled(dir: &Path, lines: usize) -> (Spool, jaunt_agent::recording::SpooledRecording, PathBuf) {
    let spool = Spool::open(&dir.join("spool"), SpoolLimits::default()).unwrap();
    let id = record(&spool, "s-1", lines);
    let rec = spool.pending().into_iter().find(|r| r.id.0 == id).unwrap();
    let path = spool.cast_path(&rec.id);
    (spool, rec, path)
}

/// Stages `rec` in `recordings` as the agent would, up to the check before storing.
fn stage(recordings: &Recordings, rec: &jaunt_agent::recording::SpooledRecording, cast: &Path) {
    let state = recordings.begin("host-1", rec.clone()).unwrap();
    assert_eq!(state.offset, 0);
    let bytes = std::fs::read(cast).unwrap();
    let mut offset = 0u64;
    for chunk in bytes.chunks(512 * 1024) {
        offset = recordings
            .append("host-1", rec.id.as_str(), offset, chunk)
            .unwrap()
            .offset;
    }
    let (size, sha256) = jaunt_control::recordings::hash_file(cast).unwrap();
    recordings
        .check_ready("host-1", rec.id.as_str(), &CompleteUpload { size, sha256 })
        .unwrap();
}

#[test]
fn s3_backend_stores_small_and_multipart_recordings_in_moto() {
    let Some(moto) = moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Backend::open(&s3_config(&moto, dir.path())).unwrap();
    s3.create_bucket().unwrap();
    s3.check().unwrap();
    s3.part_size = 5 << 20;
    let data = dir.path().join("data");
    let s3 = std::sync::Arc::new(s3);
    let recordings = Recordings::new(s3.clone(), &data).unwrap();

    // Small: one PUT. Big (> 2 parts of 5 MiB): multipart.
    for lines in [50, 170_000] {
        let (_spool, rec, cast) = spooled(&dir.path().join(format!("a{lines}")), lines);
        let bytes = std::fs::read(&cast).unwrap();
        stage(&recordings, &rec, &cast);
        let (size, sha256) = jaunt_control::recordings::hash_file(&cast).unwrap();
        let info = recordings
            .complete("host-1", rec.id.as_str(), &CompleteUpload { size, sha256 })
            .unwrap();
        assert_eq!(info.size, bytes.len() as u64);
        let back = s3.info(rec.id.as_str()).unwrap().unwrap();
        assert_eq!(back, info);
        // Read back in ranges, as `jaunt play` does.
        let mut got = Vec::new();
        while (got.len() as u64) < info.size {
            let piece = s3.read(rec.id.as_str(), got.len() as u64, 4 << 20).unwrap();
            assert!(!piece.is_empty());
            got.extend_from_slice(&piece);
        }
        assert_eq!(got.len(), bytes.len());
        assert!(got == bytes, "the stored recording differs ({lines} lines)");
        assert!(!recordings.staged_part(rec.id.as_str()).exists());
    }
    assert!(
        bytes_over(&s3, 10 << 20),
        "the big recording is over two parts"
    );
    assert_eq!(s3.list().unwrap().len(), 2);
    assert!(s3.unfinished_uploads().unwrap().is_empty());
}

fn bytes_over(s3: &S3Backend, n: u64) -> bool {
    s3.list().unwrap().iter().any(|r| r.size > n)
}

#[test]
fn the_upload_completer_finishes_what_a_crash_left_and_aborts_orphans() {
    let Some(moto) = moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Backend::open(&s3_config(&moto, dir.path())).unwrap();
    s3.create_bucket().unwrap();
    s3.part_size = 5 << 20;
    s3.abandon_after = Duration::ZERO;
    let s3 = std::sync::Arc::new(s3);
    let data = dir.path().join("data");
    let (_spool, rec, cast) = spooled(&dir.path().join("a"), 170_000);
    let id = rec.id.as_str().to_string();
    {
        let recordings = Recordings::new(s3.clone(), &data).unwrap();
        stage(&recordings, &rec, &cast);
        // The crash: one part uploaded, the upload never completed, no `.json`.
        s3.put_multipart(&format!("rec-{id}.cast"), &cast, None, Some(1))
            .unwrap();
    }
    // An orphan: an upload nothing staged knows about.
    let (_o, orphan, orphan_cast) = spooled(&dir.path().join("o"), 170_000);
    s3.put_multipart(
        &format!("rec-{}.cast", orphan.id.as_str()),
        &orphan_cast,
        None,
        Some(1),
    )
    .unwrap();
    assert_eq!(s3.unfinished_uploads().unwrap().len(), 2);
    assert!(s3.info(&id).unwrap().is_none());

    // Control restarts: the completer runs.
    let recordings = Recordings::new(s3.clone(), &data).unwrap();
    // A control without the completer lease finishes what it has staged and aborts nothing;
    // the lease holder aborts the orphan.
    assert_eq!(recordings.complete_leftovers(false), (1, 0));
    assert_eq!(s3.unfinished_uploads().unwrap().len(), 1);
    assert_eq!(recordings.complete_leftovers(true), (0, 1));
    let info = s3
        .info(&id)
        .unwrap()
        .expect("the interrupted upload was finished");
    let bytes = std::fs::read(&cast).unwrap();
    assert_eq!(info.size, bytes.len() as u64);
    let mut got = Vec::new();
    while (got.len() as u64) < info.size {
        got.extend(s3.read(&id, got.len() as u64, 4 << 20).unwrap());
    }
    assert!(
        got == bytes,
        "the finished upload differs from the recording"
    );
    assert!(s3.unfinished_uploads().unwrap().is_empty());
    assert!(s3.info(orphan.id.as_str()).unwrap().is_none());
    assert!(!recordings.staged_part(&id).exists());
}

#[test]
fn a_cluster_stores_recordings_in_s3_and_plays_them_back_from_there() {
    let Some(moto) = moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(&moto, dir.path());
    S3Backend::open(&config).unwrap().create_bucket().unwrap();
    let creds = config.credentials_file.clone().unwrap();
    let yaml = |creds: &Path| {
        format!(
            "cluster_name: rec.test\n\
             data_dir: DATA_DIR\n\
             control:\n  listen_addr: 127.0.0.1:0\n\
             engine:\n  public_addr: 127.0.0.1:0\n  listen_addr: 127.0.0.1:0\n  diag_addr: 127.0.0.1:0\n\
             recordings:\n  type: s3\n  bucket: jaunt-recordings\n  region: us-east-1\n  \
             endpoint: {}\n  path_style: true\n  prefix: rec-\n  credentials_file: {}\n",
            moto.endpoint,
            creds.display()
        )
    };

    // A wrong secret is a clear error at start-up, naming the bucket.
    let bad = dir.path().join("bad-credentials");
    std::fs::write(
        &bad,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = wrong\n",
            moto.access_key_id
        ),
    )
    .unwrap();
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let path = bad_dir.join("jaunt.yaml");
    std::fs::write(
        &path,
        yaml(&bad).replace("DATA_DIR", &bad_dir.join("data").display().to_string()),
    )
    .unwrap();
    let out = Command::new(jaunt_bin())
        .args(["start", "--config", &path.display().to_string()])
        .env("JAUNT_HOME", bad_dir.join("home"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a wrong S3 secret");
    assert!(
        err.contains("jaunt-recordings") && err.contains("403"),
        "a clear start-up error: {err}"
    );

    let c = Cluster::with_config(&yaml(&creds));
    let spool_dir = c.dir.path().join("agent-s3a").join("recordings");
    let spool = Spool::open(&spool_dir, SpoolLimits::default()).unwrap();
    let id = record(&spool, "s-s3", 2_000);
    let bytes = std::fs::read(spool_dir.join(format!("{id}.cast"))).unwrap();
    drop(spool);
    let (_agent, _) = start_agent(&c, "s3a", &[]);
    let s3 = S3Backend::open(&config).unwrap();
    wait_until("the recording in S3", Duration::from_secs(30), || {
        s3.info(&id).unwrap().is_some()
    });
    assert!(!c
        .data_dir
        .join("recordings")
        .join(format!("{id}.cast"))
        .exists());
    let cast = c.admin(&["play", &id, "--format", "cast"], None);
    assert!(cast.status.success(), "{}", stderr(&cast));
    assert!(cast.stdout == bytes, "played back from S3 as recorded");
    let listed = ok(c.admin(&["recordings", "ls"], None));
    assert!(listed.contains(&id), "{listed}");
}

#[test]
fn an_ssh_session_is_recorded_uploaded_and_played_back_with_jaunt_play() {
    let (c, _sshd, _agent) = ssh_setup();
    let o = c.run(
        &["ssh", "root@node1", "--", "echo played-$((6*7)); exit 3"],
        None,
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // The agent records the exec channel, uploads it, and control lists it.
    let mut listed = Vec::new();
    wait_until("the recording in control", Duration::from_secs(30), || {
        let out = c.admin(&["recordings", "ls", "--format", "json"], None);
        listed = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap_or_default();
        listed.iter().any(|r| {
            r["exit_status"] == 3
                && r["command"]
                    .as_str()
                    .is_some_and(|c| c.contains("echo played"))
        })
    });
    let rec = listed
        .iter()
        .find(|r| r["exit_status"] == 3)
        .unwrap()
        .clone();
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["login"], "root");
    assert_eq!(rec["node"], "node1");
    assert_eq!(rec["kind"], "exec");
    let id = rec["id"].as_str().unwrap();
    let played = ok(c.admin(&["play", id, "--speed", "0"], None));
    assert!(played.contains("played-42"), "{played}");
    let events = ok(c.admin(&["play", id, "--format", "json"], None));
    assert!(events.contains(r#"\"status\":3"#), "{events}");
    // session.start and the upload event name the same session.
    let uploads = c.audit_events(Some("recording.upload"));
    let session = uploads.iter().find(|e| e["recording_id"] == id).unwrap()["session_id"].clone();
    let start = c
        .audit_events(Some("session.start"))
        .into_iter()
        .find(|e| e["session_id"] == session)
        .unwrap_or_else(|| panic!("the upload's session id is the engine's: {session}"));
    assert_eq!(start["recorded"], true, "{start}");
    let end = c
        .audit_events(Some("session.end"))
        .into_iter()
        .find(|e| e["session_id"] == session)
        .unwrap();
    assert_eq!(end["recorded"], true, "{end}");

    // A role with `record_session: off`: the session is spliced, and its events say so.
    let role = c.dir.path().join("unrecorded.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata:\n  name: unrecorded\nspec:\n  options:\n    \
         record_session: \"off\"\n  allow:\n    logins: [root]\n    node_labels:\n      \
         '*': '*'\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(&["users", "update", "alice", "--roles", "unrecorded"], None));
    ok(c.login("alice", "correct horse battery", &[]));
    // The agent learns the new role with its next policy poll (every 5 s).
    wait_until("ssh with the new role", Duration::from_secs(20), || {
        stdout(&c.run(&["ssh", "root@node1", "--", "echo unrecorded"], None)).contains("unrecorded")
    });
    let starts = c.audit_events(Some("session.start"));
    let last = starts.iter().rev().find(|e| e["kind"] == "ssh").unwrap();
    assert_eq!(last["recorded"], false, "{last}");
}
