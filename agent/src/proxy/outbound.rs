//! Outbound: connections an enrolled pod's app made, redirected by connect4/6
//! to the pod's listener on 127.0.0.1:15001.
//!
//! The accepting listener says which pod the connection came from; the
//! original destination comes from the eBPF map, keyed by the pod's netns
//! cookie and the client's port. The upstream socket is made in the same pod
//! namespace, so the server sees the pod's own IP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;
use weir_common::{ConnKey, DenyKey, OUTBOUND_PORT};

use super::destination::Target;
use super::{PodProxy, ProxyContext, connect, labels, refuse, relay, reset};
use crate::datapath::maps::ipv4_key;
use crate::iptables;
use crate::metrics::{Reporter, TcpLabels};
use crate::model::{Cluster, Workload, WorkloadKey};
use crate::policy::Verdict;
use crate::run::Interception;

/// The agent's own ports. A connection aimed at one of them would loop back
/// into the agent, so it is refused: the listeners are no open relay.
const AGENT_PORTS: [u16; 6] = [15000, 15001, 15006, 15008, 15020, 15021];

/// Serves the pod's outbound listener.
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>, ctx: Arc<ProxyContext>) {
    super::serve(listener, pod, ctx, |client, peer, pod, ctx| async move {
        handle(client, peer, &pod, &ctx).await;
    })
    .await;
}

/// Where the app meant to connect: recorded by connect4/6, or kept by
/// netfilter in the iptables fallback.
fn original_destination(
    client: &TcpStream,
    peer: SocketAddr,
    pod: &PodProxy,
    ctx: &ProxyContext,
) -> Option<SocketAddr> {
    if ctx.interception == Interception::Iptables {
        return iptables::original_dst(client)
            .ok()
            .filter(|orig| orig.port() != OUTBOUND_PORT);
    }
    let key = ConnKey {
        netns_cookie: pod.factory.netns_cookie(),
        port: peer.port(),
        _pad: [0; 6],
    };
    let orig = ctx.orig_dst.lock().unwrap().take(key)?;
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(orig.ip4)),
        u16::from_be(orig.port),
    )))
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: &Arc<PodProxy>, ctx: &Arc<ProxyContext>) {
    let Some(orig) = original_destination(&client, peer, pod, ctx) else {
        ctx.orig_dst_misses.fetch_add(1, Relaxed);
        debug!(pod = %pod.key, %peer, "no original destination; refused");
        return reset(client);
    };
    if AGENT_PORTS.contains(&orig.port()) {
        debug!(pod = %pod.key, %orig, "aimed at an agent port; refused");
        return reset(client);
    }
    // The generation is read before the model: a denial cached from this
    // model is then at worst one generation old, and ignored, never newer.
    let generation = ctx.generation.load(Relaxed);
    let cluster = ctx.cluster.borrow().clone();
    // A Service port declared HTTP: served request by request, with routes.
    if let Some((host, port)) = super::http::http_service(&cluster, orig) {
        drop(cluster);
        return super::http::serve(client, pod.clone(), ctx.clone(), host, port).await;
    }
    let target = match ctx.balancer.resolve(&cluster, orig) {
        Ok(target) => target,
        Err(e) => {
            debug!(pod = %pod.key, %orig, error = %e, "no upstream");
            let labels = outbound_labels(&cluster, &pod.key, None, "UH");
            return refuse(&ctx.metrics, labels, client);
        }
    };
    if let Some(source) = cluster.workload(&pod.key)
        && let Some((verdict, destination)) = early_verdict(&cluster, ctx, source, &target)
        && !verdict.allowed
    {
        ctx.authorizer.record(
            "outbound",
            &verdict,
            pod_ip(source),
            destination,
            target.addr,
        );
        if denied_everywhere(&cluster, ctx, source, orig, &target) {
            cache_denial(ctx, pod, orig, generation);
        }
        let labels = outbound_labels(&cluster, &pod.key, Some(&target), "DENY");
        return refuse(&ctx.metrics, labels, client);
    }
    let (upstream, registered) = match connect(
        &pod.factory,
        target.addr,
        None,
        ctx.flows.as_ref().map(|fast| &fast.table),
    )
    .await
    {
        Ok(connected) => connected,
        Err(e) => {
            debug!(pod = %pod.key, upstream = %target.addr, error = %e, "upstream connect failed");
            let labels = outbound_labels(&cluster, &pod.key, Some(&target), "UF");
            return refuse(&ctx.metrics, labels, client);
        }
    };
    let counters = ctx
        .metrics
        .tcp(outbound_labels(&cluster, &pod.key, Some(&target), "-"));
    drop(cluster);
    counters.opened.fetch_add(1, Relaxed);
    let result = relay(
        ctx,
        &client,
        &upstream,
        registered,
        &counters,
        std::future::pending(),
    )
    .await;
    counters.closed.fetch_add(1, Relaxed);
    if let Err(e) = result {
        // One side reset or failed: pass the reset on to both.
        debug!(pod = %pod.key, upstream = %target.addr, error = %e, "connection aborted");
        reset(client);
        reset(upstream);
    }
}

fn pod_ip(workload: &Workload) -> IpAddr {
    workload
        .ips
        .first()
        .copied()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// The destination's own verdict, when the destination is an enrolled pod:
/// asked here so that a denied connection never leaves the node. The
/// destination's inbound check stays authoritative.
fn early_verdict<'c>(
    cluster: &'c Cluster,
    ctx: &ProxyContext,
    source: &Workload,
    target: &Target,
) -> Option<(Verdict, &'c Workload)> {
    let destination = cluster.workload(target.workload.as_ref()?)?;
    if !destination.enrolled {
        return None;
    }
    let verdict = ctx
        .authorizer
        .check(cluster, pod_ip(source), destination, target.addr);
    Some((verdict, destination))
}

/// Whether every endpoint behind `orig` denies `source`: only then may the
/// kernel refuse the destination outright. A ClusterIP whose endpoints
/// answer differently is never cached.
fn denied_everywhere(
    cluster: &Cluster,
    ctx: &ProxyContext,
    source: &Workload,
    orig: SocketAddr,
    target: &Target,
) -> bool {
    let Some((_, port)) = cluster.service_by_ip_port(orig.ip(), orig.port()) else {
        return true;
    };
    port.endpoints.iter().filter(|e| e.ready).all(|endpoint| {
        let target = Target {
            addr: SocketAddr::new(endpoint.ip, endpoint.port),
            service: target.service.clone(),
            workload: endpoint.workload.clone(),
        };
        early_verdict(cluster, ctx, source, &target).is_some_and(|(v, _)| !v.allowed)
    })
}

/// Lets connect4 refuse this destination from this pod with EPERM, until
/// the model next changes.
fn cache_denial(ctx: &ProxyContext, pod: &PodProxy, orig: SocketAddr, generation: u64) {
    let IpAddr::V4(ip) = orig.ip() else {
        return;
    };
    let key = DenyKey {
        netns_cookie: pod.factory.netns_cookie(),
        ip4: ipv4_key(ip),
        port: orig.port(),
        _pad: 0,
    };
    if let Err(e) = ctx.deny_cache.lock().unwrap().insert(key, generation) {
        debug!(pod = %pod.key, %orig, error = %e, "caching a denial failed");
    }
}

fn outbound_labels(
    cluster: &Cluster,
    source: &WorkloadKey,
    target: Option<&Target>,
    flags: &'static str,
) -> TcpLabels {
    labels(
        Reporter::Source,
        cluster,
        Some(source),
        target.and_then(|t| t.workload.as_ref()),
        target.and_then(|t| t.service.as_ref()),
        flags,
    )
}
