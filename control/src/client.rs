//! The control API client: HTTP/1.1 + JSON over TLS, one connection per request, blocking.
//!
//! Used by the `jaunt` CLI (login, admin verbs) and by agents and engines joining a cluster. It
//! offers ALPN `jaunt-control`, so it works against the control port directly and through the
//! engine's public port, which passes such connections through to control.
//!
//! How the server is trusted ([`Trust`]):
//! - [`Trust::Pin`]: first contact (`jaunt login --ca-pin sha256:…`, a join token's pin). The
//!   server's chain must contain a certificate whose SubjectPublicKeyInfo hashes to the pin; the
//!   leaf is then verified against that certificate as the only root (name and validity
//!   checked). The matched CA is kept ([`Client::pinned_ca`]) so the caller can store it and use
//!   [`Trust::Roots`] from then on.
//! - [`Trust::Roots`]: ordinary WebPKI verification against stored CA certificates.
//! - [`Trust::Insecure`]: accepts any server certificate (`--insecure`); the verifier's check
//!   is named `DangerousAcceptAnyServerCert`, as rustls names such things.
//!
//! Pin and insecure trust share one verifier (`ServerVerifier`, with the handshake signature
//! checks once); roots use rustls's WebPKI verifier.
//!
//! What does not live here: the request and response types ([`jaunt_config::api`]), the server
//! ([`crate::http`]).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, OtherError,
    RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::{TlsIo, ALPN_CONTROL};

/// Time to establish the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the server may stay silent: during the handshake, and between bytes of the answer.
/// Handlers that hash passwords or sign certificates answer well within it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a response's status line and headers.
pub const MAX_RESPONSE_HEADER_BYTES: usize = 64 * 1024;
/// Bound on a response body: the largest answers (audit event pages, resource lists) stay far
/// below it; a misbehaving server must not exhaust the client's memory.
pub const MAX_RESPONSE_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Headers per response.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Bound on the goodbye (close_notify) after an answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How the client decides to trust the server's certificate.
#[derive(Clone)]
pub enum Trust {
    /// `sha256:<hex>` of a CA certificate's SubjectPublicKeyInfo DER (see [`spki_pin`]).
    Pin(String),
    /// CA certificates to verify the server's chain against.
    Roots(Vec<CertificateDer<'static>>),
    /// Accept any server certificate. Dangerous: anyone on the path can impersonate the server.
    Insecure,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::Pin(pin) => f.debug_tuple("Pin").field(pin).finish(),
            Trust::Roots(roots) => write!(f, "Roots({} certificates)", roots.len()),
            Trust::Insecure => f.write_str("Insecure"),
        }
    }
}

/// Errors of the client, worded for the person running the command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid proxy address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("invalid CA pin {pin:?}: expected sha256:<64 hex digits>")]
    InvalidPin { pin: String },
    #[error("unusable certificate or key: {reason}")]
    Certificate { reason: String },
    // The I/O errors are in the message and not also `source()`s: `{e:#}` (anyhow's chain)
    // would print their text twice ("Connection refused (os error 111): Connection refused
    // (os error 111)").
    #[error("cannot reach the proxy at {addr}: {cause}")]
    Unreachable { addr: String, cause: io::Error },
    #[error("timed out {doing} (the proxy at {addr} was silent for {}s)", after.as_secs())]
    Timeout {
        addr: String,
        doing: &'static str,
        after: Duration,
    },
    #[error("the server's CA does not match --ca-pin (got {got})")]
    PinMismatch { got: String },
    #[error("TLS with the proxy at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("connection to the proxy at {addr} failed: {cause}")]
    Io { addr: String, cause: io::Error },
    #[error("bad response from the proxy at {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("cannot decode the response from the proxy at {addr}: {cause}")]
    Decode {
        addr: String,
        cause: serde_json::Error,
    },
    #[error("cannot encode the request: {0}")]
    Encode(serde_json::Error),
}

