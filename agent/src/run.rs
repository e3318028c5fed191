//! `weir run`: the agent's life from attach to drain.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};
use weir_common::{
    DENY_CACHE_ENTRIES, Decision, Direction, FAIL_CLOSED, FAIL_OPEN, MAX_ENROLLED_PODS,
    ORIG_DST_ENTRIES, Settings,
};

use crate::admin::{self, AgentView, Endpoint};
use crate::cgroup;
use crate::cni::Cni;
use crate::datapath::maps::{DecisionCounters, SettingsMap, SocketMap};
use crate::datapath::{Datapath, PinDir};
use crate::enrollment::{EnrolledPod, Enrollment, PodMaps};
use crate::inpod::{self, NetnsFinder};
use crate::metrics::{DatapathStats, Metrics};
use crate::model::{self, BuildOptions, Cluster, ModelWatch};
use crate::proxy::{
    Authorizer, Balancer, Connections, FastPath, ProxyContext, forget_http_state_of_others,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    /// Pods connect directly, unmeshed.
    Open,
    /// Pods' connections are refused.
    Closed,
}

/// How enrolled pods' outbound connections reach the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Interception {
    /// cgroup/connect4 and connect6 rewrite the destination.
    Ebpf,
    /// An iptables REDIRECT in each pod's namespace, for kernels without
    /// the cgroup hooks.
    Iptables,
}

/// Where the agent's model comes from.
#[derive(Debug)]
pub enum ModelSource {
    /// A directory (or file) of manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API, with this kubeconfig or the one kube-rs infers.
    Kube { kubeconfig: Option<PathBuf> },
}

#[derive(Debug)]
pub struct RunConfig {
    pub node: String,
    pub source: ModelSource,
    pub build: BuildOptions,
    pub cgroup: Option<PathBuf>,
    pub netns_dir: PathBuf,
    /// Where the CNI plugin reaches the agent; no server without it.
    pub cni_socket: Option<PathBuf>,
    pub fail_mode: FailMode,
    pub interception: Interception,
    /// Let the kernel carry established flows (sockmap); eBPF interception
    /// only.
    pub fast_path: bool,
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub drain: Duration,
    /// AuthorizationPolicies here apply mesh-wide.
    pub root_namespace: String,
    pub trust_domain: String,
}

