//! The user's side of resource access: dial a node, database, TCP or web app through the engine with
//! the logged-in identity, then carry bytes. Plain threads and blocking rustls (the client is not
//! the fast path); one TLS connection per session, ALPN `jaunt-ssh`, `jaunt-postgres` or
//! `jaunt-tcp`, client certificate from `$JAUNT_HOME`.
//!
//! After the handshake the client sends one [`DialRequest`] and reads one [`DialResponse`]; on
//! `ok` the connection carries the user's protocol (SSH, PostgreSQL, TCP) end to end.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use jaunt_config::identity::unix_now;
use jaunt_engine::server::dial::{DialKind, DialRequest, DialResponse};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::profile::{Profile, ProfileInfo};

/// How long to wait for the engine to answer a dial.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest dial response read before giving up on a peer that is not a Jaunt engine.
const MAX_RESPONSE_BYTES: usize = 4096;

/// A TLS stream to the engine, connected to a target.
pub type Session = StreamOwned<ClientConnection, TcpStream>;

/// Dials targets as the logged-in user.
pub struct Dialer {
    proxy: String,
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
        let host = crate::daemon::host_part(&info.proxy).to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| anyhow!("{host} is not a valid server name"))?;
        Ok((
            Dialer {
                proxy: info.proxy.clone(),
                server_name,
                roots: Arc::new(roots),
                chain,
                key,
            },
            info,
        ))
    }

    fn config(&self, alpn: &str) -> anyhow::Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
        Ok(Arc::new(config))
    }

    /// Connects to the engine and dials `request`; returns the connected session, or the
    /// engine's refusal as an error a person can act on.
    pub fn dial(&self, request: &DialRequest) -> anyhow::Result<Session> {
        let alpn = match request.kind {
            DialKind::Ssh => "jaunt-ssh",
            DialKind::Db => "jaunt-postgres",
            DialKind::Tcp => "jaunt-tcp",
            DialKind::App => return self.dial_app(&request.target),
        };
        let tcp = self.connect_proxy()?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(DIAL_TIMEOUT))?;
        let conn = ClientConnection::new(self.config(alpn)?, self.server_name.clone())?;
        let mut tls = StreamOwned::new(conn, tcp);
        tls.write_all(&request.encode())
            .map_err(|e| handshake_error(e, &self.proxy))?;
        tls.flush()?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        let response = loop {
            if let Some((resp, used)) = DialResponse::parse(&buf)
                .map_err(|e| anyhow!("the proxy answered gibberish: {e}"))?
            {
                if used != buf.len() {
                    bail!("the proxy sent data before the dial was answered");
                }
                break resp;
            }
            if buf.len() > MAX_RESPONSE_BYTES {
                bail!(
                    "the proxy's answer is too long: is {} a Jaunt proxy?",
                    self.proxy
                );
            }
            let n = tls
                .read(&mut chunk)
                .map_err(|e| handshake_error(e, &self.proxy))?;
            if n == 0 {
                bail!("the proxy closed the connection before answering the dial");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
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

impl Dialer {
    /// A TCP connection to the proxy: every address it resolves to, in order (`localhost` may
    /// resolve to `::1` first while the engine listens on 127.0.0.1 only).
    fn connect_proxy(&self) -> anyhow::Result<TcpStream> {
        let addrs = self
            .proxy
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve the proxy {}", self.proxy))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => anyhow!(e).context(format!("cannot reach the proxy at {}", self.proxy)),
            None => anyhow!("the proxy {} resolves to no address", self.proxy),
        })
    }

    /// The TLS name of web app `name`: `<name>.<proxy host>` (what the engine routes on and
    /// its certificate covers).
    pub fn app_server_name(&self, name: &str) -> anyhow::Result<ServerName<'static>> {
        let host = match &self.server_name {
            ServerName::DnsName(dns) => dns.as_ref().to_string(),
            _ => bail!(
                "web apps are reached by DNS name (<app>.<proxy host>), but you logged in to the \
                 proxy by IP address ({}): run `jaunt login --proxy NAME:PORT` with the proxy's \
                 DNS name (e.g. localhost)",
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
        let mut config = ClientConfig::clone(&*self.config("http/1.1")?);
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
    let mut input_open = true;
    let mut remote_open = true;
    let mut buf = vec![0u8; 64 * 1024];
    while remote_open {
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
            // Read what arrived and everything rustls already decrypted.
            match session.conn.read_tls(&mut session.sock) {
                Ok(0) => remote_open = false,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            session
                .conn
                .process_new_packets()
                .map_err(|e| anyhow!("TLS error from the proxy: {e}"))?;
            loop {
                match session.conn.reader().read(&mut buf) {
                    Ok(0) => {
                        remote_open = false;
                        break;
                    }
                    Ok(n) => {
                        output.write_all(&buf[..n])?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        remote_open = false;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            output.flush()?;
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