/// A control API client for one server address. Cloning shares the TLS configuration.
#[derive(Clone)]
pub struct Client {
    addr: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    pin: Option<Arc<ServerVerifier>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the server at `addr` (`host:port`, `[v6]:port`). `identity` is a client
    /// certificate chain (leaf first) and its key, for endpoints that need one.
    pub fn new(
        addr: &str,
        trust: Trust,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Client, ClientError> {
        let (host, port, server_name) = server_address(addr)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ClientError::Certificate {
                reason: e.to_string(),
            })?;
        let mut pin = None;
        let builder = match trust {
            Trust::Pin(raw) => {
                let verifier = Arc::new(ServerVerifier {
                    check: ServerCheck::Pin(PinCheck {
                        pin: normalize_pin(&raw)?,
                        matched: Mutex::new(None),
                    }),
                    provider: Arc::clone(&provider),
                });
                pin = Some(Arc::clone(&verifier));
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
            }
            Trust::Roots(certs) => {
                let mut roots = RootCertStore::empty();
                for cert in certs {
                    roots.add(cert).map_err(|e| ClientError::Certificate {
                        reason: format!("a trusted CA certificate is not usable: {e}"),
                    })?;
                }
                let verifier = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| ClientError::Certificate {
                    reason: format!("no usable trusted CA: {e}"),
                })?;
                builder.with_webpki_verifier(verifier)
            }
            Trust::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                    check: ServerCheck::DangerousAcceptAnyServerCert,
                    provider,
                })),
        };
        let mut config =
            match identity {
                Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                    ClientError::Certificate {
                        reason: format!("the client certificate is not usable: {e}"),
                    }
                })?,
                None => builder.with_no_client_auth(),
            };
        config.alpn_protocols = vec![ALPN_CONTROL.as_bytes().to_vec()];

        Ok(Client {
            addr: addr.to_owned(),
            host,
            port,
            server_name,
            config: Arc::new(config),
            pin,
        })
    }

    /// A client of another server (`host:port`) with this one's TLS configuration (trust and
    /// client identity), built once: e.g. the agent asking another engine of its cluster.
    pub fn to(&self, addr: &str) -> Result<Client, ClientError> {
        let (host, port, server_name) = server_address(addr)?;
        Ok(Client {
            addr: addr.to_owned(),
            host,
            port,
            server_name,
            config: Arc::clone(&self.config),
            pin: self.pin.clone(),
        })
    }

    /// The server address as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// With [`Trust::Pin`], the CA certificate that matched the pin in the last successful
    /// handshake: store it and use [`Trust::Roots`] next time.
    pub fn pinned_ca(&self) -> Option<CertificateDer<'static>> {
        self.pin.as_ref().and_then(|pin| pin.matched())
    }

    /// One request on a fresh connection. Returns the status and body whatever the status.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let sock = self.connect()?;
        let conn = ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())
            .map_err(|e| ClientError::Tls {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        let mut io = TlsIo { sock, conn };
        io.handshake(Instant::now() + READ_TIMEOUT)
            .map_err(|e| self.error(e, "waiting for the TLS handshake"))?;

        let request = encode_request(method, path, &self.addr, body);
        let sent = io.write_all_plain(&request, Instant::now() + READ_TIMEOUT);
        let response = match sent {
            Ok(()) => read_response(&mut io, method == "HEAD"),
            // The server may have answered early (413, 431) and stopped reading: its answer
            // says more than our broken pipe.
            Err(e) if is_disconnect(&e) => read_response(&mut io, method == "HEAD").map_err(|_| e),
            Err(e) => Err(e),
        };
        let response = response.map_err(|e| match e.kind() {
            io::ErrorKind::InvalidInput => ClientError::Protocol {
                addr: self.addr.clone(),
                reason: e.to_string(),
            },
            _ => self.error(e, "waiting for the response"),
        })?;
        io.close(Instant::now() + CLOSE_TIMEOUT);
        Ok(response)
    }

    /// `GET path`, decoding a JSON answer.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.request("GET", path, None)?;
        self.decode(status, &body)
    }

    /// `POST path` with a JSON body, decoding a JSON answer.
    pub fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        let (status, answer) = self.request("POST", path, Some(&body))?;
        self.decode(status, &answer)
    }

    /// `PUT path` with a JSON body, decoding a JSON answer.
    pub fn put_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        let (status, answer) = self.request("PUT", path, Some(&body))?;
        self.decode(status, &answer)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        let (status, body) = self.request("DELETE", path, None)?;
        check_status(status, &body)
    }

    fn decode<T: DeserializeOwned>(&self, status: u16, body: &[u8]) -> Result<T, ClientError> {
        check_status(status, body)?;
        // An empty answer (204) decodes as `null`, which `()` and `Option` accept.
        let body = if body.is_empty() {
            b"null".as_slice()
        } else {
            body
        };
        serde_json::from_slice(body).map_err(|cause| ClientError::Decode {
            addr: self.addr.clone(),
            cause,
        })
    }

    fn connect(&self) -> Result<TcpStream, ClientError> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|cause| ClientError::Unreachable {
                addr: self.addr.clone(),
                cause,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
        for sa in addrs {
            match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
                Ok(sock) => {
                    let _ = sock.set_nodelay(true);
                    return Ok(sock);
                }
                Err(e) => last = e,
            }
        }
        if matches!(
            last.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ) {
            return Err(ClientError::Timeout {
                addr: self.addr.clone(),
                doing: "connecting",
                after: CONNECT_TIMEOUT,
            });
        }
        Err(ClientError::Unreachable {
            addr: self.addr.clone(),
            cause: last,
        })
    }

    /// Turns an I/O error of the TLS session into something a person can act on.
    fn error(&self, e: io::Error, doing: &'static str) -> ClientError {
        let addr = self.addr.clone();
        if let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) =
                tls
            {
                if let Some(mismatch) = other.downcast_ref::<PinMismatch>() {
                    return ClientError::PinMismatch {
                        got: mismatch.got.clone(),
                    };
                }
            }
            return ClientError::Tls {
                addr,
                reason: describe_tls_error(tls),
            };
        }
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ClientError::Timeout {
                addr,
                doing,
                after: READ_TIMEOUT,
            },
            _ if is_disconnect(&e) && doing == "waiting for the TLS handshake" => {
                ClientError::Tls {
                    reason: format!(
                    "the proxy closed the connection during the handshake: it may be busy (try \
                     again), or {addr} may not be a Jaunt control endpoint"
                ),
                    addr,
                }
            }
            _ => ClientError::Io { addr, cause: e },
        }
    }
}

