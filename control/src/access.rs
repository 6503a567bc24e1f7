//! The user's side of resource access: dial a node, database, TCP or web app through the engine with
//! the logged-in identity, then carry bytes. Plain threads and blocking rustls (the client is not
//! the fast path); one TLS connection per session, ALPN `jaunt-ssh`, `jaunt-postgres`,
//! `jaunt-tcp` or `jaunt-app` (a web app when the proxy was reached by IP address; by DNS name,
//! a web app is reached with SNI `<app>.<proxy host>` and no dial request), client certificate
//! from `$JAUNT_HOME`.
//!
//! After the handshake the client sends one [`DialRequest`] and reads one [`DialResponse`]; on
//! `ok` the connection carries the user's protocol (SSH, PostgreSQL, TCP) end to end. The response
//! is read to its last byte and not one further: the target's first bytes often arrive in the
//! same read (under load, the dial answer and sshd's banner share a TLS record), and they are
//! the session's, delivered by [`pipe_fds`] before it waits for the socket again.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use jaunt_config::identity::unix_now;
use jaunt_config::wire::dial::{DialKind, DialRequest, DialResponse};
use jaunt_config::wire::ALPN_HTTP1;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::profile::{Profile, ProfileInfo};

/// How long to wait for the engine to answer a dial.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(20);

/// How long to wait for the engine to answer an SSH dial: longer than the engine's own bound
/// for the agent's answer ([`jaunt_engine::server::SSH_ANSWER_TIMEOUT`], since an agent that
/// records the session logs in to sshd before it answers), so that under a burst the engine's
/// answer, not this client's impatience, decides.
pub const SSH_DIAL_TIMEOUT: Duration =
    Duration::from_secs(jaunt_engine::server::SSH_ANSWER_TIMEOUT.as_secs() + 15);

/// How long to wait for the engine to answer a dial of `kind`.
pub fn dial_timeout(kind: DialKind) -> Duration {
    match kind {
        DialKind::Ssh => SSH_DIAL_TIMEOUT,
        _ => DIAL_TIMEOUT,
    }
}

/// A TLS stream to the engine, connected to a target.
pub type Session = StreamOwned<ClientConnection, TcpStream>;

/// Dials targets as the logged-in user.
pub struct Dialer {
    proxy: String,
    /// The other engines learned at login, tried in order when `proxy` cannot be reached.
    fallbacks: Vec<String>,
    server_name: ServerName<'static>,
    roots: Arc<RootCertStore>,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl Dialer {
    /// From `$JAUNT_HOME`: errors say what to run when nobody is logged in or the certificate
    /// expired.
    pub fn from_profile(profile: &Profile) -> anyhow::Result<(Dialer, ProfileInfo)> {
        let Some(info) = profile.load()? else {
            bail!("not logged in: run `jaunt login --proxy HOST:PORT --user NAME`");
        };
        if info.identity.expires <= unix_now() {
            bail!(
                "your certificate expired at {}: run `jaunt login` again",
                crate::audit::rfc3339(info.identity.expires)
            );
        }
        let mut roots = RootCertStore::empty();
        for ca in profile.host_ca()? {
            roots
                .add(ca)
                .context("the stored host CA is unusable; run `jaunt login` again")?;
        }
        let (chain, key) = profile.tls_identity(&info.user)?;
        let host = crate::client::host_part(&info.proxy).to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| anyhow!("{host} is not a valid server name"))?;
        Ok((
            Dialer {
                proxy: info.proxy.clone(),
                fallbacks: info.engines.clone(),
                server_name,
                roots: Arc::new(roots),
                chain,
                key,
            },
            info,
        ))
    }

    fn config(&self, alpn: &[u8]) -> anyhow::Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }

    /// Connects to the engine and dials `request`; returns the connected session, or the
    /// engine's refusal as an error a person can act on.
    pub fn dial(&self, request: &DialRequest) -> anyhow::Result<Session> {
        // A web app by name (SNI `<app>.<proxy host>`) when the proxy has one, else by dial
        // request like the other kinds.
        if request.kind == DialKind::App && self.names_apps_by_sni() {
            return self.dial_app(&request.target);
        }
        let alpn = request.kind.alpn();
        let (mut tls, proxy) = self.reach_engine(alpn)?;
        tls.sock
            .set_read_timeout(Some(dial_timeout(request.kind)))?;
        tls.write_all(&request.encode())
            .map_err(|e| handshake_error(e, proxy))?;
        tls.flush()?;
        let response = read_dial_response(&mut tls).map_err(|e| match e {
            ResponseError::Io(e) => handshake_error(e, proxy),
            ResponseError::Closed => {
                anyhow!("the proxy closed the connection before answering the dial")
            }
            ResponseError::Gibberish(e) => {
                anyhow!("the proxy answered gibberish ({e}): is {proxy} a Jaunt proxy?")
            }
        })?;
        if !response.ok {
            bail!(
                "{}",
                response
                    .error
                    .unwrap_or_else(|| "the proxy refused the connection".into())
            );
        }
        tls.sock.set_read_timeout(None)?;
        Ok(tls)
    }
}

