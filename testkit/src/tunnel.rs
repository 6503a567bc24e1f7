//! Both ends of an agent tunnel, hand-driven: the agent side's connect (TLS with a host
//! certificate, then the engine's `TunnelHello`), a stand-in agent that announces an
//! [`AgentHello`] and serves the streams the engine opens, and a stand-in engine's side of one
//! connection (send a `TunnelHello`, read the `AgentHello`, run the mux as the server).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::task::JoinHandle;
use jaunt_config::wire::agent_hello::{AgentHello, Resource, ResourceKind, ResourceProtocol};
use jaunt_config::wire::dial::{DialKind, StreamHeader};
use jaunt_config::wire::TunnelHello;
use jaunt_engine::mux::{self, Role};
use jaunt_engine::tunnel::{CloseReason, Tunnel};
use rustls::pki_types::ServerName;

use crate::net::read_frame_async;
use crate::PUBLIC_HOST;

/// The agent's TLS connection to the engine.
pub type AgentTls = futures_rustls::client::TlsStream<glommio::net::TcpStream>;

// ---------------------------------------------------------------------------------------------
// The agent's side

/// Connects (TCP_NODELAY) and reads the tunnel hello.
pub async fn tunnel_connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> (AgentTls, TunnelHello) {
    let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connector = futures_rustls::TlsConnector::from(Arc::clone(config));
    let mut tls = connector
        .connect(ServerName::try_from(PUBLIC_HOST).unwrap(), tcp)
        .await
        .unwrap();
    let frame = read_frame_async(&mut tls).await.unwrap();
    let (hello, _) = TunnelHello::parse(&frame).unwrap().unwrap();
    (tls, hello)
}

/// How to stop a [`StandInAgent`].
pub enum Stop {
    /// Drop its tasks: drivers and sockets go without a goodbye.
    Kill,
    /// Never poll its tunnels' drivers again: the sockets stay open, silent.
    Freeze,
}

/// What a stand-in agent saw.
#[derive(Debug)]
pub enum AgentEvent {
    /// A tunnel was established on this shard.
    Tunnel(TunnelHello),
    /// The shard already had one of ours: closed cleanly after the tunnel hello.
    Duplicate(TunnelHello),
}

/// A stand-in agent on its own glommio thread: dials the engine, announces its plan's hello and
/// serves every stream with [`serve_tunnel`]. A dropped `StandInAgent` kills its agent.
pub struct StandInAgent {
    /// The tunnel hello of each tunnel it keeps.
    pub hello: crossbeam_channel::Receiver<TunnelHello>,
    pub events: crossbeam_channel::Receiver<AgentEvent>,
    /// Sent to once the agent's executor has returned.
    pub done: crossbeam_channel::Receiver<()>,
    pub stop: crossbeam_channel::Sender<Stop>,
}

/// How a stand-in agent behaves.
#[derive(Clone)]
pub struct AgentPlan {
    pub hello: AgentHello,
    /// Tag in ssh greetings, to tell two agents apart.
    pub tag: &'static str,
    /// Keep dialing until every shard has a tunnel (else stop after the first tunnel).
    pub cover_all: bool,
}

impl AgentPlan {
    /// One tunnel, announcing `node` and the given TCP apps.
    pub fn new(node: &str, tcp_apps: &[&str]) -> AgentPlan {
        AgentPlan::with_hello(agent_hello(node, tcp_apps))
    }

    /// One tunnel, announcing `hello`.
    pub fn with_hello(hello: AgentHello) -> AgentPlan {
        AgentPlan {
            hello,
            tag: "agent",
            cover_all: false,
        }
    }
}

/// A hello for node `node` (labelled `os: linux`, the agent `env: test`) and TCP apps.
pub fn agent_hello(node: &str, tcp_apps: &[&str]) -> AgentHello {
    agent_hello_labelled(
        node,
        [("os".to_owned(), "linux".to_owned())].into(),
        [("env".to_owned(), "test".to_owned())].into(),
        tcp_apps,
    )
}

/// A hello for node `node` with `node_labels`, the agent labelled `agent_labels`, and TCP apps
/// (unlabelled).
pub fn agent_hello_labelled(
    node: &str,
    node_labels: BTreeMap<String, String>,
    agent_labels: BTreeMap<String, String>,
    tcp_apps: &[&str],
) -> AgentHello {
    let mut resources = vec![Resource {
        kind: ResourceKind::Node,
        name: node.into(),
        labels: node_labels,
        protocol: ResourceProtocol::Ssh,
    }];
    resources.extend(tcp_apps.iter().map(|app| Resource {
        kind: ResourceKind::Tcp,
        name: (*app).into(),
        labels: Default::default(),
        protocol: ResourceProtocol::Tcp,
    }));
    AgentHello::new(node, agent_labels, resources)
}

impl StandInAgent {
    pub fn start(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        plan: AgentPlan,
    ) -> StandInAgent {
        let (hello_tx, hello) = crossbeam_channel::unbounded();
        let (events_tx, events) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .io_memory(64 << 10)
                .make()
                .unwrap();
            executor.run(agent(addr, config, plan, hello_tx, events_tx, stop_rx));
            // Only once the executor is gone, and the agent's sockets with it.
            let _ = done_tx.send(());
        });
        StandInAgent {
            hello,
            events,
            done,
            stop,
        }
    }

    /// Every event so far (none are waited for).
    pub fn drain_events(&self) -> Vec<AgentEvent> {
        self.events.try_iter().collect()
    }
}

