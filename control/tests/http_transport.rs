//! The control API transport end to end: `jaunt_control::http::serve` and
//! `jaunt_control::client::Client` over real TLS on 127.0.0.1, with a throwaway PKI from rcgen.
//!
//! Covers the JSON round trip, the three trust modes, mTLS, every bound that answers with a
//! status, hostile peers (garbage, plain HTTP, silence), the worker-pool bound, and shutdown.
//! Nothing here orders events with sleeps: waits poll a condition under a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use jaunt_control::client::{spki_pin, Client, ClientError, Trust};
use jaunt_control::http::{self, Limits, Request, Response, ServerHandle, Stats};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Harness: a throwaway PKI and a server builder

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(1);
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf from `ca`, returned as a chain `[leaf, ca]` and its key.
fn new_leaf(ca: &Ca, common_name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Identity {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    validity(&mut params);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (vec![cert.der().clone(), ca.cert.clone()], key)
}

fn server_identity(ca: &Ca, sans: &[&str]) -> Identity {
    new_leaf(
        ca,
        "jaunt control",
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )
}

fn user_identity(ca: &Ca, user: &str) -> Identity {
    new_leaf(ca, user, &[], ExtendedKeyUsagePurpose::ClientAuth)
}

/// What the test handler does with a request to `/v1/block`: tell the test it entered, then
/// wait to be released.
struct Gate {
    entered: mpsc::Sender<()>,
    release: Mutex<mpsc::Receiver<()>>,
}

fn handler(gate: Option<Arc<Gate>>) -> http::Handler {
    Arc::new(
        move |req: &Request| match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/ping") => Response::json(200, &json!({ "pong": true })),
            ("POST", "/v1/echo") => match req.json::<Value>() {
                Ok(body) => Response::json(
                    200,
                    &json!({ "got": body, "query": req.query, "path": req.path }),
                ),
                Err(bad) => bad,
            },
            ("GET", "/v1/whoami") => {
                let common_name = req.peer_certs.first().and_then(|cert| {
                    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
                    let cn = cert
                        .subject()
                        .iter_common_name()
                        .next()?
                        .as_str()
                        .ok()?
                        .to_owned();
                    Some(cn)
                });
                Response::json(
                    200,
                    &json!({ "certs": req.peer_certs.len(), "user": common_name }),
                )
            }
            ("GET", "/v1/peer") => Response::json(200, &json!({ "peer": req.peer.to_string() })),
            ("DELETE", "/v1/things/a b") => Response::empty(204),
            ("GET", "/v1/block") => {
                if let Some(gate) = &gate {
                    let _ = gate.entered.send(());
                    let _ = gate
                        .release
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(30));
                }
                Response::json(200, &json!({ "released": true }))
            }
            _ => Response::error(404, format!("no route for {} {}", req.method, req.path)),
        },
    )
}

struct TestServer {
    handle: Option<ServerHandle>,
    addr: String,
    ca: Ca,
    client_ca: Ca,
    stats: Arc<Stats>,
}

impl TestServer {
    fn start(limits: Limits) -> TestServer {
        TestServer::start_with(limits, &["localhost", "127.0.0.1"], None)
    }

    fn start_with(limits: Limits, sans: &[&str], gate: Option<Arc<Gate>>) -> TestServer {
        let ca = new_ca("jaunt host CA");
        let client_ca = new_ca("jaunt user CA");
        let (chain, key) = server_identity(&ca, sans);
        let tls = http::server_config(chain, key, vec![client_ca.cert.clone()]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let handle = http::serve(listener, tls, handler(gate), limits).unwrap();
        let addr = handle.local_addr.to_string();
        let stats = handle.stats();
        TestServer {
            handle: Some(handle),
            addr,
            ca,
            client_ca,
            stats,
        }
    }

    fn client(&self, trust: Trust) -> Client {
        Client::new(&self.addr, trust, None).unwrap()
    }

    fn trusting_client(&self) -> Client {
        self.client(Trust::Roots(vec![self.ca.cert.clone()]))
    }

    fn assert_serving(&self) {
        let pong: Value = self.trusting_client().get_json("/v1/ping").unwrap();
        assert_eq!(pong, json!({ "pong": true }));
    }

    fn shutdown(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
    }

    /// A TLS connection from a bare rustls client (keep-alive, pipelining, slow peers).
    fn raw_tls(&self) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        raw_tls_over(TcpStream::connect(&self.addr).unwrap(), &self.ca)
    }
}