/// Why [`read_dial_response`] found no answer.
#[derive(Debug)]
enum ResponseError {
    Io(std::io::Error),
    /// The stream ended inside the frame.
    Closed,
    /// The frame is not a dial response (length out of bounds, or not its JSON).
    Gibberish(jaunt_config::wire::dial::DialError),
}

/// Reads exactly one dial response frame: the length prefix, then that many bytes, and not one
/// byte more. What follows the frame (the node's SSH banner, often in the same TLS record under
/// load) is the session's and stays in the stream for [`pipe_fds`] to deliver.
fn read_dial_response(stream: &mut impl Read) -> Result<DialResponse, ResponseError> {
    use jaunt_config::wire::dial::{split_frame, LENGTH_PREFIX_BYTES, MAX_DIAL_RESPONSE_BYTES};
    let read_exact = |stream: &mut dyn Read, buf: &mut [u8]| {
        stream.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ResponseError::Closed,
            _ => ResponseError::Io(e),
        })
    };
    let mut frame = vec![0u8; LENGTH_PREFIX_BYTES];
    read_exact(stream, &mut frame)?;
    // Checks the length against the bound before reading the body.
    split_frame(&frame, MAX_DIAL_RESPONSE_BYTES).map_err(ResponseError::Gibberish)?;
    let len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
    frame.resize(LENGTH_PREFIX_BYTES + len, 0);
    read_exact(stream, &mut frame[LENGTH_PREFIX_BYTES..])?;
    match DialResponse::parse(&frame) {
        Ok(Some((response, _))) => Ok(response),
        Ok(None) => Err(ResponseError::Closed),
        Err(e) => Err(ResponseError::Gibberish(e)),
    }
}

impl Dialer {
    /// A TLS connection (handshake done) for a dial: to the engine logged in through, else to
    /// the other engines learned at login, in order. An engine that drains (SIGTERM) closes its
    /// port at once, so its refusal, or a reset before the handshake ends, sends the dial to the
    /// next engine; nothing was dialed yet. When none answers, the error is the first engine's.
    fn reach_engine(&self, alpn: &[u8]) -> anyhow::Result<(Session, &str)> {
        let config = self.config(alpn)?;
        let mut first_error = None;
        for proxy in std::iter::once(&self.proxy).chain(&self.fallbacks) {
            let attempt = || -> anyhow::Result<Session> {
                let server_name = if *proxy == self.proxy {
                    self.server_name.clone()
                } else {
                    let host = crate::client::host_part(proxy).to_string();
                    ServerName::try_from(host.clone())
                        .map_err(|_| anyhow!("{host} is not a valid server name"))?
                };
                let tcp = connect(proxy)?;
                tcp.set_nodelay(true)?;
                tcp.set_read_timeout(Some(DIAL_TIMEOUT))?;
                let conn = ClientConnection::new(config.clone(), server_name)?;
                let mut tls = StreamOwned::new(conn, tcp);
                finish_handshake(&mut tls).map_err(|e| handshake_error(e, proxy))?;
                Ok(tls)
            };
            match attempt() {
                Ok(tls) => {
                    if *proxy != self.proxy {
                        tracing::info!(
                            engine = %proxy,
                            unreachable = %self.proxy,
                            "dialing through another engine"
                        );
                    }
                    return Ok((tls, proxy.as_str()));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| anyhow!("no engine to dial through")))
    }

    /// A TCP connection to the proxy logged in through.
    fn connect_proxy(&self) -> anyhow::Result<TcpStream> {
        connect(&self.proxy)
    }

    /// Whether web apps are dialed by TLS name (`<app>.<proxy host>`): when the proxy was
    /// reached by a DNS name. Logged in by IP address, there is no name to put the app under:
    /// the app is named in a dial request (ALPN `jaunt-app`) instead.
    pub fn names_apps_by_sni(&self) -> bool {
        matches!(self.server_name, ServerName::DnsName(_))
    }

    /// The TLS name of web app `name`: `<name>.<proxy host>` (what the engine routes on and
    /// its certificate covers).
    pub fn app_server_name(&self, name: &str) -> anyhow::Result<ServerName<'static>> {
        let host = match &self.server_name {
            ServerName::DnsName(dns) => dns.as_ref().to_string(),
            _ => bail!(
                "the proxy {} has no DNS name to reach app {name} under: it is dialed by name \
                 in a request instead",
                self.proxy
            ),
        };
        let name = format!("{name}.{host}");
        ServerName::try_from(name.clone()).map_err(|_| anyhow!("{name} is not a valid server name"))
    }