async fn agent(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    plan: AgentPlan,
    hello_tx: crossbeam_channel::Sender<TunnelHello>,
    events: crossbeam_channel::Sender<AgentEvent>,
    stop: crossbeam_channel::Receiver<Stop>,
) {
    let frozen = Rc::new(Cell::new(false));
    let mut covered = std::collections::BTreeSet::new();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (mut tls, hello) = tunnel_connect(addr, &config).await;
        if !covered.insert(hello.shard) {
            tls.close().await.unwrap();
            events.send(AgentEvent::Duplicate(hello)).unwrap();
            continue;
        }
        tls.write_all(&plan.hello.encode().unwrap()).await.unwrap();
        tls.flush().await.unwrap();
        hello_tx.send(hello).unwrap();
        events.send(AgentEvent::Tunnel(hello)).unwrap();
        let (tunnel, driver) = Tunnel::new(tls, Role::Client, mux::Config::default());
        let frozen = Rc::clone(&frozen);
        let driver = glommio::spawn_local(async move {
            let mut driver = std::pin::pin!(driver);
            // Once frozen, never polled again (and never woken): the socket stays open, silent.
            std::future::poll_fn(|cx| {
                if frozen.get() {
                    std::task::Poll::Pending
                } else {
                    driver.as_mut().poll(cx)
                }
            })
            .await
        });
        let serving = glommio::spawn_local(serve_tunnel(tunnel, plan.tag));
        tasks.push((serving, driver));
        if !plan.cover_all || covered.len() == hello.shards {
            break;
        }
    }
    let ended = async {
        for (serving, driver) in tasks {
            serving.await;
            let _ = driver.await;
        }
    };
    let stopped = async {
        // The stop channel is a crossbeam one (the test thread is not an executor): check it
        // between short timers. A dropped `StandInAgent` kills its agent.
        loop {
            match stop.try_recv() {
                Ok(Stop::Kill) | Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                Ok(Stop::Freeze) => frozen.set(true),
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    glommio::timer::Timer::new(Duration::from_millis(5)).await;
                }
            }
        }
    };
    // On a kill, the tasks are dropped: their drivers and sockets go without a goodbye.
    futures_lite::future::or(ended, stopped).await;
}

/// Refuses streams to `refuse-me`; greets ssh streams with `hello <user> as <login> via <tag>`;
/// echoes every stream until the user's FIN, then closes its side.
pub async fn serve_tunnel(tunnel: Tunnel, tag: &'static str) {
    while let Some(incoming) = tunnel.accept().await {
        let header = StreamHeader::parse(&incoming.header).unwrap();
        if header.target == "refuse-me" {
            incoming.refuse("connection refused by the test target");
            continue;
        }
        let mut stream = incoming.accept().unwrap();
        glommio::spawn_local(async move {
            if header.kind == DialKind::Ssh {
                let greeting = format!(
                    "hello {} as {} via {tag}\n",
                    header.user,
                    header.login.unwrap_or_default()
                );
                stream.write_all(greeting.as_bytes()).await.unwrap();
            }
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = stream.close().await;
        })
        .detach();
    }
}

// ---------------------------------------------------------------------------------------------
// A stand-in engine's side

/// What a stand-in engine saw on one connection.
pub enum Accepted {
    /// A tunnel: the agent sent its hello and the mux runs.
    Tunnel(EngineTunnel),
    /// The agent closed the connection where its hello should have been.
    ClosedBeforeHello { hello: TunnelHello },
    /// The TLS handshake failed (e.g. a client certificate from another CA).
    TlsFailed(String),
}

impl Accepted {
    /// The tunnel; panics on anything else.
    pub fn into_tunnel(self) -> EngineTunnel {
        match self {
            Accepted::Tunnel(t) => t,
            Accepted::ClosedBeforeHello { hello } => {
                panic!("expected a tunnel, the agent closed after {hello:?}")
            }
            Accepted::TlsFailed(e) => panic!("expected a tunnel, TLS failed: {e}"),
        }
    }
}

/// One tunnel as the stand-in engine holds it.
pub struct EngineTunnel {
    /// The tunnel hello it sent.
    pub hello: TunnelHello,
    /// The agent's hello.
    pub agent: AgentHello,
    pub tunnel: Tunnel,
    pub driver: JoinHandle<CloseReason>,
}

/// The stand-in engine's side of one agent connection: the TLS handshake, a
/// `TunnelHello::new(shards, shard)`, the agent's hello (which must fill its frame), then the
/// mux as `Role::Server`.
pub async fn engine_side(
    acceptor: TlsAcceptor,
    tcp: glommio::net::TcpStream,
    (shards, shard): (usize, usize),
) -> Accepted {
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => return Accepted::TlsFailed(e.to_string()),
    };
    let hello = TunnelHello::new(shards, shard);
    tls.write_all(&hello.encode()).await.unwrap();
    tls.flush().await.unwrap();
    let Some(frame) = read_frame_async(&mut tls).await else {
        return Accepted::ClosedBeforeHello { hello };
    };
    let (agent, used) = AgentHello::parse(&frame).unwrap().unwrap();
    assert_eq!(used, frame.len());
    let (tunnel, driver) = Tunnel::spawn(tls, Role::Server, mux::Config::default());
    Accepted::Tunnel(EngineTunnel {
        hello,
        agent,
        tunnel,
        driver,
    })
}
