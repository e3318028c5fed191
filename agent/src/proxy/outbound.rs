//! Outbound: connections an enrolled pod's app made, redirected by connect4/6
//! to the pod's listener on 127.0.0.1:15001.
//!
//! The accepting listener says which pod the connection came from; the
//! original destination comes from the eBPF map, keyed by the pod's netns
//! cookie and the client's port. The upstream socket is made in the same pod
//! namespace, so the server sees the pod's own IP.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};
use weir_common::ConnKey;

use super::ProxyContext;
use super::copy;
use super::destination::Target;
use crate::inpod::SocketFactory;
use crate::metrics::{Peer, TcpLabels};
use crate::model::{Cluster, WorkloadKey};

/// Istio's default connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's own ports. A connection aimed at one of them would loop back
/// into the agent, so it is refused: the listeners are no open relay.
const AGENT_PORTS: [u16; 6] = [15000, 15001, 15006, 15008, 15020, 15021];

/// One enrolled pod as the proxy sees it.
pub struct PodProxy {
    pub key: WorkloadKey,
    pub factory: SocketFactory,
}

/// Accepts the pod's redirected connections until the listener is dropped
/// (the task is aborted).
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let (pod, ctx) = (pod.clone(), ctx.clone());
                let guard = ctx.connections.open();
                tokio::spawn(async move {
                    handle(client, peer, &pod, &ctx).await;
                    drop(guard);
                });
            }
            // Running out of descriptors must not end the pod's listener.
            Err(e) => {
                warn!(pod = %pod.key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: &PodProxy, ctx: &ProxyContext) {
    let key = ConnKey {
        netns_cookie: pod.factory.netns_cookie(),
        port: peer.port(),
        _pad: [0; 6],
    };
    let orig = ctx.orig_dst.lock().unwrap().take(key);
    let Some(orig) = orig else {
        ctx.orig_dst_misses.fetch_add(1, Relaxed);
        debug!(pod = %pod.key, %peer, "no original destination; refused");
        return reset(client);
    };
    let orig = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(orig.ip4)),
        u16::from_be(orig.port),
    ));
    if AGENT_PORTS.contains(&orig.port()) {
        debug!(pod = %pod.key, %orig, "aimed at an agent port; refused");
        return reset(client);
    }
    let cluster = ctx.cluster.borrow().clone();
    let target = match ctx.balancer.resolve(&cluster, orig) {
        Ok(target) => target,
        Err(e) => {
            debug!(pod = %pod.key, %orig, error = %e, "no upstream");
            let labels = labels(&cluster, &pod.key, None, "UH");
            let counters = ctx.metrics.tcp(labels);
            counters.opened.fetch_add(1, Relaxed);
            counters.closed.fetch_add(1, Relaxed);
            return reset(client);
        }
    };
    let mut upstream = match connect(&pod.factory, target.addr).await {
        Ok(upstream) => upstream,
        Err(e) => {
            debug!(pod = %pod.key, upstream = %target.addr, error = %e, "upstream connect failed");
            let counters = ctx
                .metrics
                .tcp(labels(&cluster, &pod.key, Some(&target), "UF"));
            counters.opened.fetch_add(1, Relaxed);
            counters.closed.fetch_add(1, Relaxed);
            return reset(client);
        }
    };
    let counters = ctx
        .metrics
        .tcp(labels(&cluster, &pod.key, Some(&target), "-"));
    drop(cluster);
    counters.opened.fetch_add(1, Relaxed);
    let mut client = client;
    let result = copy::bidirectional(&mut client, &mut upstream, &counters).await;
    counters.closed.fetch_add(1, Relaxed);
    if let Err(e) = result {
        // One side reset or failed: pass the reset on to both.
        debug!(pod = %pod.key, upstream = %target.addr, error = %e, "connection aborted");
        reset(client);
        reset(upstream);
    }
}

async fn connect(factory: &SocketFactory, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = factory.tcp_socket(addr).await?;
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Closes with RST rather than FIN, so that the app sees a refusal, not an
/// empty answer.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

fn labels(
    cluster: &Cluster,
    source: &WorkloadKey,
    target: Option<&Target>,
    flags: &'static str,
) -> TcpLabels {
    let peer = |key: Option<&WorkloadKey>| {
        key.and_then(|key| cluster.workload(key))
            .map_or_else(Peer::unknown, Peer::of)
    };
    let service = target.and_then(|t| t.service.as_ref());
    let unknown = || "unknown".to_owned();
    TcpLabels {
        reporter: "source",
        source: peer(Some(source)),
        destination: peer(target.and_then(|t| t.workload.as_ref())),
        destination_service: [
            service.map_or_else(unknown, |s| s.hostname.clone()),
            service.map_or_else(unknown, |s| s.name.clone()),
            service.map_or_else(unknown, |s| s.namespace.clone()),
        ],
        response_flags: flags,
    }
}