    /// Connects to web app `name` (HTTP/1.1 over TLS with the user's certificate, SNI
    /// `<name>.<proxy host>`): the session carries HTTP as is; the engine's refusals arrive as
    /// HTTP error responses.
    pub fn dial_app(&self, name: &str) -> anyhow::Result<Session> {
        let server_name = self.app_server_name(name)?;
        let tcp = self.connect_proxy()?;
        tcp.set_nodelay(true)?;
        // The SNI names the app; the certificate is checked against the proxy's own name (the
        // engine is one server with apps as virtual hosts, and `*.localhost` is no valid
        // wildcard for a verifier).
        let mut config = ClientConfig::clone(&*self.config(ALPN_HTTP1)?);
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()?;
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(AsProxyName {
                inner: verifier,
                name: self.server_name.clone(),
            }));
        let conn = ClientConnection::new(Arc::new(config), server_name)?;
        let mut tls = StreamOwned::new(conn, tcp);
        // Finish the handshake here, so certificate problems are reported as such.
        finish_handshake(&mut tls).map_err(|e| handshake_error(e, &self.proxy))?;
        Ok(tls)
    }
}

/// A TCP connection to `proxy`: every address it resolves to, in order (`localhost` may resolve
/// to `::1` first while the engine listens on 127.0.0.1 only).
fn connect(proxy: &str) -> anyhow::Result<TcpStream> {
    let addrs = proxy
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the proxy {proxy}"))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => anyhow!(e).context(format!("cannot reach the proxy at {proxy}")),
        None => anyhow!("the proxy {proxy} resolves to no address"),
    })
}

/// Verifies the engine's certificate (chain to the cluster's host CA, validity) for the
/// proxy's name, whatever name the connection's SNI carries.
#[derive(Debug)]
struct AsProxyName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for AsProxyName {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn finish_handshake(tls: &mut Session) -> std::io::Result<()> {
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(())
}

fn handshake_error(e: std::io::Error, proxy: &str) -> anyhow::Error {
    let text = e.to_string();
    if text.contains("CertificateExpired") || text.contains("certificate expired") {
        anyhow!("the proxy refused your certificate as expired: run `jaunt login` again")
    } else if text.contains("BadCertificate") || text.contains("UnknownCA") {
        anyhow!("the proxy refused your certificate ({text}): run `jaunt login` again")
    } else {
        anyhow!("TLS to the proxy at {proxy} failed: {text}")
    }
}

/// Carries bytes between `session` and this process's stdin/stdout until both directions end
/// (the `ProxyCommand` of `jaunt ssh`). One thread, `poll(2)` on both file descriptors: rustls'
/// connection is not shared between threads.
pub fn pipe_stdio(session: Session) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    pipe_fds(
        session,
        &mut stdin.lock(),
        &mut stdout.lock(),
        libc::STDIN_FILENO,
    )
}

/// Writes what `session` sends to stdout and sends nothing (not even an end of input): the
/// read-only stream of `jaunt join`.
pub fn pipe_to_stdout(session: Session) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    pipe_fds(session, &mut std::io::empty(), &mut stdout.lock(), -1)
}

/// Carries bytes between `session` and a local TCP connection (the local listeners of
/// `jaunt proxy tcp|db`).
pub fn pipe_tcp(session: Session, local: TcpStream) -> anyhow::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = local.as_raw_fd();
    let mut reader = local.try_clone()?;
    let mut writer = local;
    let result = pipe_fds(session, &mut reader, &mut writer, fd);
    let _ = writer.shutdown(std::net::Shutdown::Both);
    result
}

