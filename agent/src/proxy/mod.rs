//! The node proxy: one outbound and one inbound listener per enrolled pod,
//! all served by the agent's tokio runtime.

mod authorize;
mod copy;
mod destination;
mod fast_path;
mod http;
pub mod inbound;
pub mod outbound;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::datapath::maps::{DenyCache, FlowTable, OrigDstMap};
use crate::inpod::SocketFactory;
use crate::metrics::{Metrics, Peer, Reporter, TcpLabels};
use crate::model::{Cluster, WorkloadKey};
use crate::run::Interception;

pub use authorize::Authorizer;
pub use destination::Balancer;
use destination::ServiceName;
pub use fast_path::FastPath;
pub use http::{drain as drain_http, forget_other_pods as forget_http_state_of_others};

/// Istio's default connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler shares.
pub struct ProxyContext {
    pub cluster: watch::Receiver<Arc<Cluster>>,
    pub orig_dst: Mutex<OrigDstMap>,
    pub metrics: Arc<Metrics>,
    pub balancer: Balancer,
    /// Accepted connections with no original destination: evicted, or a
    /// direct connection to the listener.
    pub orig_dst_misses: AtomicU64,
    pub connections: Arc<Connections>,
    pub authorizer: Authorizer,
    /// Denials connect4 enforces in the kernel, valid for one generation.
    pub deny_cache: Mutex<DenyCache>,
    /// The policy generation, bumped on every change of the model after the
    /// kernel's copy in SETTINGS; see `outbound`.
    pub generation: AtomicU64,
    pub interception: Interception,
    /// The kernel-carried flows; None when the fast path is off.
    pub flows: Option<FastPath>,
}

/// One enrolled pod as the proxy sees it.
pub struct PodProxy {
    pub key: WorkloadKey,
    pub factory: SocketFactory,
}

/// Accepts connections on one of a pod's listeners and hands each to
/// `handle` on its own task, until the listener's task is aborted.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodProxy>,
    ctx: Arc<ProxyContext>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodProxy>, Arc<ProxyContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let guard = ctx.connections.open();
                let connection = handle(client, peer, pod.clone(), ctx.clone());
                tokio::spawn(async move {
                    connection.await;
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

/// Connects from the pod's namespace, from `source` when given. With
/// `flows`, the socket is registered for the kernel's fast path first, and
/// its cookie comes back with it.
async fn connect(
    factory: &SocketFactory,
    addr: SocketAddr,
    source: Option<IpAddr>,
    flows: Option<&FlowTable>,
) -> io::Result<(TcpStream, Option<u64>)> {
    let socket = factory.tcp_socket(addr, source).await?;
    let registered = flows.and_then(|flows| {
        let cookie = fast_path::cookie(&socket).ok()?;
        flows.register(cookie).ok()?;
        Some(cookie)
    });
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        .and_then(|connected| connected);
    match connected {
        Ok(stream) => Ok((stream, registered)),
        Err(e) => {
            if let (Some(flows), Some(cookie)) = (flows, registered) {
                flows.forget(cookie);
            }
            Err(e)
        }
    }
}

/// Copies both ways, through the kernel's fast path when the upstream
/// socket was registered for it, and counts every byte under `counters`;
/// `abort` ends the connection early with its error.
async fn relay(
    ctx: &ProxyContext,
    client: &TcpStream,
    upstream: &TcpStream,
    registered: Option<u64>,
    counters: &Arc<crate::metrics::TcpCounters>,
    abort: impl Future<Output = io::Error>,
) -> io::Result<()> {
    let flow = ctx
        .flows
        .as_ref()
        .zip(registered)
        .and_then(|(fast, cookie)| fast_path::Flow::arm(fast, client, cookie, counters.clone()));
    let result = tokio::select! {
        copied = copy::bidirectional(
            client,
            upstream,
            counters,
            flow.as_ref(),
            ctx.flows.is_none(),
        ) => copied,
        e = abort => Err(e),
    };
    if let Some(flow) = flow {
        flow.finish(&ctx.metrics);
    } else if let (Some(fast), Some(cookie)) = (&ctx.flows, registered) {
        fast.table.forget(cookie);
    }
    result
}

/// Refuses a connection that the proxy answers itself (denied, no upstream,
/// upstream failed): counted as opened and closed under `labels`, then reset.
fn refuse(metrics: &Metrics, labels: TcpLabels, client: TcpStream) {
    let counters = metrics.tcp(labels);
    counters.opened.fetch_add(1, Relaxed);
    counters.closed.fetch_add(1, Relaxed);
    reset(client);
}

/// Closes with RST rather than FIN, so that the app sees a refusal, not an
/// empty answer.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Istio's labels for one connection; what is not known is `unknown`.
fn labels(
    reporter: Reporter,
    cluster: &Cluster,
    source: Option<&WorkloadKey>,
    destination: Option<&WorkloadKey>,
    service: Option<&ServiceName>,
    response_flags: &'static str,
) -> TcpLabels {
    let peer = |key: Option<&WorkloadKey>| {
        key.and_then(|key| cluster.workload(key))
            .map_or_else(Peer::unknown, Peer::of)
    };
    let unknown = || "unknown".to_owned();
    TcpLabels {
        reporter,
        source: peer(source),
        destination: peer(destination),
        destination_service: [
            service.map_or_else(unknown, |s| s.hostname.clone()),
            service.map_or_else(unknown, |s| s.name.clone()),
            service.map_or_else(unknown, |s| s.namespace.clone()),
        ],
        response_flags,
    }
}

/// Counts live connections, so that a draining agent knows when it is done.
#[derive(Default)]
pub struct Connections {
    live: AtomicUsize,
    idle: Notify,
}

impl Connections {
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.live.fetch_add(1, Relaxed);
        ConnectionGuard(self.clone())
    }

    pub fn live(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// Resolves once no connection is live.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
