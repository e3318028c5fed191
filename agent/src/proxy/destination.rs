//! Where a connection goes: a Service ClusterIP is resolved to one of its
//! ready endpoints by the proxy itself, since there may be no kube-proxy;
//! any other address is used as it is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use crate::model::{Cluster, Service, WorkloadKey};

/// The chosen upstream and what is known about it, for metrics.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub service: Option<ServiceName>,
    pub workload: Option<WorkloadKey>,
}

#[derive(Clone, Debug)]
pub struct ServiceName {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    /// The service that has `addr` as one of its endpoints, if any: what
    /// the inbound side reports a connection to a pod as.
    pub fn with_endpoint(cluster: &Cluster, addr: SocketAddr) -> Option<ServiceName> {
        cluster.service_by_endpoint(addr).map(ServiceName::of)
    }

    fn of(service: &Service) -> ServiceName {
        ServiceName {
            hostname: service.hostname(),
            name: service.name.clone(),
            namespace: service.namespace.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("service {0} has no ready endpoint")]
pub struct NoHealthyUpstream(pub String);

/// Round robin over each service port's ready endpoints.
#[derive(Debug, Default)]
pub struct Balancer {
    next: Mutex<HashMap<(String, String, u16), usize>>,
}

impl Balancer {
    pub fn resolve(
        &self,
        cluster: &Cluster,
        orig: SocketAddr,
    ) -> Result<Target, NoHealthyUpstream> {
        let Some((service, port)) = cluster.service_by_ip_port(orig.ip(), orig.port()) else {
            return Ok(Target {
                addr: orig,
                service: None,
                workload: cluster.workload_by_ip(orig.ip()).map(|w| w.key()),
            });
        };
        let ready: Vec<_> = port.endpoints.iter().filter(|e| e.ready).collect();
        if ready.is_empty() {
            return Err(NoHealthyUpstream(service.hostname()));
        }
        let turn = {
            let key = (service.namespace.clone(), service.name.clone(), port.port);
            let mut next = self.next.lock().unwrap();
            let slot = next.entry(key).or_default();
            let turn = *slot;
            *slot = slot.wrapping_add(1);
            turn
        };
        let endpoint = ready[turn % ready.len()];
        Ok(Target {
            addr: SocketAddr::new(endpoint.ip, endpoint.port),
            service: Some(ServiceName::of(service)),
            workload: endpoint.workload.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::objects::parse_file;

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews}}
spec: {nodeName: n, containers: [{name: c, image: i}]}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, labels: {app: reviews}}
spec: {nodeName: n, containers: [{name: c, image: i}]}
status: {podIP: 10.244.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v3, namespace: default, labels: {app: reviews}}
spec: {nodeName: n, containers: [{name: c, image: i}]}
status:
  podIP: 10.244.0.13
  conditions: [{type: Ready, status: "False"}]
"#;

    fn cluster() -> Cluster {
        let parsed = parse_file(std::path::Path::new("test.yaml"), MANIFESTS).unwrap();
        Cluster::build(&parsed.objects)
    }

    #[test]
    fn cluster_ip_round_robins_over_ready_endpoints() {
        let (cluster, balancer) = (cluster(), Balancer::default());
        let vip: SocketAddr = "10.96.0.20:9080".parse().unwrap();
        let picks: Vec<_> = (0..4)
            .map(|_| balancer.resolve(&cluster, vip).unwrap())
            .collect();
        let addrs: Vec<String> = picks.iter().map(|t| t.addr.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "10.244.0.11:9080",
                "10.244.0.12:9080",
                "10.244.0.11:9080",
                "10.244.0.12:9080"
            ]
        );
        assert_eq!(
            picks[0].service.as_ref().unwrap().hostname,
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(picks[1].workload.as_ref().unwrap().name, "reviews-v2");
    }

    #[test]
    fn other_addresses_pass_through_and_name_the_pod() {
        let target = Balancer::default()
            .resolve(&cluster(), "10.244.0.13:8080".parse().unwrap())
            .unwrap();
        assert_eq!(target.addr.to_string(), "10.244.0.13:8080");
        assert!(target.service.is_none());
        assert_eq!(target.workload.unwrap().name, "reviews-v3");
    }
}
