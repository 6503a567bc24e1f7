//! The user's side over std sockets: rustls connections, the dial request / response exchange,
//! 2-byte length-prefixed frames (sync and async), and reading a Prometheus text exposition.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use futures_lite::io::{AsyncRead, AsyncReadExt};
use jaunt_config::wire::{DialKind, DialRequest, DialResponse};
use rustls::pki_types::ServerName;

use crate::WAIT;

/// A user's TLS connection over std TCP.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS client connection to `addr` for `sni` (reads time out after [`WAIT`]); the handshake
/// happens on first use.
pub fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>, sni: &str) -> Tls {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let conn = rustls::ClientConnection::new(config, ServerName::try_from(sni.to_owned()).unwrap())
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads one frame with a 2-byte big-endian length prefix; the frame includes the prefix.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 2];
    r.read_exact(&mut frame)?;
    frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
    r.read_exact(&mut frame[2..])?;
    Ok(frame)
}

/// Reads one frame with a 2-byte big-endian length prefix (the frame includes the prefix);
/// `None` if the stream ended or failed where the prefix should be. Panics if the rest fails.
pub async fn read_frame_async<R: AsyncRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; 2];
    r.read_exact(&mut frame).await.ok()?;
    frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
    r.read_exact(&mut frame[2..]).await.unwrap();
    Some(frame)
}

/// Sends a dial request on a user connection and reads exactly the dial response's frame (the
/// target's bytes may follow it at once).
pub fn dial_frame(tls: &mut Tls, request: &DialRequest) -> std::io::Result<Vec<u8>> {
    tls.write_all(&request.encode())?;
    tls.flush()?;
    read_frame(tls)
}

/// [`dial_frame`], parsed; checks the response fills its frame.
pub fn dial(tls: &mut Tls, request: &DialRequest) -> std::io::Result<DialResponse> {
    let frame = dial_frame(tls, request)?;
    let (response, used) = DialResponse::parse(&frame).unwrap().unwrap();
    assert_eq!(used, frame.len());
    Ok(response)
}

/// Dials `request` on `tls` and, if the engine accepts, writes `send` and reads `reply_len`
/// bytes back: the reply, or the engine's refusal.
pub fn exchange(
    tls: &mut Tls,
    request: &DialRequest,
    send: &[u8],
    reply_len: usize,
) -> Result<Vec<u8>, String> {
    let frame = dial_frame(tls, request).unwrap();
    let (response, _) = DialResponse::parse(&frame).unwrap().unwrap();
    if !response.ok {
        return Err(response.error.unwrap_or_default());
    }
    tls.write_all(send).unwrap();
    tls.flush().unwrap();
    let mut reply = vec![0u8; reply_len];
    tls.read_exact(&mut reply).unwrap();
    Ok(reply)
}

/// A dial request for `target`, as login `root` for ssh.
pub fn request(kind: DialKind, target: &str) -> DialRequest {
    DialRequest {
        join: None,
        kind,
        target: target.into(),
        login: (kind == DialKind::Ssh).then(|| "root".into()),
        db_user: None,
        db_name: None,
    }
}

/// Sum of a metric's samples in a Prometheus text exposition whose labels include every
/// `labels` pair.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| {
                series_labels
                    .split(',')
                    .any(|l| l == format!("{k}=\"{v}\""))
            });
            all.then(|| value.parse::<f64>().ok().map(|v| v as u64))
                .flatten()
        })
        .sum()
}
