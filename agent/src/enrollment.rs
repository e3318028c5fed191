//! Keeps the set of enrolled pods in step with the model.
//!
//! For each pod that should be enrolled on this node, the agent finds the
//! pod's network namespace by IP, starts the pod's socket factory, opens the
//! outbound (15001) and inbound (15006) listeners inside it, writes the pod
//! into the eBPF maps and attaches sk_lookup to its namespace. Only then do
//! the programs steer the pod's connections. A pod that goes away or is
//! unlabelled loses its map entries, its sk_lookup link and its listeners.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use weir_common::{Cidr4, INBOUND_PORT, InboundConfig, OUTBOUND_PORT, PodConfig};

use crate::datapath::InboundHook;
use crate::datapath::maps::{EnrolledMap, InboundPodMap, ListenerMap, ipv4_key};
use crate::inpod::{FoundNetns, NetnsFinder, SocketFactory, Source};
use crate::iptables;
use crate::model::{Cluster, Workload, WorkloadKey};
use crate::netns::NsId;
use crate::proxy::{PodProxy, ProxyContext, inbound, outbound};

/// An enrolled pod, as `/config_dump` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EnrolledPod {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    /// Names the pod's namespace for as long as the pod is enrolled.
    pub netns: PathBuf,
    pub found_by: Source,
    pub netns_cookie: u64,
    pub excluded_ports: Vec<u16>,
    pub excluded_cidrs: Vec<String>,
}

/// The maps enrollment writes. The metrics count their entries at scrape
/// time, so they are shared.
pub struct PodMaps {
    /// Outbound, by netns cookie.
    pub enrolled: EnrolledMap,
    pub listeners: ListenerMap<u64>,
    /// Inbound, by pod address.
    pub inbound_pods: InboundPodMap,
    pub inbound_listeners: ListenerMap<u32>,
}

impl PodMaps {
    /// Takes a pod out of both directions' maps. Its listeners leave the
    /// listener maps by themselves, when they close.
    fn forget(&mut self, netns_cookie: u64, ip4: u32) {
        let _ = self.enrolled.remove(netns_cookie);
        self.inbound_pods.remove(ip4);
    }
}

struct Enrolled {
    summary: EnrolledPod,
    /// Held open, so that `summary.netns` stays valid.
    netns: FoundNetns,
    ip: Ipv4Addr,
    outbound: PodConfig,
    inbound: InboundConfig,
    /// The outbound and inbound accept loops.
    serving: [JoinHandle<()>; 2],
}

impl Enrolled {
    fn ip4(&self) -> u32 {
        ipv4_key(self.ip)
    }
}

impl Drop for Enrolled {
    /// Ending the tasks drops the listeners; the kernel then drops them from
    /// the listener maps too.
    fn drop(&mut self) {
        for task in &self.serving {
            task.abort();
        }
    }
}

pub struct Enrollment {
    node: String,
    finder: NetnsFinder,
    ctx: Arc<ProxyContext>,
    maps: Arc<Mutex<PodMaps>>,
    hook: InboundHook,
    /// The agent's cgroup, when outbound interception is by iptables
    /// instead of connect4.
    iptables: Option<PathBuf>,
    pods: HashMap<WorkloadKey, Enrolled>,
    /// When each pod that still waits for enrollment was first wanted.
    waiting: HashMap<WorkloadKey, Instant>,
    summary: Arc<Mutex<Vec<EnrolledPod>>>,
}

impl Enrollment {
    pub fn new(
        node: String,
        finder: NetnsFinder,
        ctx: Arc<ProxyContext>,
        maps: Arc<Mutex<PodMaps>>,
        hook: InboundHook,
        iptables: Option<PathBuf>,
    ) -> Enrollment {
        Enrollment {
            node,
            finder,
            ctx,
            maps,
            hook,
            iptables,
            pods: HashMap::new(),
            waiting: HashMap::new(),
            summary: Arc::default(),
        }
    }

    /// The enrolled pods, for `/config_dump` and the metrics; updated after
    /// each pass.
    pub fn summary(&self) -> Arc<Mutex<Vec<EnrolledPod>>> {
        self.summary.clone()
    }

