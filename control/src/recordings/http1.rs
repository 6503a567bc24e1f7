//! A small blocking HTTP/1.1 client for the `s3` recordings backend: one request per
//! connection (`Connection: close`) over a plain `TcpStream` or rustls (ring), with socket
//! timeouts and a bound on the answer. No async runtime: control runs on plain threads.
//!
//! Answers are read whole into memory up to [`MAX_RESPONSE_BYTES`] (S3's answers are XML
//! listings and the byte ranges the backend asks for, both bounded by the caller); bodies are
//! `Content-Length`, chunked, or up to the end of the connection.
//!
//! Not here: signing (`sigv4.rs`), S3's requests (`s3.rs`).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

/// Time to connect, and the longest silence while sending or receiving.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on an answer's head.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Bound on an answer's body.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Where requests go: `http://host:port` or `https://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Parses `http(s)://host[:port][/]`.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err("expected http://HOST[:PORT] or https://HOST[:PORT]".into());
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err("expected a scheme, a host and an optional port, no path".into());
        }
        let default = if https { 443 } else { 80 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("invalid port {p:?}"))?,
            ),
            _ => (
                rest.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                default,
            ),
        };
        Ok(Endpoint { https, host, port })
    }

    /// The `Host` header's value.
    pub fn authority(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// An answer.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The client: TLS settings for `https` endpoints (the system's roots, or given ones).
#[derive(Clone)]
pub struct Client {
    tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("http1::Client")
    }
}

impl Client {
    /// A client trusting the system's CA certificates for `https`.
    pub fn new() -> Client {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let config = match config {
            Ok(c) => c,
            // The ring provider supports the default versions; keep a usable value anyway.
            Err(_) => ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map(|b| {
                b.with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            })
            .unwrap_or_else(|_| unreachable_config()),
        };
        Client {
            tls: Arc::new(config),
        }
    }

    /// Sends one request; `target` is the path and query as sent. `body` is written as is, with
    /// its `Content-Length`.
    pub fn send(
        &self,
        endpoint: &Endpoint,
        method: &str,
        target: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> io::Result<Response> {
        let addr = (endpoint.host.as_str(), endpoint.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        let sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        let _ = sock.set_nodelay(true);
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        if endpoint.https {
            let name = ServerName::try_from(endpoint.host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            let conn = ClientConnection::new(Arc::clone(&self.tls), name)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut stream = StreamOwned::new(conn, sock);
            exchange(&mut stream, head.as_bytes(), body, method == "HEAD")
        } else {
            let mut sock = sock;
            exchange(&mut sock, head.as_bytes(), body, method == "HEAD")
        }
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

#[allow(clippy::panic)]
fn unreachable_config() -> ClientConfig {
    // Only reached if ring supported neither TLS 1.3 nor the defaults, which it does.
    panic!("rustls with ring supports TLS 1.3")
}

fn exchange<S: Read + Write>(
    stream: &mut S,
    head: &[u8],
    body: &[u8],
    head_request: bool,
) -> io::Result<Response> {
    stream.write_all(head)?;
    stream.write_all(body)?;
    stream.flush()?;
    read_response(stream, head_request)
}

fn malformed(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Reads more into `buf`; `Ok(0)` at the end of the stream (a TLS peer closing without
/// close_notify counts as the end).
fn fill<S: Read>(stream: &mut S, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    if buf.len() >= limit {
        return Err(malformed(format!("answer larger than {limit} bytes")));
    }
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        }
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(e),
    }
}

fn read_response<S: Read>(stream: &mut S, head_request: bool) -> io::Result<Response> {
    let mut buf = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let status = parsed
            .parse(&buf)
            .map_err(|e| malformed(format!("malformed answer head: {e}")))?;
        let httparse::Status::Complete(head_len) = status else {
            if fill(stream, &mut buf, MAX_HEAD_BYTES)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection without answering",
                ));
            }
            continue;
        };
        let code = parsed.code.ok_or_else(|| malformed("no status"))?;
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect();
        buf.drain(..head_len);
        if (100..200).contains(&code) {
            continue;
        }
        let mut response = Response {
            status: code,
            headers,
            body: Vec::new(),
        };
        if head_request || code == 204 || code == 304 {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = match response.header("content-length") {
            Some(v) => Some(
                v.parse::<usize>()
                    .map_err(|_| malformed("invalid Content-Length"))?,
            ),
            None => None,
        };
        response.body = if chunked {
            read_chunked(stream, buf)?
        } else if let Some(len) = length {
            if len > MAX_RESPONSE_BYTES {
                return Err(malformed(format!(
                    "answer larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            while buf.len() < len {
                if fill(stream, &mut buf, MAX_RESPONSE_BYTES)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the answer was cut short",
                    ));
                }
            }
            buf.truncate(len);
            buf
        } else {
            while fill(stream, &mut buf, MAX_RESPONSE_BYTES)? > 0 {}
            buf
        };
        return Ok(response);
    }
}

fn read_chunked<S: Read>(stream: &mut S, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
            if fill(stream, &mut buf, MAX_RESPONSE_BYTES)? == 0 {
                return Err(malformed("chunked answer cut short"));
            }
            continue;
        };
        let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| malformed("chunk size"))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| malformed("invalid chunk size"))?;
        if body.len().saturating_add(size) > MAX_RESPONSE_BYTES {
            return Err(malformed(format!(
                "answer larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        let need = line_end + 2 + size + 2;
        while buf.len() < need {
            if fill(stream, &mut buf, MAX_RESPONSE_BYTES + 64 * 1024)? == 0 {
                if size == 0 {
                    return Ok(body);
                }
                return Err(malformed("chunked answer cut short"));
            }
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..need);
        if size == 0 {
            return Ok(body);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!(
            (e.https, e.host.as_str(), e.port),
            (false, "127.0.0.1", 9000)
        );
        assert_eq!(e.authority(), "127.0.0.1:9000");
        let e = Endpoint::parse("https://s3.eu-west-1.amazonaws.com/").unwrap();
        assert_eq!((e.https, e.port), (true, 443));
        assert_eq!(e.authority(), "s3.eu-west-1.amazonaws.com");
        assert!(Endpoint::parse("s3.amazonaws.com").is_err());
        assert!(Endpoint::parse("http://h/path").is_err());
        assert!(Endpoint::parse("http://h:notaport").is_err());
    }

    #[test]
    fn chunked_and_length_answers_are_read() {
        let text = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = read_response(&mut &text[..], false).unwrap();
        assert_eq!(r.body, b"abcde");
        let text = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nnoEXTRA";
        let r = read_response(&mut &text[..], false).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no"[..]));
    }
}