fn pipe_fds(
    mut session: Session,
    input: &mut dyn Read,
    output: &mut dyn Write,
    input_fd: i32,
) -> anyhow::Result<()> {
    use std::os::unix::io::AsRawFd;
    let sock_fd = session.sock.as_raw_fd();
    // A negative `input_fd`: nothing to send (`jaunt join` watches read-only).
    let mut input_open = input_fd >= 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Deliver what rustls already holds decrypted before sleeping in poll(2): bytes that
        // arrived with the dial response (or in one socket read with earlier records) are in
        // no socket any more, and the far end may wait for our answer to them.
        if !deliver_plaintext(&mut session, output, &mut buf)? {
            break;
        }
        // Flush anything rustls has buffered before sleeping.
        while session.conn.wants_write() {
            session.conn.write_tls(&mut session.sock)?;
        }
        let mut fds = [
            libc::pollfd {
                fd: sock_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if input_open { input_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let rc = poll(&mut fds);
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err.into());
        }
        if fds[0].revents != 0 {
            let eof = match session.conn.read_tls(&mut session.sock) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(e) => return Err(e.into()),
            };
            session
                .conn
                .process_new_packets()
                .map_err(|e| anyhow!("TLS error from the proxy: {e}"))?;
            if eof {
                deliver_plaintext(&mut session, output, &mut buf)?;
                break;
            }
        }
        if input_open && fds[1].revents != 0 {
            let n = input.read(&mut buf)?;
            if n == 0 {
                input_open = false;
                // Half-close: tell the far end we are done sending, keep reading.
                session.conn.send_close_notify();
            } else {
                session.conn.writer().write_all(&buf[..n])?;
            }
        }
    }
    Ok(())
}

