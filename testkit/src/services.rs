//! Local services on std threads, bound to 127.0.0.1 port 0.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};

/// A TCP server on 127.0.0.1:0 that runs `serve` on each connection, on a thread of its own.
pub fn serve_each(serve: impl Fn(TcpStream) + Clone + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(conn));
        }
    });
    addr
}

/// A TCP echo server; each connection is echoed until EOF, then its write side shut.
pub fn echo_server() -> SocketAddr {
    serve_each(|mut conn| {
        let mut reader = conn.try_clone().unwrap();
        let _ = std::io::copy(&mut reader, &mut conn);
        let _ = conn.shutdown(std::net::Shutdown::Write);
    })
}

/// What a stand-in sshd does after its banner.
#[derive(Clone, Copy, Debug)]
pub enum AfterBanner {
    /// Echoes what it reads.
    Echo,
    /// Reads until EOF, answering nothing.
    Discard,
}

/// A stand-in sshd: writes `banner` on each connection, then echoes or discards.
pub fn sshd(banner: &'static str, then: AfterBanner) -> SocketAddr {
    serve_each(move |mut conn| {
        let _ = conn.write_all(banner.as_bytes());
        match then {
            AfterBanner::Echo => {
                let mut read = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut read, &mut conn);
            }
            AfterBanner::Discard => {
                let _ = std::io::copy(&mut conn, &mut std::io::sink());
            }
        }
    })
}

/// A loopback port nothing listens on.
pub fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
