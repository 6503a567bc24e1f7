//! Opening one tunnel connection, up to the point where the agent decides whether to keep it:
//! resolve the proxy, TCP connect, TLS handshake (ALPN `jaunt-tunnel`, host certificate), read
//! the engine's [`TunnelHello`]. Then, for a kept connection, [`send_agent_hello`]; for a
//! duplicate, [`close_politely`]. Which to do is [`crate::coverage::Coverage`]'s call, made by
//! the runtime between the two.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use jaunt_config::wire::dial::{
    DialError, LENGTH_PREFIX_BYTES, MAX_TUNNEL_HELLO_BYTES, TUNNEL_HELLO_VERSION,
};
use jaunt_config::wire::{shard_hint_alpn, ALPN_TUNNEL};
use jaunt_config::wire::{TunnelHello, MAX_SHARDS};
use jaunt_engine::tunnel::{ReadAhead, CLOSE_TIMEOUT};
use rustls::ClientConfig;

use crate::error::TunnelError;
use crate::net;
use crate::placement::Watched;
use crate::settings::Prepared;

/// The agent's end of a tunnel connection; the socket is read in large reads under rustls
/// ([`ReadAhead`]) and counts its bytes for the executor's placement ([`Watched`]).
pub(crate) type Transport = TlsStream<ReadAhead<Watched<TcpStream>>>;

/// A connection that completed TLS and delivered the engine's hello.
pub(crate) struct Handshaked {
    pub(crate) tls: Transport,
    pub(crate) hello: TunnelHello,
    pub(crate) peer: SocketAddr,
}

/// Sessions one shard's tunnel configuration remembers (one server name; rustls keeps up to 8
/// TLS 1.3 tickets for it).
const SHARD_SESSION_CACHE_ENTRIES: usize = 4;

/// `tls` with the ALPN entry that asks the engine for shard `shard` after `jaunt-tunnel`
/// ([`shard_hint_alpn`]), and a session cache of its own: the engine sends one ticket per
/// handshake, so a cache shared by every shard's dials would hold one ticket after a round of
/// them (each dial takes the one the previous left), and after an engine restart only the
/// first tunnel would resume. With one cache per shard, each tunnel's next dial (after the
/// restart) takes the ticket its own last handshake left. Made once per shard and TLS
/// configuration (the caller keeps it; a new certificate gets new caches, so no session of the
/// old one is resumed).
pub(crate) fn asking_for_shard(tls: &Arc<ClientConfig>, shard: usize) -> Arc<ClientConfig> {
    let mut config = ClientConfig::clone(tls);
    config.alpn_protocols.push(shard_hint_alpn(shard));
    config.resumption = rustls::client::Resumption::in_memory_sessions(SHARD_SESSION_CACHE_ENTRIES);
    Arc::new(config)
}

/// The per-shard tunnel configurations made from one TLS configuration ([`asking_for_shard`]).
#[derive(Default)]
pub(crate) struct ShardConfigs {
    base: Option<Arc<ClientConfig>>,
    shards: Vec<Option<Arc<ClientConfig>>>,
}

impl ShardConfigs {
    /// Shard `shard`'s configuration for `tls`: the one made before if `tls` is the same.
    pub(crate) fn get(&mut self, tls: &Arc<ClientConfig>, shard: usize) -> Arc<ClientConfig> {
        if !self.base.as_ref().is_some_and(|b| Arc::ptr_eq(b, tls)) {
            self.base = Some(Arc::clone(tls));
            self.shards.clear();
        }
        if self.shards.len() <= shard {
            self.shards.resize(shard + 1, None);
        }
        Arc::clone(self.shards[shard].get_or_insert_with(|| asking_for_shard(tls, shard)))
    }

    /// A dial made with `tls` itself (no hint: the shard count was not known yet) landed on
    /// `shard`: that shard's dials use `tls`'s session cache from now on, where the ticket of
    /// this handshake goes, so the tunnel's redial after an engine restart resumes too.
    pub(crate) fn landed(
        &mut self,
        tls: &Arc<ClientConfig>,
        shard: usize,
        used: &Arc<ClientConfig>,
    ) {
        if !Arc::ptr_eq(tls, used) || shard >= MAX_SHARDS {
            return;
        }
        if !self.base.as_ref().is_some_and(|b| Arc::ptr_eq(b, tls)) {
            self.base = Some(Arc::clone(tls));
            self.shards.clear();
        }
        if self.shards.len() <= shard {
            self.shards.resize(shard + 1, None);
        }
        if self.shards[shard].is_none() {
            // A clone shares `tls`'s session cache.
            let mut config = ClientConfig::clone(tls);
            config.alpn_protocols.push(shard_hint_alpn(shard));
            self.shards[shard] = Some(Arc::new(config));
        }
    }
}