fn raw_tls_over(
    sock: TcpStream,
    ca: &Ca,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"jaunt-control".to_vec()];
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Reads one response: (status, head, body).
fn read_response(stream: &mut impl Read) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "connection closed inside a response head"
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, head, body)
}

/// True once the peer closed `stream` (EOF or reset) within `within`.
fn closed_within(stream: &mut impl Read, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

fn wait_for(what: &str, within: Duration, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips and trust

#[test]
fn json_round_trips() {
    let server = TestServer::start(Limits::default());
    let client = server.trusting_client();

    let pong: Value = client.get_json("/v1/ping").unwrap();
    assert_eq!(pong, json!({ "pong": true }));

    let echoed: Value = client
        .post_json("/v1/echo?x=a%20b&y=1+2", &json!({ "user": "alice" }))
        .unwrap();
    assert_eq!(echoed["got"], json!({ "user": "alice" }));
    assert_eq!(echoed["query"], json!([["x", "a b"], ["y", "1 2"]]));

    client.delete("/v1/things/a%20b").unwrap();

    match client.get_json::<Value>("/v1/nowhere") {
        Err(ClientError::Api {
            status: 404,
            message,
        }) => assert_eq!(message, "no route for GET /v1/nowhere"),
        other => panic!("expected a 404, got {other:?}"),
    }
    match client.post_json::<_, Value>("/v1/echo", &"not an object".to_owned()) {
        Ok(echoed) => assert_eq!(echoed["got"], json!("not an object")),
        other => panic!("expected an echo, got {other:?}"),
    }
    let (status, body) = client.request("POST", "/v1/echo", Some(b"{nope")).unwrap();
    assert_eq!(status, 400);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"),
        "{body}"
    );
    assert_eq!(server.stats.requests(), 6);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = TestServer::start(Limits::default());
    let mut tls = server.raw_tls();
    // Two pipelined requests in one write, then one more, then Connection: close.
    tls.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/echo HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]")
        .unwrap();
    let (status, head, body) = read_response(&mut tls);
    assert_eq!(status, 200);
    assert!(head.contains("Connection: keep-alive"), "{head}");
    assert_eq!(body, br#"{"pong":true}"#);
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"jaunt-control"[..]));
    let (status, _, body) = read_response(&mut tls);
    assert_eq!(status, 200);
    assert!(String::from_utf8(body).unwrap().contains(r#""got":[]"#));

    tls.write_all(b"GET /v1/ping HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (status, head, _) = read_response(&mut tls);
    assert_eq!(status, 200);
    assert!(head.contains("Connection: close"), "{head}");
    assert!(closed_within(&mut tls, Duration::from_secs(5)));
    assert_eq!(server.stats.accepted(), 1);
}

/// A loopback peer (the engine) may prefix a PROXY v2 header: the handler sees its source as
/// the peer. Without one, the handler sees the TCP peer.
#[test]
fn proxy_v2_header_from_loopback_sets_the_peer() {
    let server = TestServer::start(Limits::default());
    let peer_of = |mut tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>| {
        tls.write_all(b"GET /v1/peer HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (status, _, body) = read_response(&mut tls);
        assert_eq!(status, 200);
        let body: Value = serde_json::from_slice(&body).unwrap();
        body["peer"].as_str().unwrap().to_owned()
    };

    let mut sock = TcpStream::connect(&server.addr).unwrap();
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "203.0.113.7:5555".parse::<std::net::SocketAddr>().unwrap(),
            server.addr.parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    sock.write_all(&header).unwrap();
    assert_eq!(peer_of(raw_tls_over(sock, &server.ca)), "203.0.113.7:5555");

    let sock = TcpStream::connect(&server.addr).unwrap();
    let own = sock.local_addr().unwrap().to_string();
    assert_eq!(peer_of(raw_tls_over(sock, &server.ca)), own);

    // A header that does not parse closes the connection, and only that one.
    let mut sock = TcpStream::connect(&server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(b"\r\n\r\n\0\r\nQUIT\n\x99\x11\x00\x0c garbage here")
        .unwrap();
    assert!(closed_within(&mut sock, Duration::from_secs(5)));
    server.assert_serving();
}

#[test]
fn pin_match_verifies_and_records_the_ca() {
    let server = TestServer::start(Limits::default());
    let client = server.client(Trust::Pin(spki_pin(&server.ca.cert).unwrap()));
    assert!(client.pinned_ca().is_none());
    let _: Value = client.get_json("/v1/ping").unwrap();
    assert_eq!(client.pinned_ca(), Some(server.ca.cert.clone()));

    // What the login flow does next: trust the recorded CA.
    let next = server.client(Trust::Roots(vec![client.pinned_ca().unwrap()]));
    let _: Value = next.get_json("/v1/ping").unwrap();
}

#[test]
fn pin_mismatch_says_what_the_server_has() {
    let server = TestServer::start(Limits::default());
    let other = new_ca("someone else");
    let client = server.client(Trust::Pin(spki_pin(&other.cert).unwrap()));
    let err = client.get_json::<Value>("/v1/ping").unwrap_err();
    let expected_got = spki_pin(&server.ca.cert).unwrap();
    match &err {
        ClientError::PinMismatch { got } => assert_eq!(got, &expected_got),
        other => panic!("expected a pin mismatch, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!("the server's CA does not match --ca-pin (got {expected_got})")
    );
    assert!(client.pinned_ca().is_none());
    server.assert_serving();
}

#[test]
fn pin_still_checks_the_name() {
    let server = TestServer::start_with(Limits::default(), &["other.example"], None);
    let client = server.client(Trust::Pin(spki_pin(&server.ca.cert).unwrap()));
    match client.get_json::<Value>("/v1/ping") {
        Err(ClientError::Tls { reason, .. }) => {
            assert!(reason.contains("not valid for"), "{reason}")
        }
        other => panic!("expected a name error, got {other:?}"),
    }
    assert!(client.pinned_ca().is_none());
    // Trust::Insecure is the explicit way around it.
    let _: Value = server.client(Trust::Insecure).get_json("/v1/ping").unwrap();
}

#[test]
fn roots_trust_accepts_the_right_ca_only() {
    let server = TestServer::start(Limits::default());
    let _: Value = server.trusting_client().get_json("/v1/ping").unwrap();

    let stranger = new_ca("stranger");
    let client = server.client(Trust::Roots(vec![stranger.cert.clone()]));
    match client.get_json::<Value>("/v1/ping") {
        Err(ClientError::Tls { reason, .. }) => {
            assert!(reason.contains("UnknownIssuer"), "{reason}")
        }
        other => panic!("expected an unknown issuer, got {other:?}"),
    }
    server.assert_serving();
}

#[test]
fn unreachable_proxy_is_reported_plainly() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let client = Client::new(&addr, Trust::Insecure, None).unwrap();
    let err = client.get_json::<Value>("/v1/ping").unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach the proxy at {addr}: ")),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// mTLS

#[test]
fn handler_sees_the_client_certificate() {
    let server = TestServer::start(Limits::default());
    let identity = user_identity(&server.client_ca, "alice");
    let client = Client::new(
        &server.addr,
        Trust::Roots(vec![server.ca.cert.clone()]),
        Some(identity),
    )
    .unwrap();
    let who: Value = client.get_json("/v1/whoami").unwrap();
    assert_eq!(who, json!({ "certs": 2, "user": "alice" }));
}

#[test]
fn without_a_client_certificate_the_handler_sees_none() {
    let server = TestServer::start(Limits::default());
    let who: Value = server.trusting_client().get_json("/v1/whoami").unwrap();
    assert_eq!(who, json!({ "certs": 0, "user": null }));
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let server = TestServer::start(Limits::default());
    let impostor = user_identity(&new_ca("impostor CA"), "mallory");
    let client = Client::new(
        &server.addr,
        Trust::Roots(vec![server.ca.cert.clone()]),
        Some(impostor),
    )
    .unwrap();
    match client.get_json::<Value>("/v1/whoami") {
        Err(ClientError::Tls { reason, .. }) => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
    wait_for("the refusal to be counted", Duration::from_secs(5), || {
        server.stats.tls_failures() == 1
    });
    server.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Bounds that answer with a status

#[test]
fn oversized_headers_get_431() {
    let server = TestServer::start(Limits::default());
    let client = server.trusting_client();
    let path = format!("/v1/ping?pad={}", "a".repeat(20 * 1024));
    let (status, body) = client.request("GET", &path, None).unwrap();
    assert_eq!(status, 431);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["error"].as_str().unwrap().contains("16384"), "{body}");
    assert_eq!(server.stats.bad_requests(), 1);

    // Too many headers too.
    let mut tls = server.raw_tls();
    let many: String = (0..65).map(|i| format!("X-H{i}: v\r\n")).collect();
    tls.write_all(format!("GET /v1/ping HTTP/1.1\r\n{many}\r\n").as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut tls).0, 431);
    assert!(closed_within(&mut tls, Duration::from_secs(5)));
    server.assert_serving();
}

#[test]
fn oversized_body_gets_413() {
    let server = TestServer::start(Limits::default());
    let client = server.trusting_client();
    let body = vec![b' '; 2 * 1024 * 1024];
    let (status, answer) = client.request("POST", "/v1/echo", Some(&body)).unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
    match client.post_json::<_, Value>("/v1/echo", &"x".repeat(1024 * 1024 + 1)) {
        Err(ClientError::Api {
            status: 413,
            message,
        }) => assert!(message.contains("larger than"), "{message}"),
        other => panic!("expected a 413, got {other:?}"),
    }
    // Exactly at the bound is fine.
    let just_fits = format!("\"{}\"", "y".repeat(1024 * 1024 - 2));
    let (status, _) = client
        .request("POST", "/v1/echo", Some(just_fits.as_bytes()))
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(server.stats.bad_requests(), 2);
}

#[test]
fn chunked_and_malformed_requests_are_refused() {
    let server = TestServer::start(Limits::default());
    let mut tls = server.raw_tls();
    tls.write_all(
        b"POST /v1/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut tls).0, 411);
    assert!(closed_within(&mut tls, Duration::from_secs(5)));

    let mut tls = server.raw_tls();
    tls.write_all(b"THIS IS NOT HTTP\r\n\r\n").unwrap();
    let (status, head, _) = read_response(&mut tls);
    assert_eq!(status, 400);
    assert!(head.contains("Connection: close"), "{head}");
    assert!(closed_within(&mut tls, Duration::from_secs(5)));
    assert_eq!(server.stats.bad_requests(), 2);
    server.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Hostile peers cost only their connection

#[test]
fn garbage_bytes_close_only_that_connection() {
    let server = TestServer::start(Limits::default());
    for garbage in [
        &b"\x16\x03\x01\x00\x05hello-not-a-client-hello"[..],
        &[0u8; 64][..],
        &[0xff; 3][..],
    ] {
        let mut sock = TcpStream::connect(&server.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.write_all(garbage).unwrap();
        assert!(
            closed_within(&mut sock, Duration::from_secs(5)),
            "server kept a garbage connection open"
        );
        server.assert_serving();
    }
    assert_eq!(server.stats.tls_failures(), 3);
}

#[test]
fn plain_http_on_the_tls_port_gets_a_hint_and_is_closed() {
    let server = TestServer::start(Limits::default());
    let mut sock = TcpStream::connect(&server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, _, body) = read_response(&mut sock);
    assert_eq!(status, 400);
    assert!(String::from_utf8(body).unwrap().contains("speaks TLS"));
    assert!(closed_within(&mut sock, Duration::from_secs(5)));
    server.assert_serving();
}

#[test]
fn a_silent_client_times_out_without_blocking_others() {
    let limits = Limits {
        workers: 2,
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = TestServer::start(limits);
    let mut silent = TcpStream::connect(&server.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    server.assert_serving(); // served by the other worker while the silent one waits
    let started = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)),
        "silent connection never closed"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_for("the timeout to be counted", Duration::from_secs(5), || {
        server.stats.tls_failures() == 1
    });
    server.assert_serving();
}

#[test]
fn a_client_silent_after_the_handshake_times_out() {
    let limits = Limits {
        workers: 1,
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = TestServer::start(limits);
    let mut tls = server.raw_tls();
    tls.write_all(b"GET /v1/ping HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut tls).0, 200);
    // Idle past idle_timeout: the only worker drops it and serves the next client.
    assert!(closed_within(&mut tls, Duration::from_secs(5)));
    server.assert_serving();
}

#[test]
fn a_request_trickling_in_is_cut_at_the_request_timeout() {
    let limits = Limits {
        workers: 1,
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = TestServer::start(limits);
    let mut tls = server.raw_tls();
    tls.write_all(b"GET /v1/pi").unwrap(); // and never the rest
    assert!(closed_within(&mut tls, Duration::from_secs(5)));
    server.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// The pool bound

#[test]
fn a_full_pool_refuses_quickly_and_recovers() {
    let limits = Limits {
        workers: 1,
        queue: 1,
        ..Limits::default()
    };
    let server = TestServer::start(limits);

    // A holds the only worker: a keep-alive connection after one request.
    let mut a = server.raw_tls();
    a.write_all(b"GET /v1/ping HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut a).0, 200);

    // B waits in the only queue slot.
    let b = TcpStream::connect(&server.addr).unwrap();
    wait_for("B to be accepted", Duration::from_secs(5), || {
        server.stats.accepted() == 2
    });

    // C finds the queue full: refused at once, not left hanging.
    let started = Instant::now();
    let err = server
        .trusting_client()
        .get_json::<Value>("/v1/ping")
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusal took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, ClientError::Tls { .. } | ClientError::Io { .. }),
        "{err:?}"
    );
    assert_eq!(server.stats.rejected_busy(), 1);

    // A leaves; B gets the worker and is served.
    drop(a);
    let mut b = raw_tls_over(b, &server.ca);
    b.write_all(b"GET /v1/ping HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut b).0, 200);
    drop(b);
    server.assert_serving();
    assert_eq!(server.stats.rejected_busy(), 1);
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[test]
fn shutdown_is_prompt_with_idle_connections() {
    let mut server = TestServer::start(Limits::default());
    let mut idle = server.raw_tls();
    idle.write_all(b"GET /v1/ping HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut idle).0, 200);
    let _silent = TcpStream::connect(&server.addr).unwrap(); // mid-handshake

    let started = Instant::now();
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(closed_within(&mut idle, Duration::from_secs(5)));
    assert!(
        TcpStream::connect(&server.addr).is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn shutdown_lets_the_request_in_flight_finish() {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        entered: entered_tx,
        release: Mutex::new(release_rx),
    });
    let mut server = TestServer::start_with(Limits::default(), &["127.0.0.1"], Some(gate));

    let client = server.trusting_client();
    let in_flight = thread::spawn(move || client.get_json::<Value>("/v1/block"));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();

    let handle = server.handle.take().unwrap();
    let stopping = thread::spawn(move || {
        handle.shutdown();
        Instant::now()
    });
    // New connections are refused once the acceptor is gone, while the request is still held.
    wait_for("the listener to close", Duration::from_secs(5), || {
        TcpStream::connect(&server.addr).is_err()
    });
    assert!(
        !stopping.is_finished(),
        "shutdown did not wait for the request in flight"
    );

    let released = Instant::now();
    release.send(()).unwrap();
    assert_eq!(
        in_flight.join().unwrap().unwrap(),
        json!({ "released": true })
    );
    let stopped = stopping.join().unwrap();
    assert!(stopped.duration_since(released) < Duration::from_secs(2));
}
