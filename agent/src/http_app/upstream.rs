//! The proxy's connection to the app: plain TCP for `http://` apps, TLS over TCP for `https://`
//! ones, behind one [`AsyncRead`] + [`AsyncWrite`] ([`Upstream`]).
//!
//! An https app's certificate is verified against the trust roots of the host the agent runs
//! on ([`load_trust_roots`]: the operating system's store, read by `rustls-native-certs`, which
//! also honours `SSL_CERT_FILE` / `SSL_CERT_DIR`), because apps on a private network are usually
//! signed by an internal CA the operator installed there; the name checked (and sent as SNI) is
//! the host of the app's URI. TLS 1.2 and 1.3 (ring), ALPN `http/1.1`, no client certificate.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::client::TlsStream;
use glommio::net::TcpStream;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;

/// The ALPN protocol offered to https apps.
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The app's end: the TCP connection, or TLS over it.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Upstream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Upstream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Upstream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            Upstream::Tls(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}

/// The TLS client configuration for https apps, trusting `roots`: ring, TLS 1.2 and 1.3, ALPN
/// `http/1.1`. Roots that are not usable are skipped; none usable is an error.
pub(crate) fn client_config(roots: Vec<CertificateDer<'static>>) -> Result<ClientConfig, String> {
    let mut store = RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(roots);
    if added == 0 {
        return Err(format!(
            "no usable trust roots ({ignored} certificates could not be used)"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// The host's trust roots: the operating system's store (or the PEM file and directories that
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` name), as a client configuration for https apps.
/// Blocking file I/O: run it off the executor.
pub(crate) fn load_trust_roots() -> Result<ClientConfig, String> {
    let loaded = rustls_native_certs::load_native_certs();
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    if loaded.certs.is_empty() {
        let why = if errors.is_empty() {
            "the store is empty".to_owned()
        } else {
            errors.join("; ")
        };
        return Err(format!(
            "no trust roots could be read from the system's certificate store ({why}); install \
             the CA that signs the app on the agent's host"
        ));
    }
    if !errors.is_empty() {
        tracing::warn!(errors = %errors.join("; "), usable = loaded.certs.len(),
            "some of the system's trust roots could not be read");
    }
    client_config(loaded.certs).map_err(|e| format!("the system's certificate store: {e}"))
}

/// The text of a failed TLS handshake: the rustls error itself when there is one (an unknown
/// issuer, a name mismatch, an expired certificate…).
pub(crate) fn describe_tls(err: &io::Error) -> String {
    match err.get_ref() {
        Some(inner) => inner.to_string(),
        None => crate::error::describe_io(err),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_needs_a_usable_root() {
        let err = client_config(Vec::new()).unwrap_err();
        assert!(err.contains("no usable trust roots"), "{err}");
        let err = client_config(vec![CertificateDer::from(vec![1u8, 2, 3])]).unwrap_err();
        assert!(err.contains("1 certificates could not be used"), "{err}");
    }

    #[test]
    fn tls_errors_read_as_the_rustls_error() {
        let err = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(
            describe_tls(&err),
            "invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            describe_tls(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            "connection refused"
        );
    }
}