/// Dials the proxy and reads its tunnel hello, each step bounded by the settings' timeouts.
pub(crate) async fn handshake(
    prepared: Rc<Prepared>,
    tls: Arc<ClientConfig>,
) -> Result<Handshaked, TunnelError> {
    let addrs = net::resolve(&prepared.proxy.host, prepared.proxy.port)
        .await
        .map_err(|source| TunnelError::Resolve {
            addr: prepared.proxy_addr.clone(),
            source,
        })?;
    let tcp = net::connect(&addrs, prepared.timeouts.connect)
        .await
        .map_err(|source| TunnelError::Connect {
            addr: prepared.proxy_addr.clone(),
            source,
        })?;
    let peer = tcp.peer_addr().map_err(|e| TunnelError::Connect {
        addr: prepared.proxy_addr.clone(),
        source: e.into(),
    })?;
    let local = tcp.local_addr().ok();
    let tcp = Watched::new(tcp, peer, local);
    let after = prepared.timeouts.handshake;
    net::timeout(after, async {
        let connector = TlsConnector::from(tls);
        let mut tls = connector
            .connect(
                prepared.server_name.clone(),
                ReadAhead::new(Vec::new(), tcp),
            )
            .await
            .map_err(TunnelError::tls)?;
        let selected = tls.get_ref().1.alpn_protocol();
        if selected != Some(ALPN_TUNNEL) {
            return Err(TunnelError::Alpn {
                selected: selected.map_or_else(
                    || "none".to_owned(),
                    |p| format!("{:?}", String::from_utf8_lossy(p)),
                ),
            });
        }
        let hello = read_tunnel_hello(&mut tls).await?;
        Ok(Handshaked { tls, hello, peer })
    })
    .await
    .unwrap_or(Err(TunnelError::Timeout {
        what: "the TLS handshake and the engine's tunnel hello",
        after,
    }))
}

/// Reads exactly the hello frame: nothing after it is consumed, so the mux gets every byte
/// the engine sends next.
async fn read_tunnel_hello(tls: &mut Transport) -> Result<TunnelHello, TunnelError> {
    let mut frame = vec![0u8; LENGTH_PREFIX_BYTES];
    read_exact(tls, &mut frame).await?;
    let len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
    if len == 0 {
        return Err(TunnelError::Hello(DialError::Empty));
    }
    if len > MAX_TUNNEL_HELLO_BYTES {
        return Err(TunnelError::Hello(DialError::TooLarge {
            len,
            max: MAX_TUNNEL_HELLO_BYTES,
        }));
    }
    frame.resize(LENGTH_PREFIX_BYTES + len, 0);
    read_exact(tls, &mut frame[LENGTH_PREFIX_BYTES..]).await?;
    let hello = match TunnelHello::parse(&frame) {
        Ok(Some((hello, used))) => {
            debug_assert_eq!(used, frame.len());
            hello
        }
        Ok(None) => return Err(TunnelError::Hello(DialError::Empty)),
        Err(e) => return Err(TunnelError::Hello(e)),
    };
    if hello.version != TUNNEL_HELLO_VERSION {
        return Err(TunnelError::HelloVersion(
            hello.version,
            TUNNEL_HELLO_VERSION,
        ));
    }
    if hello.shards > MAX_SHARDS {
        return Err(TunnelError::TooManyShards(hello.shards, MAX_SHARDS));
    }
    Ok(hello)
}

async fn read_exact(tls: &mut Transport, buf: &mut [u8]) -> Result<(), TunnelError> {
    tls.read_exact(buf).await.map_err(|e| {
        let from_tls = e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
        if from_tls {
            // TLS 1.3: the engine checks our certificate after our side of the handshake is
            // done, so its refusal arrives here, as an alert.
            TunnelError::tls(e)
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            TunnelError::ClosedBeforeHello
        } else {
            TunnelError::Io {
                while_: "reading the engine's tunnel hello",
                source: e,
            }
        }
    })
}

/// Sends the (pre-encoded) AgentHello; after it the connection belongs to the mux.
pub(crate) async fn send_agent_hello(
    prepared: &Prepared,
    tls: &mut Transport,
) -> Result<(), TunnelError> {
    let after = prepared.timeouts.handshake;
    net::timeout(after, async {
        tls.write_all(&prepared.hello).await?;
        tls.flush().await
    })
    .await
    .unwrap_or_else(|| Err(io::ErrorKind::TimedOut.into()))
    .map_err(|source| TunnelError::Io {
        while_: "sending the agent hello",
        source,
    })
}

/// Closes a connection the agent does not need (its shard is covered): TLS close_notify and a
/// write shutdown, so the engine reads a clean EOF where it expected the AgentHello. Bounded
/// by the tunnel's own close timeout.
pub(crate) async fn close_politely(mut tls: Transport) {
    let _ = net::timeout(CLOSE_TIMEOUT, tls.close()).await;
}
