//! The load generator's client side: plain TCP to the backend (the direct baseline), TLS to a
//! peer proxy (nginx, HAProxy), TLS + a dial request to Jaunt's engine (the user's path to a TCP
//! app), and Jaunt's web ping. Blocking rustls on plain threads, like `jaunt_control::access`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use jaunt_config::wire::dial::{DialKind, DialRequest, DialResponse};
use jaunt_control::profile::Profile;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};

/// A connection to a backend through some path.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    /// True when TLS resumed a session.
    pub fn resumed(&self) -> bool {
        match self {
            Conn::Plain(_) => false,
            Conn::Tls(s) => s.conn.handshake_kind() == Some(HandshakeKind::Resumed),
        }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }

    /// Sends close_notify (TLS) and closes.
    pub fn close(mut self) {
        if let Conn::Tls(s) = &mut self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => match s.read(buf) {
                // A peer that closes without close_notify: EOF for our purposes.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Client TLS configurations for one endpoint: full handshakes only, and with resumption.
#[derive(Clone)]
pub struct TlsPair {
    pub full: Arc<ClientConfig>,
    pub resume: Arc<ClientConfig>,
}

impl TlsPair {
    pub fn new(
        roots: &[CertificateDer<'static>],
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        alpn: &[u8],
    ) -> anyhow::Result<TlsPair> {
        let make = |resume: bool| -> anyhow::Result<Arc<ClientConfig>> {
            let mut store = RootCertStore::empty();
            for r in roots {
                store.add(r.clone())?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(store);
            let mut config = match &client {
                Some((chain, key)) => {
                    builder.with_client_auth_cert(chain.clone(), key.clone_key())?
                }
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![alpn.to_vec()];
            if !resume {
                config.resumption = Resumption::disabled();
            }
            Ok(Arc::new(config))
        };
        Ok(TlsPair {
            full: make(false)?,
            resume: make(true)?,
        })
    }

    pub fn get(&self, resume: bool) -> Arc<ClientConfig> {
        if resume {
            self.resume.clone()
        } else {
            self.full.clone()
        }
    }
}

/// Where a connection goes.
#[derive(Clone)]
pub enum Target {
    /// Plain TCP straight to the backend.
    Direct { addr: SocketAddr },
    /// TLS to a proxy that forwards to the backend (nginx, HAProxy).
    Tls {
        addr: SocketAddr,
        name: ServerName<'static>,
        tls: TlsPair,
    },
    /// TLS (user certificate, ALPN `jaunt-tcp`) to Jaunt's engine, then a dial of `app`.
    Jaunt {
        addr: SocketAddr,
        name: ServerName<'static>,
        tls: TlsPair,
        app: String,
    },
}

fn tcp_connect(addr: &SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect_timeout(addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(tcp)
}

fn tls_connect(
    addr: &SocketAddr,
    name: &ServerName<'static>,
    config: Arc<ClientConfig>,
) -> anyhow::Result<StreamOwned<ClientConnection, TcpStream>> {
    let tcp = tcp_connect(addr)?;
    let conn = ClientConnection::new(config, name.clone())?;
    let mut tls = StreamOwned::new(conn, tcp);
    // Drive the handshake to completion now, so the caller's first write is application data.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .with_context(|| format!("TLS handshake with {addr}"))?;
    }
    Ok(tls)
}

impl Target {
    /// Opens a connection that reaches the backend (the backend's command byte not yet sent).
    pub fn connect(&self, resume: bool) -> anyhow::Result<Conn> {
        match self {
            Target::Direct { addr } => Ok(Conn::Plain(tcp_connect(addr)?)),
            Target::Tls { addr, name, tls } => Ok(Conn::Tls(Box::new(tls_connect(
                addr,
                name,
                tls.get(resume),
            )?))),
            Target::Jaunt {
                addr,
                name,
                tls,
                app,
            } => {
                let mut s = tls_connect(addr, name, tls.get(resume))?;
                let request = DialRequest {
                    join: None,
                    kind: DialKind::Tcp,
                    target: app.clone(),
                    login: None,
                    db_user: None,
                    db_name: None,
                };
                s.write_all(&request.encode())?;
                s.flush()?;
                // Exactly the response's frame: the target's first bytes may follow it in the
                // same read, and they belong to the stream.
                let mut frame = vec![0u8; 2];
                s.read_exact(&mut frame)
                    .context("reading the dial response")?;
                let len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
                if len == 0 || len > jaunt_config::wire::dial::MAX_DIAL_RESPONSE_BYTES {
                    bail!("bad dial response: frame length {len}");
                }
                frame.resize(2 + len, 0);
                s.read_exact(&mut frame[2..])
                    .context("reading the dial response")?;
                let response = match DialResponse::parse(&frame)
                    .map_err(|e| anyhow!("bad dial response: {e}"))?
                {
                    Some((response, _)) => response,
                    None => bail!("bad dial response: short frame"),
                };
                if !response.ok {
                    bail!(
                        "dial refused: {}",
                        response.error.unwrap_or_else(|| "no reason".into())
                    );
                }
                Ok(Conn::Tls(Box::new(s)))
            }
        }
    }
}

/// A user's view of a Jaunt cluster, from a logged-in `$JAUNT_HOME`.
#[derive(Clone)]
pub struct JauntUser {
    pub addr: SocketAddr,
    pub name: ServerName<'static>,
    pub tcp: TlsPair,
    pub web: TlsPair,
}

impl JauntUser {
    pub fn from_home(home: &Path) -> anyhow::Result<JauntUser> {
        let profile = Profile {
            dir: home.to_path_buf(),
        };
        let info = profile
            .load()?
            .ok_or_else(|| anyhow!("{} holds no login", home.display()))?;
        let roots = profile.host_ca()?;
        let identity = profile.tls_identity(&info.user)?;
        let host = info
            .proxy
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&info.proxy)
            .trim_matches(['[', ']'])
            .to_string();
        let name = ServerName::try_from(host.clone())
            .map_err(|_| anyhow!("{host} is not a server name"))?;
        let addr = info
            .proxy
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to nothing", info.proxy))?;
        Ok(JauntUser {
            addr,
            name,
            tcp: TlsPair::new(&roots, Some(identity), b"jaunt-tcp")?,
            web: TlsPair::new(&roots, None, b"http/1.1")?,
        })
    }

    pub fn target(&self, app: &str) -> Target {
        Target::Jaunt {
            addr: self.addr,
            name: self.name.clone(),
            tls: self.tcp.clone(),
            app: app.to_string(),
        }
    }

    /// One TLS connection to the web route with `GET /webapi/ping`; returns whether it resumed.
    pub fn ping(&self, resume: bool) -> anyhow::Result<bool> {
        let mut s = tls_connect(&self.addr, &self.name, self.web.get(resume))?;
        s.write_all(b"GET /webapi/ping HTTP/1.1\r\nHost: loadtest\r\nConnection: close\r\n\r\n")?;
        s.flush()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        if !out.starts_with(b"HTTP/1.1 200") {
            bail!(
                "ping answered {:?}",
                String::from_utf8_lossy(&out[..out.len().min(64)])
            );
        }
        Ok(s.conn.handshake_kind() == Some(HandshakeKind::Resumed))
    }
}
