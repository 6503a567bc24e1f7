//! The web UI in a real browser: a dev cluster on `localhost`, two `jaunt agent` processes
//! announcing nodes and an app with different labels, and each test once in headless Chromium
//! (Debian's `chromium` + `chromium-driver`) and once in headless Firefox (Debian's
//! `firefox-esr` + `geckodriver`), both driven over WebDriver, logging in, listing, filtering,
//! searching the audit log and logging out. curl checks what a browser hides (headers, the
//! server-side end of a session, CSRF refusals). Screenshots of each page go to
//! `docs/screenshots/` (the README shows them) with `JAUNT_SCREENSHOTS=docs`, else to the
//! test's scratch directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;
mod webdriver;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use webdriver::{Browser, Kind};

const PASSWORD: &str = "correct horse battery";

/// A role that reaches only `env=dev` nodes as `bob`, and no app.
const DEV_ROLE: &str = "kind: role\nversion: v1\nmetadata:\n  name: dev-only\nspec:\n  allow:\n    logins: [bob]\n    node_labels:\n      env: dev\n";

/// Where screenshots go: `docs/screenshots/` (what the README shows) when
/// `JAUNT_SCREENSHOTS=docs` and the browser is Chromium, else the test's scratch directory
/// (one per browser), so that an ordinary test run does not modify tracked files.
fn screenshots(kind: Kind) -> PathBuf {
    if kind == Kind::Chromium && std::env::var("JAUNT_SCREENSHOTS").as_deref() == Ok("docs") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("screenshots")
            .join(kind.name())
    }
}