/// Writes every byte rustls has decrypted to `output`; `false` once the proxy has ended its
/// side (close_notify, or the connection closed).
fn deliver_plaintext(
    session: &mut Session,
    output: &mut dyn Write,
    buf: &mut [u8],
) -> anyhow::Result<bool> {
    let mut open = true;
    let mut wrote = false;
    loop {
        match session.conn.reader().read(buf) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => {
                output.write_all(&buf[..n])?;
                wrote = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                open = false;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if wrote {
        output.flush()?;
    }
    Ok(open)
}

/// `poll(2)` without a timeout. The only unsafe call in the crate's client path, kept tiny.
#[allow(unsafe_code)]
fn poll(fds: &mut [libc::pollfd; 2]) -> i32 {
    // SAFETY: `fds` is a valid, exclusively borrowed array of two pollfd structs for the call.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) }
}

/// A local listener that dials `request` for every connection it accepts (one thread each).
pub fn serve_local(
    listener: TcpListener,
    dialer: Arc<Dialer>,
    request: DialRequest,
) -> anyhow::Result<()> {
    for conn in listener.incoming() {
        let local = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("jaunt: accept failed: {e}");
                continue;
            }
        };
        let dialer = dialer.clone();
        let request = request.clone();
        std::thread::spawn(move || match dialer.dial(&request) {
            Ok(session) => {
                if let Err(e) = pipe_tcp(session, local) {
                    eprintln!("jaunt: connection to {} ended: {e:#}", request.target);
                }
            }
            Err(e) => {
                eprintln!("jaunt: cannot connect to {}: {e:#}", request.target);
                if request.kind == DialKind::App {
                    // The local client speaks HTTP: tell it why in its own terms.
                    let body = format!("jaunt: cannot connect to app {}: {e:#}\n", request.target);
                    let mut local = local;
                    let _ = write!(
                        local,
                        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ServerConfig, ServerConnection};

    /// A stand-in engine on 127.0.0.1:0 (TLS, certificate for `localhost`) and a [`Dialer`]
    /// that trusts it.
    fn engine_and_dialer() -> (TcpListener, Arc<ServerConfig>, Dialer) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let client_cert = CertificateParams::new(vec!["alice".to_string()])
            .unwrap()
            .signed_by(&client_key, &issuer)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dialer = Dialer {
            proxy: format!("localhost:{port}"),
            fallbacks: Vec::new(),
            server_name: ServerName::try_from("localhost").unwrap(),
            roots: Arc::new(roots),
            chain: vec![CertificateDer::from(client_cert.der().to_vec())],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.serialize_der())),
        };
        (listener, Arc::new(server), dialer)
    }

    fn ssh_request() -> DialRequest {
        DialRequest {
            join: None,
            kind: DialKind::Ssh,
            target: "node1".into(),
            login: Some("root".into()),
            db_user: None,
            db_name: None,
        }
    }

    const BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n";

    /// The engine's answer and the node's first bytes in one TLS record (one read for the
    /// client), as happens under load: the session starts with those bytes, and they reach the
    /// local side although the node then waits for our answer (no further socket data).
    #[test]
    fn a_refused_engine_sends_the_dial_to_the_next_one_learned_at_login() {
        let (listener, server, mut dialer) = engine_and_dialer();
        // The engine logged in through drained: its port is closed.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let live = std::mem::replace(&mut dialer.proxy, format!("localhost:{closed_port}"));
        let err = dialer.dial(&ssh_request()).expect_err("no engine to reach");
        assert!(
            format!("{err:#}").contains("cannot reach the proxy"),
            "{err:#}"
        );
        dialer.fallbacks = vec![live];
        let engine = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = ServerConnection::new(server).unwrap();
            let mut tls = StreamOwned::new(conn, tcp);
            let mut prefix = [0u8; 2];
            tls.read_exact(&mut prefix).unwrap();
            let mut body = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
            tls.read_exact(&mut body).unwrap();
            tls.write_all(&DialResponse::ok().encode()).unwrap();
            tls.flush().unwrap();
        });
        dialer
            .dial(&ssh_request())
            .expect("the dial goes to the other engine");
        engine.join().unwrap();
    }

    #[test]
    fn bytes_after_the_dial_response_belong_to_the_session() {
        let (listener, server, dialer) = engine_and_dialer();
        let engine = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = ServerConnection::new(server).unwrap();
            let mut tls = StreamOwned::new(conn, tcp);
            let mut prefix = [0u8; 2];
            tls.read_exact(&mut prefix).unwrap();
            let mut body = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
            tls.read_exact(&mut body).unwrap();
            let mut first = DialResponse::ok().encode();
            first.extend_from_slice(BANNER);
            tls.write_all(&first).unwrap();
            tls.flush().unwrap();
            // The node speaks again only when answered.
            let mut answer = [0u8; 5];
            tls.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"hello");
            tls.write_all(b"bye").unwrap();
            tls.conn.send_close_notify();
            tls.flush().unwrap();
        });
        let session = dialer.dial(&ssh_request()).expect("the dial succeeds");
        let local_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut user = TcpStream::connect(local_listener.local_addr().unwrap()).unwrap();
        let (local, _) = local_listener.accept().unwrap();
        let pipe = std::thread::spawn(move || pipe_tcp(session, local));
        // A deadline, not an ordering sleep: without the banner the test fails instead of
        // hanging.
        user.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut banner = vec![0u8; BANNER.len()];
        user.read_exact(&mut banner)
            .expect("the node's banner reaches the user");
        assert_eq!(banner, BANNER);
        user.write_all(b"hello").unwrap();
        let mut rest = Vec::new();
        user.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"bye");
        engine.join().unwrap();
        pipe.join().unwrap().unwrap();
    }

    /// A refusal is reported with the engine's reason; a frame that is no dial response is
    /// reported as such, not waited for.
    #[test]
    fn refusals_and_gibberish_are_errors() {
        for (answer, expect) in [
            (
                DialResponse::error("access denied to node \"node1\"").encode(),
                "access denied",
            ),
            (b"\xff\xffSSH-2.0-x".to_vec(), "gibberish"),
            (vec![0, 9, b'{'], "closed the connection"),
        ] {
            let (listener, server, dialer) = engine_and_dialer();
            let engine = std::thread::spawn(move || {
                let (tcp, _) = listener.accept().unwrap();
                let mut tls = StreamOwned::new(ServerConnection::new(server).unwrap(), tcp);
                let mut prefix = [0u8; 2];
                tls.read_exact(&mut prefix).unwrap();
                let mut body = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
                tls.read_exact(&mut body).unwrap();
                tls.write_all(&answer).unwrap();
                tls.conn.send_close_notify();
                tls.flush().unwrap();
            });
            let Err(err) = dialer.dial(&ssh_request()) else {
                panic!("the dial succeeds");
            };
            assert!(format!("{err:#}").contains(expect), "{err:#}");
            engine.join().unwrap();
        }
    }
}
