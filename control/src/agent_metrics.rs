//! The agent's optional metrics endpoint (`jaunt agent --metrics-addr HOST:PORT`, or
//! `agent.metrics_addr` in its config): plain HTTP/1.1 on one ordinary thread with blocking
//! sockets, one request per connection, as the engine's diagnostics endpoint. `GET /metrics`
//! answers [`jaunt_agent::metrics::render`] (the SSH connections the agent refused for bad
//! input, by reason); anything else is a 404. Unauthenticated: bind it to a loopback or private
//! address.
//!
//! Why an endpoint of the agent's own rather than reporting to control's `/metrics`: the
//! counters are the agent's (control never sees the SSH bytes), a scrape of each node is what
//! Prometheus setups already do for node exporters, and it costs nothing on the path to control
//! (no new API, no counters lost while control is unreachable).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context as _;

/// Largest request head read.
const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// Read and write timeout of one connection.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` and serves on a thread of its own; returns the bound address.
pub fn start(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("agent.metrics_addr {addr}: bind"))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("jaunt-agent-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(conn) => answer(conn),
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: accept failed");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        })
        .context("starting the metrics thread")?;
    Ok(bound)
}

fn answer(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", jaunt_agent::metrics::render()),
        _ => (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_the_agents_counters() {
        let addr = start("127.0.0.1:0").unwrap();
        jaunt_agent::metrics::ssh_refused("wrong_user");
        let text = get(addr, "/metrics");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("jaunt_agent_ssh_refused_total{reason=\"wrong_user\"}"),
            "{text}"
        );
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
    }
}