/// `jaunt agent` named `name` with `labels`, serving SSH (an address nothing listens on: the
/// list only needs the announcement) and `apps`.
fn start_agent(c: &Cluster, name: &str, labels: &str, apps: &[&str]) -> Reaped {
    let out = ok(c.admin(&["tokens", "add", "--type", "node,app"], None));
    let token = out.lines().next().unwrap().trim().to_string();
    let data = c.dir.path().join(format!("agent-{name}"));
    let mut args = vec![
        "agent".to_string(),
        "--proxy".into(),
        c.public_addr.clone(),
        "--ca-pin".into(),
        c.pin.clone(),
        "--data-dir".into(),
        data.display().to_string(),
        "--name".into(),
        name.into(),
        "--labels".into(),
        labels.into(),
        "--token".into(),
        token,
        "--ssh".into(),
        "127.0.0.1:9".into(),
    ];
    for app in apps {
        args.push("--app".into());
        args.push(app.to_string());
    }
    Reaped(
        Command::new(jaunt_bin())
            .args(&args)
            .env(
                "JAUNT_HOME",
                c.dir.path().join(format!("agent-home-{name}")),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// curl against the public host; returns the status line and headers, and the body.
fn curl(c: &Cluster, args: &[&str], path: &str) -> (String, String) {
    let url = format!("https://{}{path}", c.public_addr);
    let o = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "20", "-D", "-"])
        .args(args)
        .arg(&url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_ascii_lowercase(), body.to_string())
}

/// Names of the resource rows the browser shows now.
fn visible_rows(b: &Browser) -> Vec<String> {
    let names = b.execute(
        "return Array.from(document.querySelectorAll('tr.resource'))\
         .filter(r => !r.hidden).map(r => r.getAttribute('data-name'));",
    );
    let mut names: Vec<String> = names
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn log_in(b: &Browser, c: &Cluster, user: &str, password: &str) {
    b.goto(&format!("https://{}/web/login", c.public_addr));
    let form_user = b.wait_for("#user");
    b.clear(&form_user);
    b.type_into(&form_user, user);
    let form_password = b.wait_for("#password");
    b.clear(&form_password);
    b.type_into(&form_password, &format!("{password}\u{E007}"));
}

#[test]
fn web_ui_login_resources_audit_and_logout_in_chromium() {
    web_ui_login_resources_audit_and_logout(Kind::Chromium);
}

#[test]
fn web_ui_login_resources_audit_and_logout_in_firefox() {
    web_ui_login_resources_audit_and_logout(Kind::Firefox);
}

fn web_ui_login_resources_audit_and_logout(kind: Kind) {
    let c = Cluster::dev_at("localhost:0");
    let role_file = c.dir.path().join("dev-only.yaml");
    std::fs::write(&role_file, DEV_ROLE).unwrap();
    ok(c.admin(&["create", "-f", role_file.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access,editor",
            "--logins",
            "alice,root",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "dev-only",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let echo = format!("echo=tcp://{}", echo_server());
    let _prod = start_agent(
        &c,
        "prod1",
        "env=prod,team=web",
        &["grafana=http://127.0.0.1:9", &echo],
    );
    let _dev = start_agent(&c, "dev1", "env=dev", &[]);
    // Both agents announced their resources.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ok(c.admin(&["get", "nodes"], None));
        if out.contains("prod1") && out.contains("dev1") {
            break;
        }
        assert!(Instant::now() < deadline, "agents never announced: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Not signed in: `/` leads to the login page, which says what it is.
    let (head, _) = curl(&c, &[], "/");
    assert!(head.starts_with("http/1.1 303"), "{head}");
    assert!(head.contains("location: /web/\r\n"), "{head}");
    let (head, _) = curl(&c, &[], "/web/login");
    assert!(head.contains("content-security-policy: "), "{head}");
    let csp = head
        .lines()
        .find(|l| l.starts_with("content-security-policy"))
        .unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");

    let b = Browser::launch(kind);
    let shots = screenshots(kind);
    b.goto(&format!("https://{}/", c.public_addr));
    b.wait_until("redirected to the login page", |b| {
        b.url().contains("/web/login")
    });
    b.wait_for("#login-form");
    b.screenshot(&shots.join("login.png"));

    // A bad password: an error on the page, no session.
    log_in(&b, &c, "alice", "wrong password");
    let error = b.wait_for("#login-error");
    b.wait_until("the login error is shown", |b| b.displayed(&error));
    assert!(
        b.text(&error).contains("invalid user name or password"),
        "{}",
        b.text(&error)
    );
    assert!(b.url().contains("/web/login"));
    assert!(b
        .cookies()
        .iter()
        .all(|c| c["name"] != "__Host-jaunt_session"));

    // The good password, typed with the keyboard alone: the form starts focused on the user
    // field, Tab moves to the password with a visible focus ring, Enter submits. Then the
    // resource list, and a session cookie with the promised flags.
    b.goto(&format!("https://{}/web/login", c.public_addr));
    b.wait_for("#login-form");
    let focused = |b: &Browser| {
        b.execute("var e = document.activeElement; return e ? e.id : '';")
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    b.wait_until("the user field has the focus", |b| focused(b) == "user");
    b.keys("alice\u{E004}");
    b.wait_until("Tab moved to the password field", |b| {
        focused(b) == "password"
    });
    let ring = b.execute(
        "var s = getComputedStyle(document.activeElement); \
         return [document.activeElement.matches(':focus-visible'), s.outlineStyle, s.outlineWidth];",
    );
    assert_eq!(
        ring[0], true,
        "no visible focus on the password field: {ring}"
    );
    assert_eq!(ring[1], "solid", "{ring}");
    assert_ne!(ring[2], "0px", "{ring}");
    b.keys(&format!("{PASSWORD}\u{E007}"));
    b.wait_for("table#resources");
    assert!(b.url().ends_with("/web/"), "{}", b.url());
    let cookies = b.cookies();
    let session = cookies
        .iter()
        .find(|c| c["name"] == "__Host-jaunt_session")
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["secure"], true, "{session}");
    assert_eq!(session["sameSite"], "Lax", "{session}");
    assert_eq!(session["path"], "/", "{session}");
    let expiry = session["expiry"].as_u64().unwrap();
    let now = jaunt_config::identity::unix_now();
    assert!(
        expiry <= now + 12 * 3600 + 5,
        "the session outlives the 12 h certificate TTL: {session}"
    );
    let token = session["value"].as_str().unwrap().to_string();

    // alice's roles reach every node and the app, with both her logins.
    assert_eq!(visible_rows(&b), ["dev1", "echo", "grafana", "prod1"]);
    let picker = b.wait_for("select.login-picker[data-node='prod1']");
    let logins = b.execute(
        "return Array.from(document.querySelectorAll(\"select[data-node='prod1'] option\"))\
         .map(o => o.value);",
    );
    assert_eq!(logins, serde_json::json!(["alice", "root"]));
    let connect = b.wait_for("tr[data-name='prod1'] a.ssh");
    assert!(b
        .attribute(&connect, "href")
        .unwrap()
        .ends_with("/web/terminal/prod1/alice"));
    b.type_into(&picker, "root");
    b.wait_until("the Connect link follows the picked login", |b| {
        b.attribute(&connect, "href")
            .is_some_and(|h| h.ends_with("/web/terminal/prod1/root"))
    });
    let app = b.wait_for("tr[data-name='grafana'] a.app");
    assert_eq!(b.attribute(&app, "target").as_deref(), Some("_blank"));
    let port = c.public_addr.rsplit_once(':').unwrap().1;
    assert!(
        b.attribute(&app, "href")
            .unwrap()
            .ends_with("/web/apps/grafana/open"),
        "{:?}",
        b.attribute(&app, "href")
    );
    assert_eq!(
        b.attribute(&app, "title").unwrap(),
        format!("https://grafana.localhost:{port}/")
    );
    let labels = b.text(&b.wait_for("tr[data-name='prod1'] td.labels"));
    assert!(
        labels.contains("env=prod") && labels.contains("team=web"),
        "{labels}"
    );
    b.screenshot(&shots.join("resources.png"));
    // At phone width the table becomes stacked cards and nothing is wider than the screen.
    // (Chromium's window goes down to 390 px; Firefox's headless window stops at 500 px, still
    // under the 640 px where the phone layout starts.)
    b.set_window_size(390, 844);
    b.wait_until("the page fits a phone's width", |b| {
        b.execute(
            "return window.innerWidth <= 500 && \
             document.documentElement.scrollWidth <= window.innerWidth && \
             getComputedStyle(document.querySelector('#resources thead')).display === 'none';",
        ) == true
    });
    b.screenshot(&shots.join("resources-phone.png"));
    b.set_window_size(1280, 800);

    // The filter box narrows the list (by label and by name).
    let filter = b.wait_for("#filter");
    b.type_into(&filter, "env=dev");
    b.wait_until("filtered to env=dev", |b| visible_rows(b) == ["dev1"]);
    b.clear(&filter);
    b.type_into(&filter, "graf");
    b.wait_until("filtered to graf", |b| visible_rows(b) == ["grafana"]);
    b.clear(&filter);
    b.type_into(&filter, "nothing-like-this");
    b.wait_until("nothing matches", |b| visible_rows(b).is_empty());
    let none = b.wait_for("#no-match");
    assert!(b.displayed(&none));

    // The audit log, filtered by type through the form: the failed login is there.
    b.goto(&format!("https://{}/web/audit", c.public_addr));
    let ty = b.wait_for("#audit-filter input[name='type']");
    b.type_into(&ty, "user.login.failed\u{E007}");
    b.wait_until("the audit filter applied", |b| {
        b.url().contains("type=user.login.failed")
    });
    let types = b.execute(
        "return Array.from(document.querySelectorAll('#audit tr.event td.type'))\
         .map(td => td.textContent);",
    );
    let types = types.as_array().unwrap();
    assert!(!types.is_empty(), "no failed login in the audit page");
    assert!(types.iter().all(|t| t == "user.login.failed"), "{types:?}");
    let details = b.text(&b.wait_for("#audit tr.event td.details"));
    assert!(details.contains("\"via\":\"web\""), "{details}");
    b.screenshot(&shots.join("audit.png"));

    // A live session (alice's `jaunt proxy tcp echo`) is listed on /web/sessions; ending it
    // there closes the user's connection.
    ok(c.login("alice", PASSWORD, &[]));
    let mut proxy = Reaped(
        Command::new(jaunt_bin())
            .args(["proxy", "tcp", "echo", "--port", "0"])
            .env("JAUNT_HOME", &c.home)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(proxy.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.trim().rsplit(' ').next().unwrap().to_string();
    let mut conn = TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(b"live").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"live");
    b.goto(&format!("https://{}/web/sessions", c.public_addr));
    let row = b.wait_for("tr.session");
    let row_text = b.text(&row);
    assert!(
        row_text.contains("alice") && row_text.contains("echo"),
        "{row_text}"
    );
    b.screenshot(&shots.join("sessions.png"));
    let end = b.wait_for("tr.session button.end-session");
    b.click(&end);
    let mut rest = Vec::new();
    let ended = conn.read_to_end(&mut rest);
    assert!(
        ended.is_ok()
            || ended
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the session was not ended: {ended:?}"
    );
    b.wait_until("the ended session left the list", |b| {
        b.find("tr.session").is_none() && b.find("main").is_some()
    });
    let kills = c.audit_events(Some("session.kill"));
    assert_eq!(kills.len(), 1, "{kills:?}");
    assert_eq!(kills[0]["by"], "alice", "{kills:?}");
    drop(proxy);

    // A state-changing request without the CSRF header is refused, and the session survives.
    let cookie = format!("__Host-jaunt_session={token}");
    let (head, body) = curl(&c, &["-X", "POST", "-b", &cookie], "/webapi/logout");
    assert!(head.starts_with("http/1.1 403"), "{head}{body}");
    let (head, _) = curl(&c, &["-b", &cookie], "/web/");
    assert!(head.starts_with("http/1.1 200"), "{head}");

    // Logout: back to the login page, and the old cookie is dead on the server.
    let logout = b.wait_for("#logout");
    b.click(&logout);
    b.wait_until("logged out to the login page", |b| {
        b.url().contains("/web/login")
    });
    let (head, _) = curl(&c, &["-b", &cookie], "/web/");
    assert!(head.starts_with("http/1.1 303"), "{head}");
    assert!(head.contains("location: /web/login"), "{head}");
    b.goto(&format!("https://{}/web/", c.public_addr));
    b.wait_until("signed out", |b| b.url().contains("/web/login"));
    let logouts = c.audit_events(Some("user.logout"));
    assert_eq!(logouts.len(), 1, "{logouts:?}");

    // bob's role reaches only the dev node, with his login, and not the audit log.
    log_in(&b, &c, "bob", PASSWORD);
    b.wait_for("table#resources");
    assert_eq!(visible_rows(&b), ["dev1"]);
    b.goto(&format!("https://{}/web/sessions", c.public_addr));
    let refusal = b.wait_for("main p.error");
    assert!(
        b.text(&refusal).contains("access denied"),
        "{}",
        b.text(&refusal)
    );
    b.goto(&format!("https://{}/web/audit", c.public_addr));
    let refusal = b.wait_for("main p.error");
    assert!(
        b.text(&refusal).contains("access denied"),
        "{}",
        b.text(&refusal)
    );
}

/// `/web/` with more resources than it lays out at once (one agent announcing a node and 120
/// apps): the first 100 rows show with a "Show all" note, the filter finds rows beyond them,
/// "Show all" shows every row, and rows the filter hides stay hidden at phone width.
#[test]
fn a_long_resource_list_shows_its_first_rows_and_filters_all_in_chromium() {
    long_resource_list(Kind::Chromium);
}

#[test]
fn a_long_resource_list_shows_its_first_rows_and_filters_all_in_firefox() {
    long_resource_list(Kind::Firefox);
}

fn long_resource_list(kind: Kind) {
    let c = Cluster::dev_at("localhost:0");
    c.add_user("alice", "access", "root", PASSWORD);
    let apps: Vec<String> = (0..120)
        .map(|i| format!("app{i:03}=http://127.0.0.1:9"))
        .collect();
    let apps: Vec<&str> = apps.iter().map(String::as_str).collect();
    let _agent = start_agent(&c, "many1", "env=many", &apps);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ok(c.admin(&["get", "apps", "--format", "json"], None));
        let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
        if listed.as_array().map_or(0, Vec::len) == 120 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the apps were not announced: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let b = Browser::launch(kind);
    log_in(&b, &c, "alice", PASSWORD);
    b.wait_for("table#resources");
    assert_eq!(visible_rows(&b).len(), 100);
    let note = b.wait_for("#partial-count");
    assert!(b.text(&note).contains("100 of 121"), "{}", b.text(&note));
    // The filter searches the rows not laid out yet.
    let filter = b.wait_for("#filter");
    b.type_into(&filter, "app119");
    b.wait_until("the filter found a row beyond the first 100", |b| {
        visible_rows(b) == ["app119"]
    });
    b.clear(&filter);
    b.type_into(&filter, "env=many");
    b.wait_until("a filter matching all shows the first 100", |b| {
        visible_rows(b).len() == 100
    });
    assert!(b
        .text(&b.wait_for("#partial-count"))
        .contains("100 of 121 matches"));
    // Show all (a <button>, so the keyboard reaches it too).
    b.clear(&filter);
    b.click(&b.wait_for("button#show-all"));
    b.wait_until("every row shows", |b| visible_rows(b).len() == 121);
    assert!(!b.displayed(&b.wait_for("#partial")));
    // At phone width rows the filter hides stay hidden (the stacked layout is display: block).
    b.set_window_size(390, 844);
    b.type_into(&filter, "app007");
    b.wait_until("one row is on screen at phone width", |b| {
        b.execute(
            "return Array.from(document.querySelectorAll('tr.resource'))\
             .filter(r => r.getClientRects().length > 0).length;",
        ) == 1
    });
}

/// Text the player's terminal shows now.
fn screen_text(b: &Browser) -> String {
    b.execute(
        "var r = document.querySelector('#screen .xterm-rows'); return r ? r.textContent : '';",
    )
    .as_str()
    .unwrap_or("")
    .to_string()
}

#[test]
fn recordings_are_listed_and_played_back_in_chromium() {
    recordings_are_listed_and_played_back(Kind::Chromium);
}

#[test]
fn recordings_are_listed_and_played_back_in_firefox() {
    recordings_are_listed_and_played_back(Kind::Firefox);
}

fn recordings_are_listed_and_played_back(kind: Kind) {
    let c = Cluster::dev_at("localhost:0");
    for (user, roles) in [("alice", "access,editor"), ("bob", "access")] {
        c.add_user(user, roles, "root", PASSWORD);
    }
    ok(c.login("alice", PASSWORD, &[]));
    let sshd = Sshd::start(&c);
    let _agent = support::sshd::start_agent(&c, "node1", &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");
    // A recorded session through the agent's SSH termination and a real sshd.
    let o = c.run(
        &[
            "ssh",
            "root@node1",
            "--",
            "echo first-line; sleep 1; echo played-$((6*7)); exit 3",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let out = ok(c.admin(&["recordings", "ls", "--format", "json"], None));
        let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        if let Some(r) = listed
            .iter()
            .find(|r| r["command"].as_str().is_some_and(|c| c.contains("played-")))
        {
            break r["id"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the recording never reached control: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let b = Browser::launch(kind);
    let shots = screenshots(kind);
    log_in(&b, &c, "alice", PASSWORD);
    b.wait_for("table#resources");
    b.goto(&format!("https://{}/web/recordings", c.public_addr));
    let row = b.wait_for(&format!("tr.recording[data-id='{id}']"));
    let text = b.text(&row);
    assert!(
        text.contains("alice") && text.contains("node1") && text.contains("played-"),
        "{text}"
    );
    assert!(text.contains("exit 3"), "{text}");
    // The filters are `jaunt recordings ls`'s: user, node, since.
    let node = b.wait_for("#recording-filter input[name='node']");
    b.type_into(&node, "elsewhere\u{E007}");
    b.wait_until("the node filter applied", |b| {
        b.url().contains("node=elsewhere")
    });
    b.wait_for("main p.empty");
    assert!(b.find("tr.recording").is_none());
    b.goto(&format!(
        "https://{}/web/recordings?user=alice&node=node1&since=1h",
        c.public_addr
    ));
    b.wait_for(&format!("tr.recording[data-id='{id}']"));
    b.screenshot(&shots.join("recordings.png"));

    // Playback: the recorded output appears in the terminal as it plays.
    let play_link = b.wait_for(&format!("tr.recording[data-id='{id}'] a.play"));
    b.click(&play_link);
    b.wait_until("the player loaded the recording", |b| {
        b.find("#player[data-state='ready']").is_some()
    });
    assert!(!screen_text(&b).contains("played-42"));
    b.click(&b.wait_for("#play"));
    b.wait_until("the first line played", |b| {
        screen_text(b).contains("first-line")
    });
    b.wait_until("the recording played to its end", |b| {
        b.find("#player[data-state='ended']").is_some()
    });
    // xterm.js renders what it has parsed on its next animation frame.
    b.wait_until("the last line shown", |b| {
        screen_text(b).contains("played-42")
    });
    // xterm.js's <style> elements were admitted by the page's nonce (a refused one has no sheet).
    let styles = b.execute(
        "return Array.from(document.querySelectorAll('style')).map(s => s.sheet !== null);",
    );
    let styles = styles.as_array().unwrap();
    assert!(
        !styles.is_empty() && styles.iter().all(|s| s == true),
        "{styles:?}"
    );
    b.execute("window.scrollTo(0, 0); return null;");
    b.screenshot(&shots.join("playback.png"));
    // Seek back to the start (the screen is reset), then to the end.
    let seek = |b: &Browser, to: &str| {
        b.execute(&format!(
            "var s = document.getElementById('seek'); s.value = {to}; \
             s.dispatchEvent(new Event('input')); return s.value;"
        ));
    };
    seek(&b, "0");
    b.wait_until("seeking to 0 resets the screen", |b| {
        !screen_text(b).contains("first-line")
    });
    seek(&b, "s.max");
    b.wait_until("seeking to the end shows all output", |b| {
        let t = screen_text(b);
        t.contains("first-line") && t.contains("played-42")
    });
    // Speed: at 16x the whole recording plays again in well under its length.
    b.execute(
        "var s = document.getElementById('speed'); s.value = '16'; \
         s.dispatchEvent(new Event('change')); return s.value;",
    );
    seek(&b, "0");
    b.click(&b.wait_for("#play"));
    b.wait_until("replayed at 16x", |b| {
        b.find("#player[data-state='ended']").is_some() && screen_text(b).contains("played-42")
    });

    // The page's policy: no inline script, no framing.
    let token = b
        .cookies()
        .iter()
        .find(|c| c["name"] == "__Host-jaunt_session")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let cookie = format!("__Host-jaunt_session={token}");
    let (head, _) = curl(&c, &["-b", &cookie], &format!("/web/recordings/{id}"));
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let csp = head
        .lines()
        .find(|l| l.starts_with("content-security-policy"))
        .unwrap();
    let script_src = csp
        .split(';')
        .find(|d| d.trim().starts_with("script-src"))
        .unwrap();
    assert_eq!(script_src.trim(), "script-src 'self'", "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(head.matches("content-security-policy").count(), 1, "{head}");
    let (head, body) = curl(
        &c,
        &["-b", &cookie],
        &format!("/webapi/recordings/{id}/cast"),
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.contains("played-"), "{body}");
    let (head, _) = curl(&c, &[], &format!("/webapi/recordings/{id}/cast"));
    assert!(head.starts_with("http/1.1 401"), "{head}");

    // bob's role has no `recording` rule: a clear refusal, in the page and the API.
    b.click(&b.wait_for("#logout"));
    b.wait_until("logged out", |b| b.url().contains("/web/login"));
    log_in(&b, &c, "bob", PASSWORD);
    b.wait_for("table#resources");
    for page in [
        "/web/recordings".to_string(),
        format!("/web/recordings/{id}"),
    ] {
        b.goto(&format!("https://{}{page}", c.public_addr));
        let refusal = b.wait_for("main p.error");
        let text = b.text(&refusal);
        assert!(
            text.contains("access denied") && text.contains("recording"),
            "{page}: {text}"
        );
    }
    let bob = b
        .cookies()
        .iter()
        .find(|c| c["name"] == "__Host-jaunt_session")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let (head, body) = curl(
        &c,
        &["-b", &format!("__Host-jaunt_session={bob}")],
        &format!("/webapi/recordings/{id}/cast"),
    );
    assert!(head.starts_with("http/1.1 403"), "{head}{body}");
}

/// A small HTTP app: answers every request with a page naming its path, and keeps each
/// request's head for the test.
fn http_app() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&heads);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let seen = std::sync::Arc::clone(&seen);
            std::thread::spawn(move || loop {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push(head);
                let body = format!(
                    "<!doctype html><html><head><title>hello app</title></head><body>\
                     <h1 id=\"app\">hello from the app</h1><p id=\"path\">{path}</p></body></html>"
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if conn.write_all(response.as_bytes()).is_err() {
                    return;
                }
            });
        }
    });
    (addr, heads)
}

#[test]
fn an_app_opened_from_the_web_ui_works_without_a_client_certificate() {
    app_without_a_client_certificate(Kind::Chromium);
}

#[test]
fn an_app_opened_from_the_web_ui_works_without_a_client_certificate_in_firefox() {
    app_without_a_client_certificate(Kind::Firefox);
}

fn app_without_a_client_certificate(kind: Kind) {
    let c = Cluster::dev_at("localhost:0");
    c.add_user("alice", "access", "alice", PASSWORD);
    let (app_addr, heads) = http_app();
    let _agent = start_agent(
        &c,
        "apps1",
        "env=dev",
        &[&format!("hello=http://{app_addr}")],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(c.admin(&["get", "apps"], None)).contains("hello") {
        assert!(Instant::now() < deadline, "the app was never announced");
        std::thread::sleep(Duration::from_millis(100));
    }
    let port = c.public_addr.rsplit_once(':').unwrap().1.to_string();
    let app_url = format!("https://hello.localhost:{port}");

    // Without a certificate or a session: the hint for programs, a way in for browsers.
    let (head, body) = curl(&c, &[], "/");
    assert!(head.starts_with("http/1.1 303"), "{head}{body}");
    let o = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "20", "-D", "-", "--resolve"])
        .arg(format!("hello.localhost:{port}:127.0.0.1"))
        .arg(format!("{app_url}/api"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("jaunt proxy app hello"), "{text}");

    let b = Browser::launch(kind);
    log_in(&b, &c, "alice", PASSWORD);
    let open = b.wait_for("tr[data-name='hello'] a.app");
    assert_eq!(b.attribute(&open, "target").as_deref(), Some("_blank"));
    let href = b.attribute(&open, "href").unwrap();
    assert!(href.ends_with("/web/apps/hello/open"), "{href}");
    // Opened from /web/ (in this tab: the link's new tab is the same navigation).
    b.goto(&format!("https://{}{href}", c.public_addr));
    let h1 = b.wait_for("h1#app");
    assert_eq!(b.text(&h1), "hello from the app");
    assert_eq!(b.url(), format!("{app_url}/"));
    let cookies = b.cookies();
    let app_cookie = cookies
        .iter()
        .find(|c| c["name"] == "__Host-jaunt_app")
        .unwrap_or_else(|| panic!("no app session cookie on the app host: {cookies:?}"));
    assert_eq!(app_cookie["httpOnly"], true, "{app_cookie}");
    assert_eq!(app_cookie["secure"], true, "{app_cookie}");
    assert!(
        cookies.iter().all(|c| c["name"] != "__Host-jaunt_session"),
        "the web session cookie stays on the public host: {cookies:?}"
    );
    // Another page of the app, in the same app session.
    b.goto(&format!("{app_url}/reports?q=1"));
    b.wait_until("the app's second page", |b| {
        b.find("p#path")
            .is_some_and(|p| b.text(&p) == "/reports?q=1")
    });
    {
        let heads = heads.lock().unwrap();
        let last = heads.last().unwrap().clone();
        let lower = last.to_ascii_lowercase();
        assert!(lower.contains("jaunt-jwt-assertion: "), "{last}");
        assert!(
            !lower.contains("__host-jaunt_app"),
            "the app saw the session cookie: {last}"
        );
        assert!(!lower.contains("__host-jaunt_session"), "{last}");
        // The agent's JWT names the web session's user.
        let jwt = last
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("jaunt-jwt-assertion:"))
            .unwrap()
            .split_once(':')
            .unwrap()
            .1
            .trim()
            .to_string();
        use base64::Engine as _;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap();
        let claims = String::from_utf8_lossy(&claims);
        assert!(claims.contains("\"alice\""), "{claims}");
    }
    // Each request is a session as alice in the audit log (the engine's events arrive through
    // a queue: poll).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let starts = c.audit_events(Some("session.start"));
        if starts
            .iter()
            .any(|e| e["user"] == "alice" && e["target"] == "hello")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no session.start for the app: {starts:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Logout on the public host ends the app session.
    b.goto(&format!("https://{}/web/", c.public_addr));
    b.click(&b.wait_for("#logout"));
    b.wait_until("logged out", |b| b.url().contains("/web/login"));
    b.goto(&format!("{app_url}/after-logout"));
    b.wait_until("the app sends a logged-out browser to log in", |b| {
        b.url().contains("/web/login")
    });
    assert!(heads
        .lock()
        .unwrap()
        .iter()
        .all(|h| !h.contains("/after-logout")));
}

/// Text the web terminal shows now.
fn terminal_text(b: &Browser) -> String {
    b.execute(
        "var r = document.querySelector('#term-screen .xterm-rows'); \
         return r ? r.textContent : '';",
    )
    .as_str()
    .unwrap_or("")
    .to_string()
}

/// The live sessions `jaunt sessions ls` shows.
fn live_sessions(c: &Cluster) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(c.admin(&["sessions", "ls", "--format", "json"], None))).unwrap()
}

/// `/web/terminal/NODE/LOGIN`: a shell on a real sshd through the engine's WebSocket and the
/// agent's SSH client, listed by `jaunt sessions ls` while open, recorded, played back; its size
/// follows the window; a bad WebSocket message ends only its own connection; a login the
/// user's roles do not allow is refused on the page.
#[test]
fn web_terminal_runs_a_shell_on_a_real_sshd_in_chromium() {
    web_terminal(Kind::Chromium);
}

#[test]
fn web_terminal_runs_a_shell_on_a_real_sshd_in_firefox() {
    web_terminal(Kind::Firefox);
}

fn web_terminal(kind: Kind) {
    let c = Cluster::dev_at("localhost:0");
    for (user, roles, logins) in [("alice", "access,editor", "root"), ("bob", "access", "bob")] {
        c.add_user(user, roles, logins, PASSWORD);
    }
    ok(c.login("alice", PASSWORD, &[]));
    // sshd re-exchanges keys after every 32 KiB each way (OpenSSH's default is about a GiB):
    // the terminal must answer them (a host key check) or it stalls.
    let sshd_log = c.dir.path().join("sshd.log");
    let sshd = Sshd::start_configured(
        &c,
        "node1",
        "RekeyLimit 32K\nLogLevel DEBUG1\n",
        Some(sshd_log.clone()),
    );
    let _agent = support::sshd::start_agent(&c, "node1", &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Typed as `echo MARKER-$((6*7))`, shown as MARKER-42: the output, not the echoed input.
    let marker = format!("webterm-{nanos:x}");

    let b = Browser::launch(kind);
    let shots = screenshots(kind);
    log_in(&b, &c, "alice", PASSWORD);
    b.wait_for("table#resources");
    // The login picker of /web/ leads here.
    let connect = b.wait_for("tr.resource[data-name='node1'] a.ssh");
    let href = b.attribute(&connect, "href").unwrap_or_default();
    assert!(href.ends_with("/web/terminal/node1/root"), "{href}");
    b.goto(&format!(
        "https://{}/web/terminal/node1/root",
        c.public_addr
    ));
    b.wait_until("the terminal connected", |b| {
        b.find("#terminal[data-state='open']").is_some()
    });
    let session_id = b
        .attribute(&b.wait_for("#terminal"), "data-session")
        .unwrap_or_default();
    assert!(!session_id.is_empty());
    b.click(&b.wait_for("#term-screen"));
    b.type_keys(&format!("echo {marker}-$((6*7))\u{E007}"));
    b.wait_until("the command's output shows in the page", |b| {
        terminal_text(b).contains(&format!("{marker}-42"))
    });
    // About 130 KB of output: sshd rekeys several times on the way, and the output after it
    // is whole.
    b.type_keys("clear; seq 1 20000; echo rekeyed-$((6*7))\u{E007}");
    b.wait_until("the output after key re-exchanges shows in the page", |b| {
        let text = terminal_text(b);
        text.contains("19999") && text.contains("20000") && text.contains("rekeyed-42")
    });
    let log = std::fs::read_to_string(&sshd_log).unwrap_or_default();
    let connections = log.matches("Connection from").count();
    let kexinits = log.matches("SSH2_MSG_KEXINIT received").count();
    assert!(
        connections > 0 && kexinits > connections,
        "sshd did not rekey ({kexinits} key exchanges in {connections} connections)"
    );
    // The PTY has the size the page computed from its element.
    let size = |b: &Browser| {
        let t = b.wait_for("#terminal");
        (
            b.attribute(&t, "data-rows").unwrap_or_default(),
            b.attribute(&t, "data-cols").unwrap_or_default(),
        )
    };
    let (rows, cols) = size(&b);
    b.type_keys("echo size-$(stty size | tr ' ' x)\u{E007}");
    b.wait_until("stty shows the page's size", |b| {
        terminal_text(b).contains(&format!("size-{rows}x{cols}"))
    });
    // A narrower window: the terminal follows, and so does the PTY.
    b.set_window_size(900, 700);
    b.wait_until("the terminal follows the window", |b| size(b).1 != cols);
    let (rows2, cols2) = size(&b);
    assert!(
        cols2.parse::<u32>().unwrap() < cols.parse::<u32>().unwrap(),
        "{cols} -> {cols2}"
    );
    b.type_keys("clear; echo resized-$(stty size | tr ' ' x)\u{E007}");
    b.wait_until("stty shows the new size", |b| {
        terminal_text(b).contains(&format!("resized-{rows2}x{cols2}"))
    });
    b.set_window_size(1280, 800);
    b.wait_until("the terminal grew back", |b| size(b).1 == cols);

    // Listed as a live SSH session of alice while open.
    let listed = live_sessions(&c);
    let live = listed
        .iter()
        .find(|s| s["id"] == session_id.as_str())
        .unwrap_or_else(|| panic!("{session_id} not in {listed:?}"));
    assert_eq!(live["user"], "alice");
    assert_eq!(live["login"], "root");
    assert_eq!(live["target"], "node1");
    assert_eq!(live["kind"], "ssh");
    assert_eq!(live["recorded"], true);

    // A second WebSocket whose first message is not a ticket gets a typed refusal and a
    // policy close; the open terminal is not disturbed.
    b.execute(
        "window.probe = null; \
         var ws = new WebSocket('wss://' + location.host + '/webapi/terminal/node1/root'); \
         var got = {}; \
         ws.onopen = function () { ws.send('not a ticket'); }; \
         ws.onmessage = function (e) { got.message = e.data; }; \
         ws.onclose = function (e) { got.code = e.code; window.probe = got; }; \
         return null;",
    );
    b.wait_until("the bad WebSocket was closed", |b| {
        !b.execute("return window.probe;").is_null()
    });
    let probe = b.execute("return window.probe;");
    assert_eq!(probe["code"], 1008, "{probe}");
    let notice: serde_json::Value =
        serde_json::from_str(probe["message"].as_str().unwrap_or("{}")).unwrap();
    assert_eq!(notice["type"], "refused", "{notice}");
    assert_eq!(notice["reason"], "bad_message", "{notice}");
    b.type_keys(&format!("echo still-{marker}\u{E007}"));
    b.wait_until("the terminal still works", |b| {
        terminal_text(b).contains(&format!("still-{marker}"))
    });
    b.screenshot(&shots.join("web-terminal.png"));
    // A cross-site page cannot open it.
    let (head, _) = curl(
        &c,
        &[
            "-H",
            "Upgrade: websocket",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "-H",
            "Origin: https://evil.example",
        ],
        "/webapi/terminal/node1/root",
    );
    assert!(head.starts_with("http/1.1 403"), "{head}");

    // Leaving the shell ends the session, in the page and in `jaunt sessions ls`.
    b.type_keys("exit\u{E007}");
    b.wait_until("the page says the session ended", |b| {
        b.find("#terminal[data-state='closed']").is_some()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_sessions(&c)
        .iter()
        .any(|s| s["id"] == session_id.as_str())
    {
        assert!(Instant::now() < deadline, "the session is still listed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its recording reaches control and holds the output.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let out = ok(c.admin(&["recordings", "ls", "--format", "json"], None));
        let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        if let Some(r) = listed
            .iter()
            .find(|r| r["session_id"] == session_id.as_str())
        {
            break r["id"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the recording never reached control: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let played = ok(c.admin(&["play", &id], None));
    assert!(played.contains(&format!("{marker}-42")), "{played}");
    b.goto(&format!("https://{}/web/recordings/{id}", c.public_addr));
    b.wait_until("the player loaded the recording", |b| {
        b.find("#player[data-state='ready']").is_some()
    });
    b.click(&b.wait_for("#play"));
    b.wait_until("the recording played back", |b| {
        screen_text(b).contains(&format!("{marker}-42"))
    });

    // `jaunt sessions kill` ends a web terminal as it ends `jaunt ssh`.
    b.goto(&format!(
        "https://{}/web/terminal/node1/root",
        c.public_addr
    ));
    b.wait_until("the second terminal connected", |b| {
        b.find("#terminal[data-state='open']").is_some()
    });
    let second = b
        .attribute(&b.wait_for("#terminal"), "data-session")
        .unwrap_or_default();
    assert!(live_sessions(&c).iter().any(|s| s["id"] == second.as_str()));
    ok(c.admin(&["sessions", "kill", &second], None));
    b.wait_until("the killed terminal closed", |b| {
        b.find("#terminal[data-state='closed']").is_some()
    });
    // With a close frame saying who ended it, which the page shows.
    let closed = b.wait_for("#terminal");
    assert_eq!(
        b.attribute(&closed, "data-close-reason").as_deref(),
        Some("killed by admin")
    );
    let status = b.text(&b.wait_for("#terminal-status"));
    assert!(status.contains("ended: killed by admin"), "{status}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_sessions(&c).iter().any(|s| s["id"] == second.as_str()) {
        assert!(
            Instant::now() < deadline,
            "the killed session is still listed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // bob's roles allow login bob only: the engine refuses root, and the page says so.
    b.click(&b.wait_for("#logout"));
    b.wait_until("logged out", |b| b.url().contains("/web/login"));
    log_in(&b, &c, "bob", PASSWORD);
    b.wait_for("table#resources");
    b.goto(&format!(
        "https://{}/web/terminal/node1/root",
        c.public_addr
    ));
    b.wait_until("the terminal was refused", |b| {
        b.find("#terminal[data-state='refused']").is_some()
    });
    let refusal = b.text(&b.wait_for("#terminal-status"));
    assert!(
        refusal.contains("root") && refusal.contains("node1"),
        "{refusal}"
    );
    let denied = c.audit_events(Some("access.denied"));
    assert!(
        denied
            .iter()
            .any(|e| e["user"] == "bob" && e["login"] == "root"),
        "{denied:?}"
    );
    c.assert_sessions_paired();
}

/// Polls the tmux pane of `sock` (session `user`) until its text contains `want`.
#[track_caller]
fn wait_for_pane(sock: &str, want: &str) {
    wait_for_pane_of(sock, "user", want);
}

/// `/web/sessions/ID/join`: bob, whose role has the `session`/`join` rule, watches alice's live
/// `jaunt ssh` (a real PTY in tmux) from the Join button of `/web/sessions`, read-only: alice is
/// told, her output shows in bob's page, what bob types reaches nothing. His observer is a live
/// session of its own (listed, audited, killed from `jaunt sessions kill` with the page saying
/// by whom), and alice leaving ends his page's stream with a visible message. carol, whose
/// role lists sessions but has no `join`, gets no Join button and a refusal at the URL.
#[test]
fn an_observer_joins_from_the_sessions_page_in_chromium() {
    web_join(Kind::Chromium);
}

#[test]
fn an_observer_joins_from_the_sessions_page_in_firefox() {
    web_join(Kind::Firefox);
}

fn web_join(kind: Kind) {
    let c = Cluster::dev_at("localhost:0");
    // The roles exist before the agent starts (it fetches the policy before it serves).
    for (name, verbs) in [("watcher", "[list, join]"), ("lister", "[list]")] {
        let role = c.dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &role,
            format!(
                "kind: role\nversion: v1\nmetadata:\n  name: {name}\nspec:\n  allow:\n    rules:\n    \
                 - resources: [session]\n      verbs: {verbs}\n"
            ),
        )
        .unwrap();
        ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    }
    for (user, roles, logins) in [
        ("alice", "access", "root"),
        ("bob", "watcher", "bob"),
        ("carol", "lister", "carol"),
    ] {
        c.add_user(user, roles, logins, PASSWORD);
    }
    ok(c.login("alice", PASSWORD, &[]));
    let sshd = Sshd::start(&c);
    let _agent = support::sshd::start_agent(&c, "node1", &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");

    // alice's shell: `jaunt ssh` in a real PTY.
    let sock = format!("jaunt-webjoin-{}-{}", kind.name(), std::process::id());
    let _tmux = ssh_in_tmux(&c, &sock, "user");
    ok(tmux(
        &sock,
        &["send-keys", "-t", "user", "echo shell-$((20+1))", "Enter"],
    ));
    wait_for_pane(&sock, "shell-21");
    let listed = live_sessions(&c);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();

    let b = Browser::launch(kind);
    let shots = screenshots(kind);
    let join_page = format!("https://{}/web/sessions/{id}/join", c.public_addr);
    let join = |b: &Browser| {
        b.goto(&format!("https://{}/web/sessions", c.public_addr));
        let button = b.wait_for(&format!("tr.session[data-id='{id}'] a.join-session"));
        let href = b.attribute(&button, "href").unwrap_or_default();
        assert!(
            href.ends_with(&format!("/web/sessions/{id}/join")),
            "{href}"
        );
        b.click(&button);
        b.wait_until("the observer's page connected", |b| {
            b.find("#terminal[data-state='open']").is_some()
        });
    };
    log_in(&b, &c, "bob", PASSWORD);
    b.wait_for("#logout");
    join(&b);
    let status = b.text(&b.wait_for("#terminal-status"));
    assert!(
        status.contains("alice") && status.contains("read-only"),
        "{status}"
    );
    wait_for_pane(
        &sock,
        "[jaunt] bob joined this session as an observer (read-only)",
    );
    // alice's output shows in bob's page.
    ok(tmux(
        &sock,
        &["send-keys", "-t", "user", "echo seen-by-$((6*7))", "Enter"],
    ));
    b.wait_until("alice's output shows in the observer's page", |b| {
        terminal_text(b).contains("seen-by-42")
    });
    // What bob types reaches nothing: not alice's shell, not the node.
    let marker = c.dir.path().join("typed-by-observer");
    b.click(&b.wait_for("#term-screen"));
    b.type_keys(&format!(
        "touch {}; echo observer-typed\u{E007}",
        marker.display()
    ));
    ok(tmux(
        &sock,
        &["send-keys", "-t", "user", "echo after-$((40+2))", "Enter"],
    ));
    b.wait_until("later output shows in the observer's page", |b| {
        terminal_text(b).contains("after-42")
    });
    wait_for_pane(&sock, "after-42");
    assert!(
        !marker.exists(),
        "the observer's keystrokes reached the node"
    );
    let user_pane = pane(&sock, "user");
    assert!(!user_pane.contains("observer-typed"), "{user_pane}");
    assert!(!terminal_text(&b).contains("observer-typed"));
    b.screenshot(&shots.join("web-join.png"));

    // The observer is a live session of its own, and the join is audited.
    let observer = live_sessions(&c)
        .into_iter()
        .find(|s| s["user"] == "bob" && s["observing"] == id.as_str())
        .expect("bob's observer session is listed");
    let observer_id = observer["id"].as_str().unwrap().to_string();
    let joins = c.audit_events(Some("session.join"));
    assert!(
        joins.iter().any(|e| e["user"] == "bob"
            && e["session_id"] == id.as_str()
            && e["observer_session_id"] == observer_id.as_str()),
        "{joins:?}"
    );
    // `jaunt sessions kill` ends the observer (not alice's session); the page says so.
    ok(c.admin(&["sessions", "kill", &observer_id], None));
    b.wait_until("the killed observer's page closed", |b| {
        b.find("#terminal[data-state='closed']").is_some()
    });
    let status = b.text(&b.wait_for("#terminal-status"));
    assert!(
        status.contains("Stopped watching alice's session") && status.contains("killed by admin"),
        "{status}"
    );
    wait_for_pane(&sock, "[jaunt] observer bob left this session");
    ok(tmux(
        &sock,
        &["send-keys", "-t", "user", "echo alive-$((50+1))", "Enter"],
    ));
    wait_for_pane(&sock, "alive-51");

    // carol lists sessions but may not join: no Join button, and a refusal at the URL.
    b.click(&b.wait_for("#logout"));
    b.wait_until("logged out", |b| b.url().contains("/web/login"));
    log_in(&b, &c, "carol", PASSWORD);
    b.wait_for("#logout");
    b.goto(&format!("https://{}/web/sessions", c.public_addr));
    b.wait_for(&format!("tr.session[data-id='{id}']"));
    assert!(
        b.find("a.join-session").is_none(),
        "carol sees a Join button"
    );
    b.goto(&join_page);
    let refusal = b.text(&b.wait_for("main p.error"));
    assert!(refusal.contains("join"), "{refusal}");
    assert!(b.find("#terminal").is_none());
    b.click(&b.wait_for("#logout"));
    b.wait_until("logged out", |b| b.url().contains("/web/login"));

    // bob again: alice leaving ends his page's stream, with a message.
    log_in(&b, &c, "bob", PASSWORD);
    b.wait_for("#logout");
    join(&b);
    ok(tmux(
        &sock,
        &["send-keys", "-t", "user", "echo again-$((60+2))", "Enter"],
    ));
    b.wait_until("the second observer sees output", |b| {
        terminal_text(b).contains("again-62")
    });
    ok(tmux(&sock, &["send-keys", "-t", "user", "exit", "Enter"]));
    b.wait_until("the observer's page says the session ended", |b| {
        b.find("#terminal[data-state='closed']").is_some()
    });
    let status = b.text(&b.wait_for("#terminal-status"));
    assert!(
        status.contains("The session of alice on root@node1 ended."),
        "{status}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !live_sessions(&c).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sessions still listed: {:?}",
            live_sessions(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.assert_sessions_paired();
}

/// Median and 90th percentile of `samples` (milliseconds).
fn median_p90(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

/// Keystroke echo latency through the web terminal's path (browser WebSocket → engine → agent,
/// the SSH client of sshd → the shell's echo → back) against `jaunt ssh -tt` (ssh → jaunt proxy
/// → engine → agent, terminating and recording → sshd), to the same sshd and shell, in the same
/// run. The browser side is timed in the page (performance.now() from sending one input message
/// to the binary message that echoes it; xterm.js's rendering is not included), `jaunt ssh`
/// from writing one byte to its stdin to reading the echo on its stdout.
/// `cargo test -p jaunt-control --test web -- --ignored --nocapture measure_web_terminal`
#[test]
#[ignore = "benchmark: run by hand, see BENCHMARKS.md"]
fn measure_web_terminal_echo_latency() {
    const N: usize = 200;
    let c = Cluster::dev_at("localhost:0");
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--logins",
            "root",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));
    let sshd = Sshd::start(&c);
    let _agent = support::sshd::start_agent(&c, "node1", &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");

    // jaunt ssh: a login shell with a PTY; each 'x' typed comes back as readline's echo.
    let mut ssh = Reaped(
        Command::new(jaunt_bin())
            .args(["ssh", "-tt", "root@node1"])
            .env("JAUNT_HOME", &c.home)
            .env("HOME", &c.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = ssh.0.stdin.take().unwrap();
    let mut stdout = ssh.0.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("# ") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "ssh ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let mut ssh_ms = Vec::with_capacity(N);
    for _ in 0..N {
        let start = Instant::now();
        stdin.write_all(b"x").unwrap();
        stdin.flush().unwrap();
        loop {
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "ssh ended");
            if buf[..n].contains(&b'x') {
                break;
            }
        }
        ssh_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    drop(stdin);
    drop(ssh);

    // The browser: the page's own ticket and WebSocket, driven by a script in the page.
    let b = Browser::start();
    log_in(&b, &c, "alice", PASSWORD);
    b.wait_for("table#resources");
    b.goto(&format!(
        "https://{}/web/terminal/node1/root",
        c.public_addr
    ));
    b.wait_until("the terminal connected", |b| {
        b.find("#terminal[data-state='open']").is_some()
    });
    b.execute(&format!(
        "window.bench = null; var N = {N}; var samples = []; var t0 = 0; var waiting = false; \
         var csrf = document.querySelector('meta[name=\"csrf-token\"]').content; \
         var root = document.getElementById('terminal'); \
         fetch(root.getAttribute('data-ticket'), {{method: 'POST', credentials: 'same-origin', \
           headers: {{'Content-Type': 'application/json', 'X-CSRF-Token': csrf}}, body: '{{}}'}}) \
         .then(function (r) {{ return r.json(); }}).then(function (t) {{ \
           var ws = new WebSocket('wss://' + location.host + root.getAttribute('data-ws')); \
           ws.binaryType = 'arraybuffer'; var prompt = false; var text = ''; \
           function next() {{ \
             if (samples.length === N) {{ window.bench = samples; ws.close(); return; }} \
             waiting = true; t0 = performance.now(); ws.send(new Uint8Array([0, 120])); }} \
           ws.onopen = function () {{ ws.send(JSON.stringify({{ticket: t.ticket}})); }}; \
           ws.onmessage = function (e) {{ \
             if (typeof e.data === 'string') {{ \
               if (JSON.parse(e.data).type === 'ready') ws.send(new Uint8Array([1, 0, 80, 0, 24])); \
               return; }} \
             var bytes = new Uint8Array(e.data); \
             if (!prompt) {{ text += new TextDecoder().decode(bytes); \
               if (text.indexOf('# ') >= 0) {{ prompt = true; next(); }} return; }} \
             if (waiting && bytes.indexOf(120) >= 0) {{ \
               waiting = false; samples.push(performance.now() - t0); next(); }} }}; \
         }}); return null;"
    ));
    b.wait_until("the browser's samples", |b| {
        !b.execute("return window.bench;").is_null()
    });
    let mut web_ms: Vec<f64> = b
        .execute("return window.bench;")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (ssh_med, ssh_p90) = median_p90(&mut ssh_ms);
    let (web_med, web_p90) = median_p90(&mut web_ms);
    println!(
        "echo latency over {N} keystrokes: browser median {web_med:.2} ms (p90 {web_p90:.2}), \
         jaunt ssh median {ssh_med:.2} ms (p90 {ssh_p90:.2}); browser / jaunt ssh = {:.2}x",
        web_med / ssh_med
    );
}