/// How often pods that wait for their namespace are looked for again.
const RETRY: Duration = Duration::from_secs(1);

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    raise_nofile_limit();
    let mount = cgroup::cgroup2_mount().context("finding the cgroup2 mount")?;
    let cgroup = config.cgroup.clone().unwrap_or_else(|| mount.clone());
    let own_cgroup = cgroup::own_cgroup()?;
    let own = mount.join(&own_cgroup);
    let fast_path = config.fast_path && config.interception == Interception::Ebpf;
    let settings = Settings {
        agent_cgroup_id: cgroup::cgroup_id(&own)
            .with_context(|| format!("reading {}", own.display()))?,
        fail_mode: match config.fail_mode {
            FailMode::Open => FAIL_OPEN,
            FailMode::Closed => FAIL_CLOSED,
        },
        fast_path: u32::from(fast_path),
        ..Settings::default()
    };
    let pins = PinDir::for_node(&config.node);
    let (datapath, start) = Datapath::open(&pins, &cgroup, settings)
        .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
    info!(node = %config.node, cgroup = %cgroup.display(), ?start, fail_mode = ?config.fail_mode, interception = ?config.interception, "programs attached");

    let model = match &config.source {
        ModelSource::Manifests(path) => model::manifests::watch(path.clone(), config.build)
            .with_context(|| format!("loading manifests from {}", path.display()))?,
        ModelSource::Kube { kubeconfig } => {
            let client = model::kube::client(kubeconfig.as_deref()).await?;
            model::kube::watch(client, config.build)
        }
    };
    let mut clusters = model.subscribe();
    // The proxies see each model only after the kernel's cached denials of
    // the previous one are void: this loop republishes it after the bump.
    let mut maps = datapath.maps;
    let (published, proxy_view) = watch::channel(clusters.borrow_and_update().clone());
    let generation = next_generation(&mut maps.settings)?;
    let node_ips = inpod::addresses().context("reading this node's addresses")?;
    let ctx = Arc::new(ProxyContext {
        cluster: proxy_view,
        orig_dst: Mutex::new(maps.orig_dst),
        metrics: Arc::new(Metrics::default()),
        balancer: Balancer::default(),
        orig_dst_misses: Default::default(),
        connections: Arc::new(Connections::default()),
        authorizer: Authorizer::new(
            config.root_namespace.clone(),
            config.trust_domain.clone(),
            node_ips,
        ),
        deny_cache: Mutex::new(maps.deny_cache),
        generation: AtomicU64::new(generation),
        interception: config.interception,
        flows: fast_path.then(|| FastPath::new(maps.flows)),
    });
    // Kept open while the agent runs; the verdict is attached to it.
    let flow_sockets = maps.flow_sockets;
    if let Some(fast) = &ctx.flows {
        let swept = fast.table.sweep(&flow_sockets);
        if swept > 0 {
            info!(swept, "forgot the fast-path records of closed sockets");
        }
    }
    let pod_maps = Arc::new(Mutex::new(PodMaps {
        enrolled: maps.enrolled,
        listeners: maps.listeners,
        inbound_pods: maps.inbound_pods,
        inbound_listeners: maps.inbound_listeners,
    }));
    let mut enrollment = Enrollment::new(
        config.node.clone(),
        NetnsFinder::new(config.netns_dir.clone()),
        ctx.clone(),
        pod_maps.clone(),
        datapath.inbound,
        (config.interception == Interception::Iptables).then_some(own_cgroup),
    );
    let agent = Arc::new(Agent {
        node: config.node.clone(),
        ctx: ctx.clone(),
        enrolled: enrollment.summary(),
        pod_maps,
        sockets: maps.sockets,
        decisions: maps.decisions,
        ready: AtomicBool::new(false),
        model,
    });
    for (endpoint, addr) in [
        (Endpoint::Metrics, config.metrics_addr),
        (Endpoint::Health, config.health_addr),
        (Endpoint::Admin, config.admin_addr),
    ] {
        let view: Arc<dyn AgentView> = agent.clone();
        let listener = admin::bind(addr)
            .await
            .with_context(|| format!("binding {endpoint:?} on {addr}"))?;
        tokio::spawn(async move {
            if let Err(e) = admin::serve(endpoint, listener, view).await {
                warn!(?endpoint, error = %e, "endpoint stopped");
            }
        });
    }

    let mut cni = match &config.cni_socket {
        Some(path) => Cni::listen(path, config.node.clone())
            .with_context(|| format!("listening for the CNI plugin on {}", path.display()))?,
        None => Cni::disabled(config.node.clone()),
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // Acting on a partial view would release pods that are still wanted.
    tokio::select! {
        () = agent.model.synced() => {}
        _ = sigterm.recv() => return Ok(()),
        _ = sigint.recv() => return Ok(()),
    }
    let mut retry = tokio::time::interval(RETRY);
    loop {
        let cluster = clusters.borrow_and_update().clone();
        if !Arc::ptr_eq(&cluster, &published.borrow()) {
            ctx.generation
                .store(next_generation(&mut maps.settings)?, Relaxed);
            published.send_replace(cluster.clone());
        }
        let waiting = enrollment.reconcile(&cluster).await;
        cni.settle(&cluster, &enrollment);
        ctx.metrics.retain_known(&cluster);
        let enrolled: HashSet<u64> = agent
            .enrolled
            .lock()
            .unwrap()
            .iter()
            .map(|pod| pod.netns_cookie)
            .collect();
        forget_http_state_of_others(&enrolled);
        if !agent.ready.swap(true, Relaxed) {
            info!(
                enrolled = agent.enrolled.lock().unwrap().len(),
                waiting, "ready"
            );
        }
        tokio::select! {
            changed = clusters.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the model source stopped");
                }
            }
            _ = retry.tick(), if waiting > 0 => {}
            event = cni.next() => cni.handle(event, &mut enrollment),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    drop(cni);
    // Drain: stop accepting, let live connections finish, keep the pins so
    // that the next agent takes over the same programs and links.
    agent.ready.store(false, Relaxed);
    enrollment.stop_listening();
    crate::proxy::drain_http();
    let live = ctx.connections.live();
    info!(live, drain = ?config.drain, "draining");
    if tokio::time::timeout(config.drain, ctx.connections.idle())
        .await
        .is_err()
    {
        warn!(live = ctx.connections.live(), "drain timed out");
    }
    info!("stopped; programs and maps stay pinned");
    Ok(())
}

