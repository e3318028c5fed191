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