/// The host of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_part(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The host, port and TLS server name of `addr` (`host:port`, `[v6]:port`).
fn server_address(addr: &str) -> Result<(String, u16, ServerName<'static>), ClientError> {
    let (host, port) = split_host_port(addr)?;
    let server_name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone()).map_err(|e| ClientError::InvalidAddress {
            addr: addr.to_owned(),
            reason: format!("{host:?} is not a valid host name: {e}"),
        })?,
    };
    Ok((host, port, server_name))
}

/// `sha256:<hex>` of the SubjectPublicKeyInfo of a DER certificate: the CA pin users pass as
/// `--ca-pin` and join tokens carry. Pinning the key rather than the certificate survives a CA
/// certificate being re-issued for the same key.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, ClientError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| ClientError::Certificate {
            reason: format!("cannot parse the certificate: {e}"),
        })?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!(
        "sha256:{}",
        hex::encode(digest::digest(&digest::SHA256, spki))
    ))
}

// ---------------------------------------------------------------------------------------------
// Certificate verifiers

/// The client's own server certificate verifier, for the two trusts WebPKI's verifier does not
/// cover ([`Trust::Pin`], [`Trust::Insecure`]): what it checks of the certificate differs, the
/// handshake signature checks are the same.
#[derive(Debug)]
struct ServerVerifier {
    check: ServerCheck,
    provider: Arc<CryptoProvider>,
}

/// What [`ServerVerifier`] checks of the server's certificate.
#[derive(Debug)]
enum ServerCheck {
    /// The server against the CA in its own chain whose key matches the pin.
    Pin(PinCheck),
    /// Nothing: any server certificate ([`Trust::Insecure`]). Handshake signatures are still
    /// checked, which proves only that the server holds the key of the certificate it sent.
    DangerousAcceptAnyServerCert,
}

/// [`ServerCheck::Pin`]'s pin and what it matched.
#[derive(Debug)]
struct PinCheck {
    /// Normalized `sha256:<lowercase hex>`.
    pin: String,
    /// The CA that matched, once a handshake has.
    matched: Mutex<Option<CertificateDer<'static>>>,
}

/// The chain holds no certificate with the pinned key. Travels inside the rustls error so that
/// the client can tell it apart from other certificate failures.
#[derive(Debug, thiserror::Error)]
#[error("the server's CA does not match --ca-pin (got {got})")]
struct PinMismatch {
    got: String,
}

impl ServerVerifier {
    /// The pinned CA that matched, for a pin verifier after a handshake.
    fn matched(&self) -> Option<CertificateDer<'static>> {
        match &self.check {
            ServerCheck::Pin(check) => check
                .matched
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            ServerCheck::DangerousAcceptAnyServerCert => None,
        }
    }
}