/// The running agent as its HTTP endpoints see it.
struct Agent {
    node: String,
    ctx: Arc<ProxyContext>,
    enrolled: Arc<Mutex<Vec<EnrolledPod>>>,
    pod_maps: Arc<Mutex<PodMaps>>,
    sockets: SocketMap,
    decisions: DecisionCounters,
    ready: AtomicBool,
    model: ModelWatch,
}

impl Agent {
    fn stats(&self) -> DatapathStats {
        let mut decisions = Vec::new();
        for direction in Direction::ALL {
            for decision in Decision::ALL {
                let mut count = match self.decisions.total(direction, decision) {
                    Ok(count) => count,
                    Err(e) => {
                        warn!(error = %e, "reading decision counters failed");
                        continue;
                    }
                };
                // A miss is found in user space, when the proxy accepts.
                if (direction, decision) == (Direction::Outbound, Decision::OrigDstMiss) {
                    count += self.ctx.orig_dst_misses.load(Relaxed);
                }
                decisions.push((direction.name(), decision.name(), count));
            }
        }
        let (enrolled, listeners, inbound_pods, inbound_listeners) = {
            let maps = self.pod_maps.lock().unwrap();
            (
                maps.enrolled.entries(),
                maps.listeners.entries(),
                maps.inbound_pods.entries(),
                maps.inbound_listeners.entries(),
            )
        };
        let orig_dst = self.ctx.orig_dst.lock().unwrap().entries();
        DatapathStats {
            decisions,
            maps: vec![
                ("ENROLLED", enrolled, MAX_ENROLLED_PODS),
                ("LISTENERS", listeners, MAX_ENROLLED_PODS),
                ("INBOUND_PODS", inbound_pods, MAX_ENROLLED_PODS),
                ("INBOUND_LISTENERS", inbound_listeners, MAX_ENROLLED_PODS),
                ("ORIG_DST", orig_dst, ORIG_DST_ENTRIES),
                ("SOCKETS", self.sockets.entries(), ORIG_DST_ENTRIES),
                (
                    "DENY_CACHE",
                    self.ctx.deny_cache.lock().unwrap().entries(),
                    DENY_CACHE_ENTRIES,
                ),
            ],
            policy_denials: self.ctx.authorizer.denials(),
            config_rejected: self.model.rejected(),
            enrolled_pods: self.enrolled.lock().unwrap().len(),
        }
    }
}

impl AgentView for Agent {
    fn metrics(&self) -> String {
        if let Some(fast) = &self.ctx.flows {
            fast.report(&self.ctx.metrics);
        }
        self.ctx.metrics.render(&self.stats())
    }

    fn ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    fn config_dump(&self) -> serde_json::Value {
        let cluster: Arc<Cluster> = self.ctx.cluster.borrow().clone();
        let root = &self.ctx.authorizer.root_namespace;
        // The policies in force for each workload of this node.
        let policies: serde_json::Map<String, serde_json::Value> = cluster
            .workloads()
            .iter()
            .filter(|w| w.enrolled && w.node.as_deref() == Some(self.node.as_str()))
            .map(|w| {
                let keys: Vec<String> = cluster
                    .policies_for(w, root)
                    .iter()
                    .map(|p| p.key())
                    .collect();
                (w.key().to_string(), keys.into())
            })
            .collect();
        serde_json::json!({
            "node": self.node,
            "enrolled": *self.enrolled.lock().unwrap(),
            "policies_in_force": policies,
            "cluster": *cluster,
        })
    }
}

/// Any change of the model may change a policy verdict, so each one starts a
/// new generation: denials cached in older ones no longer count.
fn next_generation(settings: &mut SettingsMap) -> anyhow::Result<u64> {
    let mut current = settings.get()?;
    current.policy_generation += 1;
    settings.set(current)?;
    Ok(current.policy_generation)
}

/// Every proxied connection costs two descriptors; the default soft limit
/// of 1024 would cap the node at ~500 connections.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANT: u64 = 1 << 20;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let target = WANT.max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((now, _)) = getrlimit(Resource::RLIMIT_NOFILE)
        && now != soft
    {
        info!(from = soft, to = now, "raised RLIMIT_NOFILE");
    }
}
