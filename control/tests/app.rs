//! End to end for web apps: a dev cluster on `localhost` (web apps are named `<app>.<host>`), a
//! separate `jaunt agent` process serving an HTTP app, `jaunt proxy app` as the user's local
//! listener, and curl as the user's HTTP client. The app is an HTTP/1.1 server written here
//! (it must report what it received); everything between curl and it is the real product.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const PASSWORD: &str = "correct horse battery";

/// The app: answers every request with a JSON description of what it received (method, path,
/// headers, body length); `GET /ws` with `Upgrade: websocket` switches protocols and then
/// echoes raw bytes.
fn start_app() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || serve_app_conn(conn));
        }
    });
    addr
}

fn serve_app_conn(conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = serde_json::Map::new();
        let mut content_length = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_string());
            if name == "content-length" {
                content_length = value.parse().unwrap();
            }
            if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
            headers.insert(name, value.into());
        }
        let body_len = if chunked {
            read_chunked(&mut reader)
        } else {
            let mut body = vec![0u8; content_length];
            reader.read_exact(&mut body).unwrap();
            body.len()
        };
        if path == "/ws" && headers.get("upgrade").is_some_and(|u| u == "websocket") {
            let key = headers["sec-websocket-key"].as_str().unwrap();
            write!(
                out,
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                websocket_accept(key)
            )
            .unwrap();
            // Echo until the client closes (what is buffered in the reader first).
            let buffered = reader.buffer().to_vec();
            out.write_all(&buffered).unwrap();
            let mut raw = reader.into_inner();
            let mut buf = [0u8; 4096];
            loop {
                match raw.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if out.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let body = serde_json::json!({
            "method": method, "path": path, "headers": headers, "body_len": body_len,
        })
        .to_string();
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    }
}

fn read_chunked(reader: &mut impl BufRead) -> usize {
    let mut total = 0;
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut chunk = vec![0u8; n + 2];
        reader.read_exact(&mut chunk).unwrap();
        total += n;
        if n == 0 {
            return total;
        }
    }
}