impl PinCheck {
    /// Finds the pinned CA in the chain, then verifies the chain against it as the only root.
    fn verify(
        &self,
        provider: &Arc<CryptoProvider>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let matched = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|cert| spki_pin(cert).is_ok_and(|got| got == self.pin));
        let Some(ca) = matched else {
            // Show what the server's CA hashes to: the certificates after the leaf, or the leaf
            // itself when the server sent no chain.
            let shown = if intermediates.is_empty() {
                std::slice::from_ref(end_entity)
            } else {
                intermediates
            };
            let got = shown
                .iter()
                .map(|cert| {
                    spki_pin(cert).unwrap_or_else(|_| "<unparsable certificate>".to_owned())
                })
                .collect::<Vec<_>>()
                .join(", ");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch { got })),
            )));
        };
        let ca = ca.clone().into_owned();
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                .build()
                .map_err(|e| rustls::Error::General(format!("cannot use the pinned CA: {e}")))?;
        let verified = verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        *self
            .matched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(ca);
        Ok(verified)
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            ServerCheck::Pin(check) => check.verify(
                &self.provider,
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            ServerCheck::DangerousAcceptAnyServerCert => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// `host:port` or `[v6]:port` → (host without brackets, port).
fn split_host_port(addr: &str) -> Result<(String, u16), ClientError> {
    let invalid = |reason: &str| ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected host:port"))?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .ok_or_else(|| invalid("unbalanced [ in the address"))?,
        None if host.contains(':') => {
            return Err(invalid("put IPv6 addresses in brackets: [::1]:3025"))
        }
        None => host,
    };
    if host.is_empty() {
        return Err(invalid("the host is empty"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid("the port is not a number from 0 to 65535"))?;
    Ok((host.to_owned(), port))
}

/// `sha256:<hex>` in any case → lowercase, checked.
fn normalize_pin(raw: &str) -> Result<String, ClientError> {
    let invalid = || ClientError::InvalidPin {
        pin: raw.to_owned(),
    };
    let trimmed = raw.trim();
    let (scheme, hex_part) = trimmed.split_once(':').ok_or_else(invalid)?;
    if !scheme.eq_ignore_ascii_case("sha256") {
        return Err(invalid());
    }
    let bytes = hex::decode(hex_part).map_err(|_| invalid())?;
    if bytes.len() != digest::SHA256_OUTPUT_LEN {
        return Err(invalid());
    }
    Ok(format!("sha256:{}", hex::encode(bytes)))
}

fn encode_request(method: &str, path: &str, host: &str, body: Option<&[u8]>) -> Vec<u8> {
    let body = body.unwrap_or_default();
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: jaunt/{}\r\nAccept: application/json\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes();
    if !body.is_empty() {
        out.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads one response. Malformed responses are `InvalidInput` errors.
fn read_response<C, D>(io: &mut TlsIo<C>, head_request: bool) -> io::Result<(u16, Vec<u8>)>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let malformed = |reason: String| io::Error::new(io::ErrorKind::InvalidInput, reason);
    let mut buf = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response
            .parse(&buf)
            .map_err(|e| malformed(format!("malformed response head: {e}")))?;
        let httparse::Status::Complete(head_len) = parsed else {
            if buf.len() >= MAX_RESPONSE_HEADER_BYTES {
                return Err(malformed(format!(
                    "response head larger than {MAX_RESPONSE_HEADER_BYTES} bytes"
                )));
            }
            let room = MAX_RESPONSE_HEADER_BYTES - buf.len();
            if io.read_plain(&mut buf, room, Instant::now() + READ_TIMEOUT)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the proxy closed the connection without answering",
                ));
            }
            continue;
        };
        let status = response
            .code
            .ok_or_else(|| malformed("no status code".to_owned()))?;
        if (100..200).contains(&status) {
            buf.drain(..head_len);
            continue; // 100 Continue and friends: the real answer follows
        }
        let mut content_length = None;
        for header in response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            content_length =
                Some(value.ok_or_else(|| malformed("invalid Content-Length".to_owned()))?);
        }
        buf.drain(..head_len);
        if head_request || status == 204 || status == 304 {
            return Ok((status, Vec::new()));
        }
        match content_length {
            Some(len) if len > MAX_RESPONSE_BODY_BYTES => {
                return Err(malformed(format!(
                    "response body larger than {MAX_RESPONSE_BODY_BYTES} bytes"
                )));
            }
            Some(len) => {
                while buf.len() < len {
                    let room = len - buf.len();
                    if io.read_plain(&mut buf, room, Instant::now() + READ_TIMEOUT)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the answer was cut short",
                        ));
                    }
                }
                buf.truncate(len);
            }
            // No length: the body runs to the end of the connection.
            None => loop {
                if buf.len() >= MAX_RESPONSE_BODY_BYTES {
                    return Err(malformed(format!(
                        "response body larger than {MAX_RESPONSE_BODY_BYTES} bytes"
                    )));
                }
                let room = MAX_RESPONSE_BODY_BYTES - buf.len();
                match io.read_plain(&mut buf, room, Instant::now() + READ_TIMEOUT) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            },
        }
        return Ok((status, buf));
    }
}

