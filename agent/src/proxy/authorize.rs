//! Authorization of one connection to an enrolled pod, by the pod's
//! AuthorizationPolicies. The inbound side is authoritative; the outbound
//! side asks the same question early, so that a denied connection never
//! leaves the client's node.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use tracing::{info, warn};

use crate::model::{Cluster, Workload};
use crate::policy::{self, Destination, Source, Verdict};

/// Node-wide policy settings, and the denial counts for the metrics.
#[derive(Debug)]
pub struct Authorizer {
    /// Policies here apply to every namespace.
    pub root_namespace: String,
    pub trust_domain: String,
    /// This node's addresses: kubelet probes come from one of them.
    pub node_ips: Vec<IpAddr>,
    /// Denials by (direction, policy); "none" when no ALLOW policy matched.
    denied: Mutex<HashMap<(&'static str, String), u64>>,
}

impl Authorizer {
    pub fn new(root_namespace: String, trust_domain: String, node_ips: Vec<IpAddr>) -> Authorizer {
        Authorizer {
            root_namespace,
            trust_domain,
            node_ips,
            denied: Mutex::default(),
        }
    }

    /// The verdict on a connection from `source` to `workload` at
    /// `destination` (the pod's own address and port).
    pub fn check(
        &self,
        cluster: &Cluster,
        source: IpAddr,
        workload: &Workload,
        destination: SocketAddr,
    ) -> Verdict {
        let policies = cluster.policies_for(workload, &self.root_namespace);
        policy::evaluate(
            &policies,
            &Source::at(source, cluster),
            &Destination {
                ip: destination.ip(),
                port: destination.port(),
            },
            &self.trust_domain,
        )
    }

    /// Kubelet probes: the node reaching one of the pod's probe ports passes
    /// whatever the policy says. Anyone else on that port is judged.
    pub fn is_probe(&self, source: IpAddr, workload: &Workload, port: u16) -> bool {
        self.node_ips.contains(&source) && workload.probe_ports.contains(&port)
    }

    /// Logs the audits and, for a denial, the denial; counts denials.
    pub fn record(
        &self,
        direction: &'static str,
        verdict: &Verdict,
        source: IpAddr,
        workload: &Workload,
        destination: SocketAddr,
    ) {
        for policy in &verdict.audited {
            info!(direction, %source, pod = %workload.key(), %destination, policy, allowed = verdict.allowed, "audit");
        }
        if verdict.allowed {
            return;
        }
        let policy = verdict
            .deny_policy
            .clone()
            .unwrap_or_else(|| "none".to_owned());
        warn!(direction, %source, pod = %workload.key(), %destination, policy, reason = %verdict.reason, "denied");
        *self
            .denied
            .lock()
            .unwrap()
            .entry((direction, policy))
            .or_default() += 1;
    }

    /// (direction, policy, count) of every denial so far.
    pub fn denials(&self) -> Vec<(&'static str, String, u64)> {
        let mut denials: Vec<_> = self
            .denied
            .lock()
            .unwrap()
            .iter()
            .map(|((direction, policy), count)| (*direction, policy.clone(), *count))
            .collect();
        denials.sort();
        denials
    }
}
