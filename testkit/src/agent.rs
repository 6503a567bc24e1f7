//! The real agent's settings, for tests that run [`jaunt_agent::run`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use jaunt_agent::{AgentSettings, BackoffConfig, Timeouts};
use jaunt_config::file::{AgentServices, AppProtocol, AppService, CpuPlacement, HostPort};
use jaunt_engine::mux;

use crate::PUBLIC_HOST;

pub fn hp(addr: SocketAddr) -> HostPort {
    addr.to_string().parse().unwrap()
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A TCP app `name` at `addr`, unlabelled.
pub fn tcp_app(name: &str, addr: SocketAddr) -> AppService {
    AppService {
        name: name.into(),
        uri: format!("tcp://{addr}"),
        protocol: AppProtocol::Tcp,
        addr: hp(addr),
        labels: BTreeMap::new(),
    }
}

/// Agent `node1` (labelled `env: test`) dialing `proxy` as [`PUBLIC_HOST`], with default
/// backoff, timeouts and mux timers.
pub fn settings(
    proxy: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    services: AgentServices,
) -> AgentSettings {
    AgentSettings {
        proxy_addr: proxy.to_string(),
        server_name: PUBLIC_HOST.into(),
        tls,
        name: "node1".into(),
        labels: labels(&[("env", "test")]),
        services,
        backoff: BackoffConfig::default(),
        timeouts: Timeouts::default(),
        mux: mux::Config::default(),
        cpu_placement: CpuPlacement::default(),
    }
}
