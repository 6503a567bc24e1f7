//! Same-run baselines for `loadtest compare`: nginx (stream module; one TLS hop, and a chain of
//! two TLS hops) and HAProxy (TLS termination, ALPN-selected backend), started and stopped by
//! the harness from the templates in `loadtest/peers/`, with a throwaway ECDSA P-256 certificate.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::client::{Target, TlsPair};
use crate::cluster::{free_port, Proc};

const NGINX_TEMPLATE: &str = include_str!("../peers/nginx.conf");
const HAPROXY_TEMPLATE: &str = include_str!("../peers/haproxy.cfg");
pub const INSTALL_HINT: &str = "apt-get install nginx libnginx-mod-stream haproxy";

/// A self-signed certificate for `localhost` in `dir`.
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// cert + key, for HAProxy's `crt`.
    pub pem: PathBuf,
    pub der: CertificateDer<'static>,
}

pub fn make_cert(dir: &Path) -> anyhow::Result<Cert> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert_pem = ck.cert.pem();
    let key_pem = ck.signing_key.serialize_pem();
    let cert = dir.join("peer.crt");
    let key = dir.join("peer.key");
    let pem = dir.join("peer.pem");
    std::fs::write(&cert, &cert_pem)?;
    std::fs::write(&key, &key_pem)?;
    std::fs::write(&pem, format!("{cert_pem}{key_pem}"))?;
    Ok(Cert {
        cert,
        key,
        pem,
        der: ck.cert.der().clone(),
    })
}

fn which(bin: &str) -> Option<PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
        "/bin",
    ] {
        let p = Path::new(dir).join(bin);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

fn wait_listening(ports: &[u16], proc_: &mut Proc, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    for port in ports {
        let addr: SocketAddr = ([127, 0, 0, 1], *port).into();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = proc_.child.try_wait() {
                bail!(
                    "{} exited ({status}): {}",
                    proc_.what,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("{} is not listening on {port}", proc_.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn tls_target(port: u16, cert: &Cert, alpn: &[u8]) -> anyhow::Result<Target> {
    Ok(Target::Tls {
        addr: ([127, 0, 0, 1], port).into(),
        name: ServerName::try_from("localhost")
            .map_err(|e| anyhow!("{e}"))?
            .to_owned(),
        tls: TlsPair::new(std::slice::from_ref(&cert.der), None, alpn)?,
    })
}

/// A running nginx: the one-hop and two-hop targets.
pub struct Nginx {
    pub proc_: Proc,
    pub one_hop: Target,
    pub two_hop: Target,
    /// The port of this instance's inner hop (TLS in, clear to the backend).
    pub inner_port: u16,
}

impl Nginx {
    /// nginx with both hops in one instance (its workers serve either hop).
    pub fn start(
        dir: &Path,
        cert: &Cert,
        backend: &str,
        workers: usize,
    ) -> anyhow::Result<Option<Nginx>> {
        Self::start_with(&dir.join("nginx"), cert, backend, workers, None)
    }

    /// A second instance whose two-hop target forwards to `inner`, another instance's inner
    /// hop: the chain `nginx-2proc`, each hop in its own processes (as Jaunt's engine and agent).
    pub fn start_front(
        dir: &Path,
        cert: &Cert,
        backend: &str,
        workers: usize,
        inner: u16,
    ) -> anyhow::Result<Option<Nginx>> {
        Self::start_with(
            &dir.join("nginx-front"),
            cert,
            backend,
            workers,
            Some(inner),
        )
    }

    fn start_with(
        dir: &Path,
        cert: &Cert,
        backend: &str,
        workers: usize,
        inner_target: Option<u16>,
    ) -> anyhow::Result<Option<Nginx>> {
        let Some(bin) = which("nginx") else {
            eprintln!("loadtest: nginx is not installed, skipping it ({INSTALL_HINT})");
            return Ok(None);
        };
        let module = [
            "/usr/lib/nginx/modules/ngx_stream_module.so",
            "/usr/lib64/nginx/modules/ngx_stream_module.so",
        ]
        .into_iter()
        .find(|p| Path::new(p).is_file());
        let Some(module) = module else {
            eprintln!(
                "loadtest: nginx's stream module is not installed, skipping nginx ({INSTALL_HINT})"
            );
            return Ok(None);
        };
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let (one, two, inner) = (free_port()?, free_port()?, free_port()?);
        let is_root = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        let conf = NGINX_TEMPLATE
            .replace("{{STREAM_MODULE}}", module)
            .replace("{{WORKERS}}", &workers.to_string())
            .replace("{{DIR}}", &dir.display().to_string())
            .replace("{{USER_LINE}}", if is_root { "user root;" } else { "" })
            .replace("{{CERT}}", &cert.cert.display().to_string())
            .replace("{{KEY}}", &cert.key.display().to_string())
            .replace("{{PORT_ONE}}", &one.to_string())
            .replace("{{PORT_TWO}}", &two.to_string())
            .replace(
                "{{PORT_INNER_TARGET}}",
                &inner_target.unwrap_or(inner).to_string(),
            )
            .replace("{{PORT_INNER}}", &inner.to_string())
            .replace("{{BACKEND}}", backend);
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let log = dir.join("nginx-error.log");
        let child = Command::new(&bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        let mut proc_ = Proc::new(child, "nginx");
        wait_listening(&[one, two, inner], &mut proc_, &log)?;
        // The workers too, so an interrupted run leaves none behind.
        for pid in crate::procfs::tree(proc_.pid()).into_iter().skip(1) {
            crate::cluster::register_child(pid);
        }
        Ok(Some(Nginx {
            proc_,
            one_hop: tls_target(one, cert, b"lt-tcp")?,
            two_hop: tls_target(two, cert, b"lt-tcp")?,
            inner_port: inner,
        }))
    }

    /// Master and workers.
    pub fn pids(&self) -> Vec<u32> {
        crate::procfs::tree(self.proc_.pid())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (a SIGKILL would orphan them).
        let workers = self.pids();
        self.proc_.terminate(std::time::Duration::from_secs(5));
        for pid in workers.into_iter().skip(1) {
            crate::cluster::unregister_child(pid);
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.proc_.terminate(std::time::Duration::from_secs(5));
    }
}

/// A running HAProxy.
pub struct Haproxy {
    pub proc_: Proc,
    pub target: Target,
}

impl Haproxy {
    pub fn start(
        dir: &Path,
        cert: &Cert,
        backend: &str,
        threads: usize,
    ) -> anyhow::Result<Option<Haproxy>> {
        let Some(bin) = which("haproxy") else {
            eprintln!("loadtest: haproxy is not installed, skipping it ({INSTALL_HINT})");
            return Ok(None);
        };
        let dir = dir.join("haproxy");
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let conf = HAPROXY_TEMPLATE
            .replace("{{THREADS}}", &threads.to_string())
            .replace("{{PORT}}", &port.to_string())
            .replace("{{PEM}}", &cert.pem.display().to_string())
            .replace("{{BACKEND}}", backend);
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, conf)?;
        let log = dir.join("haproxy.log");
        let child = Command::new(&bin)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        let mut proc_ = Proc::new(child, "haproxy");
        wait_listening(&[port], &mut proc_, &log)?;
        Ok(Some(Haproxy {
            proc_,
            target: tls_target(port, cert, b"lt-tcp")?,
        }))
    }
}
