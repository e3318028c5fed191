//! Inbound: connections to an enrolled pod, handed by sk_lookup to the pod's
//! listener on 127.0.0.1:15006.
//!
//! The accepted socket's local address is the original destination. The
//! proxy delivers the connection to the app from a socket bound to
//! 127.0.0.6, which sk_lookup lets through, as Istio's sidecar does; the app
//! therefore sees 127.0.0.6 as its peer.
//!
//! Here the pod's AuthorizationPolicies are authoritative. A connection they
//! deny is reset before the app sees it, and a live connection that a policy
//! change denies is closed, as ztunnel does.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;
use weir_common::INBOUND_DELIVERY_IP;

use super::destination::ServiceName;
use super::{PodProxy, ProxyContext, connect, labels, refuse, relay, reset};
use crate::metrics::Reporter;

/// Serves the pod's inbound listener.
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>, ctx: Arc<ProxyContext>) {
    super::serve(listener, pod, ctx, |client, peer, pod, ctx| async move {
        handle(client, peer, &pod, &ctx).await;
    })
    .await;
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: &PodProxy, ctx: &ProxyContext) {
    let Ok(orig) = client.local_addr() else {
        return reset(client);
    };
    let cluster = ctx.cluster.borrow().clone();
    let Some(workload) = cluster.workload(&pod.key) else {
        return reset(client);
    };
    // Plaintext mode: the source is whoever holds the source address.
    let source = cluster.workload_by_ip(peer.ip()).map(|w| w.key());
    let service = ServiceName::with_endpoint(&cluster, orig);
    let labelled = |flags| {
        labels(
            Reporter::Destination,
            &cluster,
            source.as_ref(),
            Some(&pod.key),
            service.as_ref(),
            flags,
        )
    };
    if !ctx.authorizer.is_probe(peer.ip(), workload, orig.port()) {
        let verdict = ctx.authorizer.check(&cluster, peer.ip(), workload, orig);
        ctx.authorizer
            .record("inbound", &verdict, peer.ip(), workload, orig);
        if !verdict.allowed {
            return refuse(&ctx.metrics, labelled("DENY"), client);
        }
    }
    let delivery = IpAddr::from(INBOUND_DELIVERY_IP);
    let (app, registered) = match connect(
        &pod.factory,
        orig,
        Some(delivery),
        ctx.flows.as_ref().map(|fast| &fast.table),
    )
    .await
    {
        Ok(connected) => connected,
        Err(e) => {
            debug!(pod = %pod.key, %orig, error = %e, "delivery to the app failed");
            return refuse(&ctx.metrics, labelled("UF"), client);
        }
    };
    let counters = ctx.metrics.tcp(labelled("-"));
    drop(cluster);
    counters.opened.fetch_add(1, Relaxed);
    let revoked = async {
        revoked(ctx, peer.ip(), pod, orig).await;
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a policy change denies the connection",
        )
    };
    let outcome = relay(ctx, &client, &app, registered, &counters, revoked).await;
    counters.closed.fetch_add(1, Relaxed);
    if let Err(e) = outcome {
        debug!(pod = %pod.key, %orig, error = %e, "connection aborted");
        reset(client);
        reset(app);
    }
}

/// Resolves when a change of policies or pods denies a live connection.
async fn revoked(ctx: &ProxyContext, source: IpAddr, pod: &PodProxy, destination: SocketAddr) {
    let mut changes = ctx.cluster.clone();
    while changes.changed().await.is_ok() {
        let cluster = changes.borrow_and_update().clone();
        let Some(workload) = cluster.workload(&pod.key) else {
            continue;
        };
        if ctx
            .authorizer
            .is_probe(source, workload, destination.port())
        {
            continue;
        }
        let verdict = ctx
            .authorizer
            .check(&cluster, source, workload, destination);
        if !verdict.allowed {
            ctx.authorizer
                .record("inbound", &verdict, source, workload, destination);
            return;
        }
    }
    // The manifest source is gone; the agent is stopping.
    std::future::pending().await
}