fn websocket_accept(key: &str) -> String {
    use base64::Engine as _;
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// `jaunt agent` serving `--app NAME=URI`, joined with a fresh app token.
fn start_agent(c: &Cluster, name: &str, app: &str, more_apps: &[&str]) -> Reaped {
    let out = ok(c.admin(&["tokens", "add", "--type", "node,app"], None));
    let token = out.lines().next().unwrap().trim().to_string();
    let data = c.dir.path().join(format!("agent-{name}"));
    Reaped(
        Command::new(jaunt_bin())
            .args([
                "agent",
                "--proxy",
                &c.public_addr,
                "--ca-pin",
                &c.pin,
                "--data-dir",
                data.to_str().unwrap(),
                "--name",
                name,
                "--token",
                &token,
                "--app",
                app,
            ])
            .args(more_apps.iter().flat_map(|a| ["--app", a]))
            .env("JAUNT_HOME", c.dir.path().join("agent-home"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `jaunt proxy app NAME` as the logged-in user, once the app is listed (the proxy refuses
/// names the cluster does not list); returns it and its local address.
fn proxy_app(c: &Cluster, name: &str) -> (Reaped, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = ok(c.run(&["ls", "apps"], None));
        if ls
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
        {
            break;
        }
        assert!(Instant::now() < deadline, "app {name} never listed: {ls}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut child = Command::new(jaunt_bin())
        .args(["proxy", "app", name])
        .env("JAUNT_HOME", &c.home)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit_once(" on ")
        .map(|(_, a)| a.to_string())
        .unwrap_or_else(|| panic!("jaunt proxy app printed {line:?}"));
    (Reaped(child), addr)
}

fn curl(args: &[&str]) -> (bool, String) {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// Polls `GET url` through the local listener until the app answers 200, bounded.
fn wait_for_app(url: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out) = curl(&["-w", "\n%{http_code}", url]);
        if let Some(body) = out.strip_suffix("\n200") {
            return serde_json::from_str(body).unwrap();
        }
        assert!(Instant::now() < deadline, "the app never answered: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn web_app_through_the_cluster_with_curl_jwt_and_websocket() {
    let c = Cluster::dev_at("localhost:0");
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));
    let app_addr = start_app();
    let _agent = start_agent(&c, "node1", &format!("web1=http://{app_addr}"), &[]);
    let (_proxy, local) = proxy_app(&c, "web1");
    let base = format!("http://{local}");

    // curl gets the app's body; the app got the user's identity, not what the client claimed.
    wait_for_app(&format!("{base}/ready"));
    let (good, out) = curl(&[
        "-f",
        "-H",
        "Jaunt-Jwt-Assertion: forged",
        "-H",
        "jaunt-foo: evil",
        &format!("{base}/hello?x=1"),
    ]);
    assert!(good, "{out}");
    let seen: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["path"], "/hello?x=1");
    let headers = &seen["headers"];
    assert!(headers.get("jaunt-foo").is_none(), "{headers}");
    assert_eq!(headers["host"], app_addr.as_str(), "{headers}");
    let jwt = headers["jaunt-jwt-assertion"].as_str().unwrap();
    assert_ne!(jwt, "forged");

    // The JWT verifies against the JWK Set the engine serves at the public address.
    let port = c.public_addr.rsplit_once(':').unwrap().1;
    let ca = c.dir.path().join("host-ca.pem");
    std::fs::write(
        &ca,
        ok(c.admin(&["ca", "export", "--type", "host-tls"], None)),
    )
    .unwrap();
    let (good, jwks) = curl(&[
        "-f",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &format!("localhost:{port}:127.0.0.1"),
        &format!("https://localhost:{port}/.well-known/jwks.json"),
    ]);
    assert!(good, "{jwks}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = jaunt_control::jwt::verify(jwt, &jwks, now).unwrap();
    assert_eq!(claims.sub, "alice");
    assert!(claims.roles.iter().any(|r| r == "access"), "{claims:?}");
    assert!(claims.exp > now);
    // ... and not against another key set.
    let other = jaunt_control::jwt::JwtSigner::from_pem(
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    assert!(jaunt_control::jwt::verify(jwt, &other.jwks_json(), now).is_err());

    // Request bodies of both framings arrive whole.
    let body = c.dir.path().join("body.bin");
    std::fs::write(&body, vec![7u8; 3 << 20]).unwrap();
    let data = format!("@{}", body.display());
    let (good, out) = curl(&["-f", "--data-binary", &data, &format!("{base}/upload")]);
    assert!(good, "{out}");
    let seen: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (seen["method"].as_str(), seen["body_len"].as_u64()),
        (Some("POST"), Some(3 << 20))
    );
    let (good, out) = curl(&[
        "-f",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &data,
        &format!("{base}/chunked"),
    ]);
    assert!(good, "{out}");
    let seen: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(seen["body_len"].as_u64(), Some(3 << 20));

    // A WebSocket upgrade passes through, then bytes echo both ways.
    let mut ws = TcpStream::connect(&local).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nHost: {local}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            ws.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let message = b"\x81\x05hello over a websocket";
    ws.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    ws.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
    drop(ws);

    // Without a user certificate (straight to the engine, as a browser would come) the app
    // route says how to get in.
    let (_, out) = curl(&[
        // The engine's certificate names the public host only: `*.localhost` is no valid
        // wildcard (a DNS public host gets `*.<host>`).
        "--insecure",
        "--resolve",
        &format!("web1.localhost:{port}:127.0.0.1"),
        "-w",
        "\nstatus=%{http_code}",
        &format!("https://web1.localhost:{port}/"),
    ]);
    assert!(
        out.contains("status=401") && out.contains("jaunt proxy app web1"),
        "{out}"
    );

    // An app nobody serves is refused by name, before the proxy listens.
    let err = fails(c.run(&["proxy", "app", "ghost"], None));
    assert!(err.contains("no such web app: ghost"), "{err}");

    // The sessions are in the audit log as app sessions of alice.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(c.admin(
            &[
                "audit",
                "search",
                "--type",
                "session.start",
                "--format",
                "json",
            ],
            None,
        ));
        let events: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let apps = events
            .iter()
            .filter(|e| e.to_string().contains("web1") && e.to_string().contains("alice"))
            .count();
        if apps >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "app sessions not audited: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each request is an app.request event from the agent, with method, path and status.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(c.admin(
            &[
                "audit",
                "search",
                "--type",
                "app.request",
                "--format",
                "json",
            ],
            None,
        ));
        let events: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let hello = events.iter().any(|e| {
            let e = e.to_string();
            e.contains("alice") && e.contains("/hello?x=1") && e.contains("200")
        });
        if hello {
            break;
        }
        assert!(Instant::now() < deadline, "app requests not audited: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(_proxy);
    c.assert_sessions_paired();
}

/// Issue 15: logged in by IP address (`jaunt start --dev` advertised 127.0.0.1), `jaunt proxy
/// app` asked for a DNS name; it now names the app in a dial request (ALPN `jaunt-app`). Names
/// the cluster does not list are refused before the proxy listens.
#[test]
fn proxy_app_works_when_logged_in_by_ip_address() {
    let c = Cluster::dev_at("127.0.0.1:0");
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));
    let app_addr = start_app();
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let _agent = start_agent(
        &c,
        "node1",
        &format!("web1=http://{app_addr}"),
        &[&format!("echo=tcp://{}", echo.local_addr().unwrap())],
    );
    let (_proxy, local) = proxy_app(&c, "web1");
    let seen = wait_for_app(&format!("http://{local}/ready"));
    assert_eq!(seen["path"], "/ready");
    let jwt = seen["headers"]["jaunt-jwt-assertion"].as_str().unwrap();
    assert_eq!(jwt.split('.').count(), 3, "{jwt}");

    // Unknown names and the wrong kind of app are refused at once, before any listener.
    let err = fails(c.run(&["proxy", "app", "nosuch"], None));
    assert!(err.contains("no such web app: nosuch"), "{err}");
    let err = fails(c.run(&["proxy", "tcp", "nosuch"], None));
    assert!(err.contains("no such TCP app: nosuch"), "{err}");
    let err = fails(c.run(&["proxy", "tcp", "web1"], None));
    assert!(
        err.contains("web1 is a web app, not a TCP app: use `jaunt proxy app web1`"),
        "{err}"
    );
    let err = fails(c.run(&["proxy", "app", "echo"], None));
    assert!(err.contains("use `jaunt proxy tcp echo`"), "{err}");
}
