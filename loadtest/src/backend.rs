//! The backend every path ends at (the TCP app behind the agent, nginx's and HAProxy's upstream,
//! and the direct baseline). A thread per connection; the first byte picks the behaviour:
//!
//! - `E`: echo every byte until EOF;
//! - `S` + u64 (big-endian) `n`: read `n` bytes, discard them, answer `K` (upload);
//! - `G` + u64 `n`: write `n` bytes, then wait for EOF (download);
//! - `I`: idle: read and discard until EOF.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

/// Stack of a connection thread: the loops here need a few KiB.
const STACK: usize = 64 * 1024;

/// Starts the backend on `bind` (`127.0.0.1:0` for a port picked by the kernel) and returns its
/// address.
pub fn start(bind: &str) -> anyhow::Result<String> {
    let listener = TcpListener::bind(bind)?;
    let addr = listener.local_addr()?.to_string();
    std::thread::Builder::new()
        .name("backend-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = std::thread::Builder::new()
                    .stack_size(STACK)
                    .spawn(move || {
                        let _ = serve(conn);
                    });
            }
        })?;
    Ok(addr)
}

fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut cmd = [0u8; 1];
    conn.read_exact(&mut cmd)?;
    let mut buf = vec![0u8; 64 * 1024];
    match cmd[0] {
        b'E' => loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n])?;
        },
        b'S' => {
            let mut len = [0u8; 8];
            conn.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = conn.read(&mut buf[..want])?;
                if n == 0 {
                    return Ok(());
                }
                left -= n as u64;
            }
            conn.write_all(b"K")?;
            drain(&mut conn, &mut buf)
        }
        b'G' => {
            let mut len = [0u8; 8];
            conn.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31);
            }
            while left > 0 {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                conn.write_all(&buf[..n])?;
                left -= n as u64;
            }
            drain(&mut conn, &mut buf)
        }
        _ => drain(&mut conn, &mut buf),
    }
}

fn drain(conn: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    while conn.read(buf)? > 0 {}
    Ok(())
}