/// Non-2xx → [`ClientError::Api`] with the server's `{"error": …}` message.
fn check_status(status: u16, body: &[u8]) -> Result<(), ClientError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = match serde_json::from_slice::<jaunt_config::api::ErrorBody>(body) {
        Ok(error) => error.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            match text.char_indices().nth(300) {
                Some((cut, _)) => format!("{}…", &text[..cut]),
                None if text.is_empty() => "the proxy gave no reason".to_owned(),
                None => text.to_owned(),
            }
        }
    };
    Err(ClientError::Api { status, message })
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::WriteZero
    )
}

/// rustls's wording, with a hint where the usual cause is known.
fn describe_tls_error(e: &rustls::Error) -> String {
    let hint = match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            " (the server's certificate is not from the CA this client trusts: log in again, or check the CA pin)"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => " (the server's certificate has expired, or this machine's clock is wrong)",
        rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateExpired,
        ) => " (the proxy rejected this client's certificate: log in again)",
        rustls::Error::NoApplicationProtocol | rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => {
            " (the server does not speak the Jaunt control protocol)"
        }
        _ => "",
    };
    format!("{e}{hint}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn splits_addresses() {
        assert_eq!(
            split_host_port("proxy.example.com:3080").expect("ok"),
            ("proxy.example.com".into(), 3080)
        );
        assert_eq!(
            split_host_port("127.0.0.1:1").expect("ok"),
            ("127.0.0.1".into(), 1)
        );
        assert_eq!(
            split_host_port("[::1]:443").expect("ok"),
            ("::1".into(), 443)
        );
        assert!(split_host_port("proxy").is_err());
        assert!(split_host_port("::1:443").is_err());
        assert!(split_host_port(":443").is_err());
        assert!(split_host_port("h:99999").is_err());
        assert!(split_host_port("[::1:443").is_err());
    }

    #[test]
    fn ip_literals_become_ip_server_names() {
        let client = Client::new("[::1]:3025", Trust::Insecure, None).expect("client");
        assert!(matches!(client.server_name, ServerName::IpAddress(_)));
        let client = Client::new("proxy.example.com:3025", Trust::Insecure, None).expect("client");
        assert!(matches!(client.server_name, ServerName::DnsName(_)));
    }

    #[test]
    fn normalizes_pins() {
        let hex = "AB".repeat(32);
        assert_eq!(
            normalize_pin(&format!("SHA256:{hex}")).expect("ok"),
            format!("sha256:{}", "ab".repeat(32))
        );
        assert!(normalize_pin("sha256:abcd").is_err());
        assert!(normalize_pin(&format!("sha1:{hex}")).is_err());
        assert!(normalize_pin(&"ab".repeat(32)).is_err());
        assert!(matches!(
            Client::new("h:1", Trust::Pin("nope".into()), None),
            Err(ClientError::InvalidPin { .. })
        ));
    }

    #[test]
    fn spki_pin_hashes_the_subject_public_key_info() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["ca".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let expected = format!(
            "sha256:{}",
            hex::encode(digest::digest(
                &digest::SHA256,
                &rcgen::PublicKeyData::subject_public_key_info(&key)
            ))
        );
        assert_eq!(spki_pin(cert.der()).expect("pin"), expected);
        assert!(spki_pin(b"not a certificate").is_err());
    }

    #[test]
    fn non_2xx_carries_the_server_message() {
        match check_status(403, br#"{"error":"access denied"}"#) {
            Err(ClientError::Api {
                status: 403,
                message,
            }) => assert_eq!(message, "access denied"),
            other => panic!("unexpected {other:?}"),
        }
        match check_status(502, b"") {
            Err(ClientError::Api {
                status: 502,
                message,
            }) => assert_eq!(message, "the proxy gave no reason"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(check_status(204, b"").is_ok());
    }

    #[test]
    fn encodes_requests() {
        let bytes = encode_request("POST", "/v1/login", "proxy:3080", Some(b"{}"));
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(
            text.starts_with("POST /v1/login HTTP/1.1\r\nHost: proxy:3080\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 2\r\n\r\n{}"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
    }
}