    /// One pass: enroll what is missing, update what changed, and remove
    /// what is no longer wanted, including entries an earlier agent left.
    /// Returns how many wanted pods are still waiting.
    pub async fn reconcile(&mut self, cluster: &Cluster) -> usize {
        let node = self.node.clone();
        self.finder
            .prune_hints(|key| cluster.workload(key).is_some());
        // A pod's address comes from the model, or, until the kubelet
        // reports it, from the CNI plugin.
        let wanted: HashMap<WorkloadKey, (&Workload, Ipv4Addr)> = cluster
            .enrolled_on(&node)
            .filter_map(|w| {
                let key = w.key();
                let ip = first_ipv4(w).or_else(|| self.finder.hinted_ipv4(&key))?;
                Some((key, (w, ip)))
            })
            .collect();

        let released: Vec<WorkloadKey> = self
            .pods
            .iter()
            .filter(|(key, pod)| {
                wanted
                    .get(*key)
                    .is_none_or(|(_, ip)| pod.summary.ip != IpAddr::V4(*ip))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in &released {
            self.release(key);
        }
        self.waiting.retain(|key, _| wanted.contains_key(key));

        // Namespaces the CNI plugin named come first. Then one scan per
        // pass, and only when a pod still needs its namespace: pods come
        // and go, and an address may move to a new namespace.
        let hinted: HashMap<&WorkloadKey, FoundNetns> = wanted
            .iter()
            .filter(|(key, _)| !self.pods.contains_key(*key))
            .filter_map(|(key, (_, ip))| Some((key, self.finder.hinted(key, IpAddr::V4(*ip))?)))
            .collect();
        let netns_by_ip = if wanted
            .keys()
            .any(|key| !self.pods.contains_key(key) && !hinted.contains_key(key))
        {
            self.finder.scan().unwrap_or_else(|e| {
                warn!(error = %e, "scanning network namespaces failed");
                HashMap::new()
            })
        } else {
            HashMap::new()
        };
        for (key, (workload, ip)) in &wanted {
            let (outbound, inbound) = (pod_config(workload), inbound_config(workload));
            if let Some(pod) = self.pods.get_mut(key) {
                if (pod.outbound, pod.inbound) != (outbound, inbound) {
                    pod.outbound = outbound;
                    pod.inbound = inbound;
                    pod.summary.excluded_ports = workload.excluded_ports.clone();
                    pod.summary.excluded_cidrs = workload
                        .excluded_cidrs
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    let updated = redirect_outbound(
                        self.iptables.as_deref(),
                        &self.maps,
                        pod.summary.netns_cookie,
                        &pod.netns.path(),
                        workload,
                        &outbound,
                    )
                    .and_then(|()| {
                        Ok(self
                            .maps
                            .lock()
                            .unwrap()
                            .inbound_pods
                            .insert(ipv4_key(*ip), &inbound)?)
                    });
                    if let Err(e) = updated {
                        warn!(pod = %key, error = %e, "updating exclusions failed");
                    }
                }
                continue;
            }
            let since = *self.waiting.entry(key.clone()).or_insert_with(Instant::now);
            let Some(netns) = hinted
                .get(key)
                .or_else(|| netns_by_ip.get(&IpAddr::V4(*ip)))
            else {
                continue;
            };
            match self
                .enroll(key, workload, *ip, netns, outbound, inbound)
                .await
            {
                Ok(pod) => {
                    info!(pod = %key, ip = %ip, netns = %pod.summary.netns.display(), found_by = ?netns.source(), took_ms = since.elapsed().as_millis() as u64, "enrolled");
                    self.waiting.remove(key);
                    self.pods.insert(key.clone(), pod);
                }
                Err(e) => warn!(pod = %key, error = %e, "enrollment failed; will retry"),
            }
        }

        // Entries an earlier agent left for pods that are gone. While a
        // wanted pod still waits, its old entry keeps its fail mode in force
        // until this agent takes it over, so pruning waits too.
        if self.waiting.is_empty() {
            let cookies: Vec<u64> = self.pods.values().map(|p| p.summary.netns_cookie).collect();
            let addresses: Vec<u32> = self.pods.values().map(Enrolled::ip4).collect();
            let mut maps = self.maps.lock().unwrap();
            for cookie in maps.enrolled.cookies() {
                if !cookies.contains(&cookie) {
                    let _ = maps.enrolled.remove(cookie);
                }
            }
            for ip4 in maps.inbound_pods.addresses() {
                if !addresses.contains(&ip4) {
                    maps.inbound_pods.remove(ip4);
                }
            }
            for cookie in self.hook.attached() {
                if !cookies.contains(&cookie) {
                    self.hook.detach(cookie);
                }
            }
        }

        let mut pods: Vec<_> = self.pods.values().map(|p| p.summary.clone()).collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        *self.summary.lock().unwrap() = pods;
        self.waiting.len()
    }

    /// Enrolls one pod whose namespace is `found`.
    async fn enroll(
        &mut self,
        key: &WorkloadKey,
        workload: &Workload,
        ip: Ipv4Addr,
        found: &FoundNetns,
        outbound: PodConfig,
        inbound: InboundConfig,
    ) -> anyhow::Result<Enrolled> {
        let netns = found.netns();
        let path = found.path();
        let factory = SocketFactory::start(netns, &workload.name)?;
        let cookie = factory.netns_cookie();
        let listen = |port| factory.listener(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        let outbound_listener = tokio::net::TcpListener::from_std(listen(OUTBOUND_PORT).await?)?;
        let inbound_listener = tokio::net::TcpListener::from_std(listen(INBOUND_PORT).await?)?;
        {
            let mut maps = self.maps.lock().unwrap();
            maps.listeners.insert(cookie, &outbound_listener)?;
            maps.inbound_listeners
                .insert(ipv4_key(ip), &inbound_listener)?;
            maps.inbound_pods.insert(ipv4_key(ip), &inbound)?;
        }
        redirect_outbound(
            self.iptables.as_deref(),
            &self.maps,
            cookie,
            &path,
            workload,
            &outbound,
        )?;
        self.hook.attach(netns.file(), cookie)?;
        let proxy = Arc::new(PodProxy {
            key: key.clone(),
            factory,
        });
        let serving = [
            tokio::spawn(outbound::serve(
                outbound_listener,
                proxy.clone(),
                self.ctx.clone(),
            )),
            tokio::spawn(inbound::serve(inbound_listener, proxy, self.ctx.clone())),
        ];
        Ok(Enrolled {
            summary: EnrolledPod {
                namespace: workload.namespace.clone(),
                name: workload.name.clone(),
                ip: IpAddr::V4(ip),
                netns: path,
                found_by: found.source(),
                netns_cookie: cookie,
                excluded_ports: workload.excluded_ports.clone(),
                excluded_cidrs: workload
                    .excluded_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            },
            netns: found.clone(),
            ip,
            outbound,
            inbound,
            serving,
        })
    }

    /// Takes a pod out of the maps and closes its listeners.
    fn release(&mut self, key: &WorkloadKey) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        info!(pod = %key, "unenrolled");
        self.maps
            .lock()
            .unwrap()
            .forget(pod.summary.netns_cookie, pod.ip4());
        self.hook.detach(pod.summary.netns_cookie);
        if self.iptables.is_some() {
            // The pod may be gone already, and its rules with it. `pod`
            // still holds the namespace, so its path is still valid.
            let _ = iptables::remove(&pod.netns.path());
        }
    }

    /// Records the CNI plugin's word that the pod's sandbox `container_id`
    /// has its namespace at `netns` and holds `ips`. The next pass uses it
    /// before scanning. A pod enrolled in another namespace has had its
    /// sandbox made again, and is released so that the pass enrolls it anew.
    pub fn hint(
        &mut self,
        key: &WorkloadKey,
        container_id: &str,
        netns: &Path,
        ips: Vec<IpAddr>,
    ) -> std::io::Result<()> {
        let id: NsId = self
            .finder
            .hint(key.clone(), container_id.to_owned(), netns, ips)?;
        if self.pods.get(key).is_some_and(|pod| pod.netns.id() != id) {
            self.release(key);
        }
        Ok(())
    }

    /// Forgets a hint: the sandbox `container_id` is going away.
    pub fn unhint(&mut self, key: &WorkloadKey, container_id: &str) {
        self.finder.unhint(key, container_id);
    }

    pub fn is_enrolled(&self, key: &WorkloadKey) -> bool {
        self.pods.contains_key(key)
    }

    /// Closes every listener but keeps the pods in the enrolled map, so that
    /// while no agent runs the fail mode applies to them.
    pub fn stop_listening(&mut self) {
        self.pods.clear();
    }
}

fn first_ipv4(workload: &Workload) -> Option<Ipv4Addr> {
    workload.ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

/// Starts redirecting a pod's outbound connections, or updates its
/// exclusions: in the map connect4 reads, or in the pod's nat table when
/// `iptables` holds the agent's cgroup.
fn redirect_outbound(
    iptables: Option<&Path>,
    maps: &Mutex<PodMaps>,
    cookie: u64,
    netns: &Path,
    workload: &Workload,
    config: &PodConfig,
) -> anyhow::Result<()> {
    match iptables {
        Some(agent_cgroup) => iptables::redirect_outbound(netns, agent_cgroup, workload)?,
        None => maps.lock().unwrap().enrolled.insert(cookie, config)?,
    }
    Ok(())
}

/// Copies `ports` into a map entry's fixed slots and returns how many.
fn fill_ports(slots: &mut [u16], ports: &[u16]) -> u32 {
    let n = slots.len().min(ports.len());
    slots[..n].copy_from_slice(&ports[..n]);
    n as u32
}

/// The eBPF view of a pod's inbound exclusions.
fn inbound_config(workload: &Workload) -> InboundConfig {
    let mut config = InboundConfig::default();
    config.n_excluded_ports =
        fill_ports(&mut config.excluded_ports, &workload.excluded_inbound_ports);
    config
}

/// The eBPF view of a pod's exclusions. Only IPv4 CIDRs matter: native IPv6
/// is never redirected. The model caps the counts at the map's sizes.
fn pod_config(workload: &Workload) -> PodConfig {
    let mut config = PodConfig::default();
    config.n_excluded_ports = fill_ports(&mut config.excluded_ports, &workload.excluded_ports);
    let cidrs = workload.excluded_cidrs.iter().filter_map(|net| match net {
        ipnet::IpNet::V4(v4) => Some(Cidr4 {
            addr: u32::from(v4.network()).to_be(),
            mask: u32::from(v4.netmask()).to_be(),
        }),
        ipnet::IpNet::V6(_) => None,
    });
    for (slot, cidr) in config.excluded_cidrs.iter_mut().zip(cidrs) {
        *slot = cidr;
        config.n_excluded_cidrs += 1;
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::objects::parse_file;

    #[test]
    fn exclusions_become_network_order_map_entries() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: default
  labels: {weir.dev/mesh: enabled}
  annotations:
    weir.dev/exclude-outbound-ports: "5432, 6379"
    weir.dev/exclude-outbound-cidrs: "10.1.0.0/16,fd00::/8"
spec: {nodeName: n, containers: [{name: c, image: i}]}
status: {podIP: 10.244.0.2}
"#;
        let parsed = parse_file(std::path::Path::new("p.yaml"), text).unwrap();
        let cluster = Cluster::build(&parsed.objects);
        let config = pod_config(&cluster.workloads()[0]);
        assert_eq!(config.n_excluded_ports, 2);
        assert_eq!(&config.excluded_ports[..2], &[5432, 6379]);
        // Only the IPv4 CIDR reaches the map.
        assert_eq!(config.n_excluded_cidrs, 1);
        let cidr = config.excluded_cidrs[0];
        assert_eq!(cidr.addr.to_ne_bytes(), [10, 1, 0, 0]);
        assert_eq!(cidr.mask.to_ne_bytes(), [255, 255, 0, 0]);
    }
}
