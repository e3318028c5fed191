//! The cluster as the agent uses it: one immutable snapshot built from
//! Kubernetes objects, with the lookups the data path and the proxy need.
//! Nothing in it says which source an object came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::objects::{
    EXCLUDE_INBOUND_PORTS_ANNOTATION, EXCLUDE_PORTS_ANNOTATION, MESH_ENABLED, MESH_LABEL, Object,
    SERVICE_NAME_LABEL, excluded_cidrs, excluded_ports,
};
use crate::policy::AuthorizationPolicy;
use crate::routing::{self, DestinationRule, VirtualService};

/// Namespace and name of a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WorkloadKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod, with what the agent derives from it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`: the node the pod runs on, once scheduled.
    pub node: Option<String>,
    /// `status.podIPs`, else `status.podIP`.
    pub ips: Vec<IpAddr>,
    /// `spec.serviceAccountName`; with the namespace, the pod's identity.
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// The Ready condition is True. A pod without any condition but with an
    /// IP counts as ready: hand-written manifests rarely carry conditions.
    pub ready: bool,
    /// Whether the agent takes over the pod's traffic; see [`Cluster::build`].
    pub enrolled: bool,
    /// Destination ports and networks that are never redirected.
    pub excluded_ports: Vec<u16>,
    /// Local ports whose connections reach the app without the proxy.
    pub excluded_inbound_ports: Vec<u16>,
    /// Ports the kubelet probes (liveness, readiness, startup): the node may
    /// reach them whatever the policy says.
    pub probe_ports: Vec<u16>,
    pub excluded_cidrs: Vec<ipnet::IpNet>,
    // The names Istio's telemetry gives a pod, so that dashboards built for
    // Istio work unchanged.
    /// The controller that owns the pod (a Deployment rather than its
    /// ReplicaSet), else the pod itself.
    pub workload_name: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// Labels `app` and `version`.
    pub app: Option<String>,
    pub version: Option<String>,
}

impl Workload {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// `namespace_labels` are those of the pod's Namespace object, if known.
    fn from_pod(
        pod: &core::Pod,
        namespace_labels: Option<&BTreeMap<String, String>>,
        options: BuildOptions,
    ) -> Self {
        let metadata = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let labels = metadata.labels.clone().unwrap_or_default();

        let pod_ips = status.and_then(|status| status.pod_ips.as_ref());
        let ips: Vec<IpAddr> = match pod_ips.filter(|ips| !ips.is_empty()) {
            Some(pod_ips) => pod_ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect(),
            None => status
                .and_then(|status| status.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok())
                .into_iter()
                .collect(),
        };
        let conditions = status
            .and_then(|status| status.conditions.as_deref())
            .unwrap_or_default();
        let ready = if conditions.is_empty() {
            !ips.is_empty()
        } else {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        };
        let host_network = spec.and_then(|spec| spec.host_network).unwrap_or(false);
        let enrolled =
            !host_network && !ips.is_empty() && options.wants(Some(&labels), namespace_labels);

        let label = |key: &str| labels.get(key).cloned();
        let first_label = |keys: &[&str]| keys.iter().find_map(|key| label(key));
        let workload_name = workload_name(metadata, &labels);
        Self {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
            node: spec.and_then(|spec| spec.node_name.clone()),
            service_account: spec
                .and_then(|spec| spec.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            host_network,
            ready,
            enrolled,
            ips,
            // Sources reject pods whose annotations do not parse before
            // they get here; this only keeps `build` total.
            excluded_ports: excluded_ports(metadata, EXCLUDE_PORTS_ANNOTATION).unwrap_or_default(),
            excluded_inbound_ports: excluded_ports(metadata, EXCLUDE_INBOUND_PORTS_ANNOTATION)
                .unwrap_or_default(),
            probe_ports: probe_ports(pod),
            excluded_cidrs: excluded_cidrs(metadata).unwrap_or_default(),
            canonical_service: first_label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| workload_name.clone()),
            canonical_revision: first_label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".to_owned()),
            app: label("app"),
            version: label("version"),
            workload_name,
            labels,
        }
    }
}

/// The ports of every container's liveness, readiness and startup probes,
/// named ports resolved against the container's own ports.
fn probe_ports(pod: &core::Pod) -> Vec<u16> {
    let containers = pod.spec.iter().flat_map(|spec| &spec.containers);
    let mut ports: Vec<u16> = containers
        .flat_map(|container| {
            let probes = [
                &container.liveness_probe,
                &container.readiness_probe,
                &container.startup_probe,
            ];
            probes.into_iter().flatten().filter_map(move |probe| {
                let port = probe
                    .http_get
                    .as_ref()
                    .map(|http| &http.port)
                    .or(probe.tcp_socket.as_ref().map(|tcp| &tcp.port));
                let number = match port {
                    Some(IntOrString::Int(number)) => *number,
                    Some(IntOrString::String(name)) => {
                        container
                            .ports
                            .iter()
                            .flatten()
                            .find(|p| p.name.as_deref() == Some(name.as_str()))?
                            .container_port
                    }
                    None => probe.grpc.as_ref()?.port,
                };
                u16::try_from(number).ok()
            })
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// What decides enrollment besides weir's own label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Also enroll the pods Istio ambient would capture: those labelled
    /// `istio.io/dataplane-mode=ambient`, or in a namespace so labelled,
    /// unless the pod says `none`. For moving a cluster off ambient; weir and
    /// ztunnel must never both run on one node.
    pub honor_istio_labels: bool,
}

impl BuildOptions {
    /// Whether a pod with these labels, in a namespace with these, belongs
    /// in the mesh. The pod's own label wins over its namespace's, and
    /// weir's label over Istio's.
    fn wants(
        self,
        pod: Option<&BTreeMap<String, String>>,
        namespace: Option<&BTreeMap<String, String>>,
    ) -> bool {
        let decision = |labels| {
            let weir = label(labels, MESH_LABEL).map(|value| value == MESH_ENABLED);
            let istio = label(labels, ISTIO_DATAPLANE_MODE_LABEL)
                .filter(|_| self.honor_istio_labels)
                .map(|value| value == ISTIO_AMBIENT);
            weir.or(istio)
        };
        decision(pod)
            .or_else(|| decision(namespace))
            .unwrap_or(false)
    }
}

/// Istio ambient's enrollment label, and its value that enrolls.
const ISTIO_DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
const ISTIO_AMBIENT: &str = "ambient";

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels?.get(key).map(String::as_str)
}

/// The name of the pod's controller, as Istio reports it: a ReplicaSet made
/// by a Deployment loses the pod-template-hash suffix, which leaves the
/// Deployment's name.
fn workload_name(metadata: &ObjectMeta, labels: &BTreeMap<String, String>) -> String {
    let owners = metadata.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|owner| owner.controller == Some(true))
        .or(owners.first());
    let Some(owner) = owner else {
        return metadata.name.clone().unwrap_or_default();
    };
    if owner.kind == "ReplicaSet"
        && let Some(hash) = labels.get("pod-template-hash")
        && let Some(deployment) = owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|name| name.strip_suffix('-'))
    {
        return deployment.to_owned();
    }
    owner.name.clone()
}

/// A Service with its ports and, for each, the endpoints behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Empty for a headless Service, or one whose address is not allocated.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// The name clients use, `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// Builds the model of `service`. Its endpoints come from `slices` when
    /// there are any, else from the pods its selector matches, as Kubernetes'
    /// endpoints controller would derive them.
    fn build(
        service: &core::Service,
        slices: &[&EndpointSlice],
        pods: &[(&core::Pod, Workload)],
        workload_at: &impl Fn(IpAddr) -> Option<WorkloadKey>,
    ) -> Self {
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let spec = service.spec.as_ref();
        let cluster_ips: Vec<IpAddr> = match spec.and_then(|spec| spec.cluster_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            // "None" (headless) and "" (not allocated) do not parse, as meant.
            _ => spec
                .and_then(|spec| spec.cluster_ip.as_ref())
                .and_then(|ip| ip.parse().ok())
                .into_iter()
                .collect(),
        };
        let selector = spec
            .and_then(|spec| spec.selector.as_ref())
            .filter(|selector| !selector.is_empty());
        let publish_not_ready =
            spec.and_then(|spec| spec.publish_not_ready_addresses) == Some(true);

        let ports = spec
            .and_then(|spec| spec.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|port| {
                let number = u16::try_from(port.port).ok()?;
                let endpoints = if !slices.is_empty() {
                    slice_endpoints(port, slices, workload_at)
                } else if let Some(selector) = selector {
                    let selected = pods.iter().filter(|(_, workload)| {
                        workload.namespace == namespace
                            && selector
                                .iter()
                                .all(|(key, value)| workload.labels.get(key) == Some(value))
                    });
                    selected
                        .flat_map(|(pod, workload)| {
                            pod_endpoints(port, pod, workload, &cluster_ips, publish_not_ready)
                        })
                        .collect()
                } else {
                    // Without a selector, something else manages endpoints;
                    // without slices, there are none.
                    Vec::new()
                };
                Some(ServicePort {
                    name: port.name.clone(),
                    port: number,
                    protocol: protocol(port.protocol.as_deref()).to_owned(),
                    app_protocol: port.app_protocol.clone(),
                    endpoints,
                })
            })
            .collect();

        Self {
            name: service.metadata.name.clone().unwrap_or_default(),
            namespace,
            cluster_ips,
            ports,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`; only TCP ports are found by address.
    pub protocol: String,
    pub app_protocol: Option<String>,
    pub endpoints: Vec<Endpoint>,
}

/// One address that a Service port sends connections to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The pod behind the address, when known.
    pub workload: Option<WorkloadKey>,
    pub ready: bool,
}

/// A snapshot of the cluster: every pod, every Service and every
/// authorization policy.
///
/// Serializes (for the admin `/config_dump`) as its workloads, enrolled or
/// not, its services and its policies; the lookup indexes are left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Cluster {
    /// Sorted by namespace and name.
    workloads: Vec<Workload>,
    /// Sorted by namespace and name.
    services: Vec<Service>,
    /// Sorted by namespace and name.
    policies: Vec<AuthorizationPolicy>,
    /// VirtualServices for mesh traffic, sorted by namespace and name.
    virtual_services: Vec<VirtualService>,
    /// Sorted by namespace and name.
    destination_rules: Vec<DestinationRule>,
    /// Rules that cannot apply as written, such as http routes for a port
    /// that is not HTTP.
    routing_warnings: Vec<RoutingWarning>,
    /// Index into `workloads`, for pods that own their IPs (not hostNetwork).
    #[serde(skip)]
    workload_by_ip: HashMap<IpAddr, usize>,
    /// Cluster IP and TCP port to indexes into `services` and its `ports`.
    #[serde(skip)]
    service_by_addr: HashMap<SocketAddr, (usize, usize)>,
    /// Endpoint address to the index into `services` of a service it backs.
    #[serde(skip)]
    service_by_endpoint: HashMap<SocketAddr, usize>,
}

impl Cluster {
    /// Builds the snapshot from every object of the cluster.
    ///
    /// A pod is enrolled when the label `weir.dev/mesh` on the pod, or if the
    /// pod has none on its Namespace, is `enabled`; hostNetwork pods and pods
    /// without an IP never are. Pods that have finished (phase Succeeded or
    /// Failed) are left out, as their IPs may already belong to other pods.
    /// So are AuthorizationPolicies that apply to no workload.
    pub fn build<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Self {
        Self::build_with(objects, BuildOptions::default())
    }

    /// [`Cluster::build`], with Istio's enrollment labels honoured if the
    /// options say so.
    pub fn build_with<'a>(
        objects: impl IntoIterator<Item = &'a Object>,
        options: BuildOptions,
    ) -> Self {
        let mut namespace_labels = HashMap::new();
        let mut pods = BTreeMap::new();
        let mut services = BTreeMap::new();
        let mut policies: Vec<AuthorizationPolicy> = Vec::new();
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        let mut virtual_services = Vec::new();
        let mut destination_rules = Vec::new();
        for object in objects {
            let metadata = object.metadata();
            let namespace = metadata.namespace.as_deref().unwrap_or_default();
            let name = metadata.name.as_deref().unwrap_or_default();
            match object {
                Object::Namespace(_) => {
                    namespace_labels.insert(name, metadata.labels.as_ref());
                }
                Object::Pod(pod) if !has_finished(pod) => {
                    pods.insert((namespace, name), pod.as_ref());
                }
                Object::Pod(_) => {}
                Object::Service(service) => {
                    services.insert((namespace, name), service.as_ref());
                }
                Object::EndpointSlice(slice) => {
                    let labels = metadata.labels.as_ref();
                    if let Some(service) = labels.and_then(|labels| labels.get(SERVICE_NAME_LABEL))
                    {
                        slices
                            .entry((namespace, service.as_str()))
                            .or_default()
                            .push(slice);
                    }
                }
                Object::AuthorizationPolicy(policy) => {
                    // Sources reject invalid policies before they get here.
                    let translation = policy.translate().ok();
                    policies.extend(translation.and_then(|translation| translation.policy));
                }
                // Sources reject invalid rules before they get here.
                Object::VirtualService(service) => {
                    virtual_services.extend(service.translate().ok().map(|t| t.value));
                }
                Object::DestinationRule(rule) => {
                    destination_rules.extend(rule.translate().ok().map(|t| t.value));
                }
            }
        }
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let pods: Vec<(&core::Pod, Workload)> = pods
            .into_iter()
            .map(|((namespace, _), pod)| {
                let labels = namespace_labels.get(namespace).copied().flatten();
                (pod, Workload::from_pod(pod, labels, options))
            })
            .collect();
        let mut workload_by_ip = HashMap::new();
        for (index, (_, workload)) in pods.iter().enumerate() {
            if !workload.host_network {
                for ip in &workload.ips {
                    workload_by_ip.entry(*ip).or_insert(index);
                }
            }
        }
        let workload_at = |ip: IpAddr| workload_by_ip.get(&ip).map(|&index| pods[index].1.key());

        let services: Vec<Service> = services
            .into_iter()
            .map(|(key, service)| {
                let slices = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
                Service::build(service, slices, &pods, &workload_at)
            })
            .collect();
        let workloads: Vec<Workload> = pods.into_iter().map(|(_, workload)| workload).collect();
        let mut service_by_addr = HashMap::new();
        let mut service_by_endpoint = HashMap::new();
        for (service_index, service) in services.iter().enumerate() {
            for (port_index, port) in service.ports.iter().enumerate() {
                for endpoint in &port.endpoints {
                    let addr = SocketAddr::new(endpoint.ip.to_canonical(), endpoint.port);
                    service_by_endpoint.entry(addr).or_insert(service_index);
                }
                if port.protocol == "TCP" {
                    for ip in &service.cluster_ips {
                        let addr = SocketAddr::new(*ip, port.port);
                        service_by_addr
                            .entry(addr)
                            .or_insert((service_index, port_index));
                    }
                }
            }
        }

        let key = |namespace: &String, name: &String| (namespace.clone(), name.clone());
        virtual_services.sort_by_key(|vs: &VirtualService| key(&vs.namespace, &vs.name));
        destination_rules.sort_by_key(|dr: &DestinationRule| key(&dr.namespace, &dr.name));
        let routing_warnings = routing_warnings(&virtual_services, &services);
        Self {
            workloads,
            services,
            policies,
            virtual_services,
            destination_rules,
            routing_warnings,
            workload_by_ip,
            service_by_addr,
            service_by_endpoint,
        }
    }

    /// Every pod, sorted by namespace and name.
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    pub fn workload(&self, key: &WorkloadKey) -> Option<&Workload> {
        let index = self
            .workloads
            .binary_search_by(|workload| {
                (workload.namespace.as_str(), workload.name.as_str())
                    .cmp(&(key.namespace.as_str(), key.name.as_str()))
            })
            .ok()?;
        Some(&self.workloads[index])
    }

    /// The enrolled pods that run on `node`.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> {
        self.workloads
            .iter()
            .filter(move |workload| workload.enrolled && workload.node.as_deref() == Some(node))
    }

    /// The pod that owns `ip`; hostNetwork pods own none. An IPv4-mapped
    /// IPv6 address, as dual-stack apps use, finds the IPv4 owner.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let index = *self.workload_by_ip.get(&ip.to_canonical())?;
        Some(&self.workloads[index])
    }

    /// Every Service, sorted by namespace and name.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Every AuthorizationPolicy that applies to workloads, sorted by
    /// namespace and name.
    pub fn policies(&self) -> &[AuthorizationPolicy] {
        &self.policies
    }

    /// The AuthorizationPolicies that apply to `workload`, as Istio selects
    /// them: those of the workload's namespace, and those of
    /// `root_namespace`, which reach every namespace; of these, the ones
    /// whose selector matches the workload's labels, or that have none.
    pub fn policies_for(
        &self,
        workload: &Workload,
        root_namespace: &str,
    ) -> Vec<&AuthorizationPolicy> {
        self.policies
            .iter()
            .filter(|policy| {
                (policy.namespace == workload.namespace || policy.namespace == root_namespace)
                    && policy.selects(&workload.labels)
            })
            .collect()
    }

    /// A service that `addr` is an endpoint of: what a connection to a pod
    /// is reported as on the pod's side.
    pub fn service_by_endpoint(&self, addr: SocketAddr) -> Option<&Service> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        Some(&self.services[*self.service_by_endpoint.get(&addr)?])
    }

    /// The Service and TCP port that a connection to `ip:port` is for, when
    /// `ip` is a cluster IP. IPv4-mapped addresses work as in
    /// [`Cluster::workload_by_ip`].
    pub fn service_by_ip_port(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let addr = SocketAddr::new(ip.to_canonical(), port);
        let &(service_index, port_index) = self.service_by_addr.get(&addr)?;
        let service = &self.services[service_index];
        Some((service, &service.ports[port_index]))
    }
}

impl Cluster {
    /// The Service whose name is `hostname`
    /// (`<name>.<namespace>.svc.cluster.local`).
    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Service> {
        let mut parts = hostname.split('.');
        let (name, namespace) = (parts.next()?, parts.next()?);
        if parts.collect::<Vec<_>>() != ["svc", "cluster", "local"] {
            return None;
        }
        self.services
            .iter()
            .find(|service| service.name == name && service.namespace == namespace)
    }

    /// The VirtualService for mesh traffic to `hostname`. Istio allows one
    /// per host; of several, the first by namespace and name is used.
    pub fn virtual_service_for(&self, hostname: &str) -> Option<&VirtualService> {
        self.virtual_services
            .iter()
            .find(|vs| vs.mesh && vs.hosts.iter().any(|host| host == hostname))
    }

    /// The DestinationRule for `hostname` as a client in `client_namespace`
    /// sees it: its own namespace's first, then the service's.
    pub fn destination_rule_for(
        &self,
        hostname: &str,
        client_namespace: &str,
    ) -> Option<&DestinationRule> {
        let for_host = || {
            self.destination_rules
                .iter()
                .filter(|dr| dr.host == hostname)
        };
        for_host()
            .find(|dr| dr.namespace == client_namespace)
            .or_else(|| {
                let service_namespace = hostname.split('.').nth(1).unwrap_or_default();
                for_host().find(|dr| dr.namespace == service_namespace)
            })
            .or_else(|| for_host().next())
    }

    /// Every VirtualService, sorted by namespace and name.
    pub fn virtual_services(&self) -> &[VirtualService] {
        &self.virtual_services
    }

    /// Rules that cannot apply as written; see [`routing_warnings`].
    pub fn routing_warnings(&self) -> &[RoutingWarning] {
        &self.routing_warnings
    }
}

/// A rule that cannot apply as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoutingWarning {
    /// `VirtualService <namespace>/<name>`.
    pub object: String,
    pub message: String,
}

/// What the VirtualServices say that weir cannot do with these services:
/// http rules for a service none of whose ports is HTTP (weir does not
/// sniff protocols), or for a port that is not HTTP.
fn routing_warnings(
    virtual_services: &[VirtualService],
    services: &[Service],
) -> Vec<RoutingWarning> {
    let mut warnings = Vec::new();
    for vs in virtual_services
        .iter()
        .filter(|vs| vs.mesh && !vs.http.is_empty())
    {
        let label = format!("VirtualService {}/{}", vs.namespace, vs.name);
        for host in &vs.hosts {
            let Some(service) = services.iter().find(|s| s.hostname() == *host) else {
                continue;
            };
            let ports: Vec<u16> = vs
                .http
                .iter()
                .flat_map(|rule| &rule.matches)
                .filter_map(|m| m.port)
                .collect();
            let tcp = |port: &&ServicePort| port.protocol == "TCP" && !routing::is_http_port(port);
            for port in service.ports.iter().filter(tcp) {
                if ports.is_empty() || ports.contains(&port.port) {
                    warnings.push(RoutingWarning {
                        object: label.clone(),
                        message: format!(
                            "http rules for {host} port {}, which is not declared HTTP \
                         (appProtocol http, http2 or grpc, or a name such as http or http-*): \
                         they do not apply to it, its traffic is forwarded at L4",
                            port.port
                        ),
                    });
                }
            }
        }
    }
    warnings
}

fn has_finished(pod: &core::Pod) -> bool {
    let phase = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// The endpoints that `slices` give the Service port `port`: the slice port
/// with the same name says which port number the endpoints listen on.
fn slice_endpoints(
    port: &core::ServicePort,
    slices: &[&EndpointSlice],
    workload_at: &impl Fn(IpAddr) -> Option<WorkloadKey>,
) -> Vec<Endpoint> {
    let name = port.name.as_deref().unwrap_or_default();
    let mut endpoints = Vec::new();
    for slice in slices {
        let slice_port = slice
            .ports
            .iter()
            .flatten()
            .find(|slice_port| slice_port.name.as_deref().unwrap_or_default() == name);
        let Some(number) = slice_port.and_then(|slice_port| u16::try_from(slice_port.port?).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Like kube-proxy, use the first address only: the others are
            // the same endpoint's, not more endpoints.
            let Some(ip) = endpoint.addresses.first().and_then(|ip| ip.parse().ok()) else {
                continue;
            };
            let target = endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"));
            let workload = target
                .and_then(|target| {
                    Some(WorkloadKey {
                        namespace: target
                            .namespace
                            .clone()
                            .or_else(|| slice.metadata.namespace.clone())?,
                        name: target.name.clone()?,
                    })
                })
                .or_else(|| workload_at(ip));
            endpoints.push(Endpoint {
                ip,
                port: number,
                workload,
                // Unset means ready: "unknown state" is to be read as ready.
                ready: endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true),
            });
        }
    }
    endpoints
}

/// The endpoints of a pod that the selector of `port`'s Service matched: one
/// per pod IP of the Service's IP families. A pod whose containers do not
/// declare a named target port gives none, as in Kubernetes.
fn pod_endpoints(
    port: &core::ServicePort,
    pod: &core::Pod,
    workload: &Workload,
    cluster_ips: &[IpAddr],
    publish_not_ready: bool,
) -> Vec<Endpoint> {
    let Some(target) = target_port(port, pod) else {
        return Vec::new();
    };
    // As the EndpointSlice controller has it, a terminating pod is never
    // ready, unless the Service asks for unready endpoints too.
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ready = publish_not_ready || (workload.ready && !terminating);
    let same_family = |ip: &IpAddr| {
        cluster_ips.is_empty() || cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4())
    };
    workload
        .ips
        .iter()
        .filter(|ip| same_family(ip))
        .map(|&ip| Endpoint {
            ip,
            port: target,
            workload: Some(workload.key()),
            ready,
        })
        .collect()
}

/// The pod port that Service port `port` sends to: `targetPort` as a number,
/// or as the name of a container port of the same protocol; `port` itself
/// when unset.
fn target_port(port: &core::ServicePort, pod: &core::Pod) -> Option<u16> {
    let number = match &port.target_port {
        None => port.port,
        Some(IntOrString::Int(number)) => *number,
        Some(IntOrString::String(name)) => {
            let containers = pod.spec.iter().flat_map(|spec| &spec.containers);
            containers
                .flat_map(|container| container.ports.iter().flatten())
                .find(|container_port| {
                    container_port.name.as_ref() == Some(name)
                        && protocol(container_port.protocol.as_deref())
                            == protocol(port.protocol.as_deref())
                })?
                .container_port
        }
    };
    u16::try_from(number).ok()
}

/// A port's protocol, with Kubernetes' default.
fn protocol(protocol: Option<&str>) -> &str {
    protocol.unwrap_or("TCP")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::objects::parse_file;

    fn cluster(text: &str) -> Cluster {
        let parsed = parse_file(Path::new("test.yaml"), text).unwrap();
        Cluster::build(&parsed.objects)
    }

    fn bookinfo() -> Cluster {
        cluster(include_str!("testdata/bookinfo.yaml"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn names<'a>(workloads: impl IntoIterator<Item = &'a Workload>) -> Vec<&'a str> {
        workloads
            .into_iter()
            .map(|workload| workload.workload_name.as_str())
            .collect()
    }

    #[test]
    fn namespace_label_enrolls_and_pod_label_opts_out() {
        let cluster = bookinfo();
        assert_eq!(
            names(cluster.enrolled_on("xuegod63")),
            ["details-v1", "productpage-v1", "reviews-v1"]
        );
        // reviews-v3 carries weir.dev/mesh=disabled.
        assert_eq!(
            names(cluster.enrolled_on("xuegod64")),
            ["ratings-v1", "reviews-v2"]
        );
        assert_eq!(cluster.enrolled_on("elsewhere").count(), 0);
    }

    #[test]
    fn istio_labels_enroll_only_when_honoured_and_weir_labels_win() {
        let labels = |text: &str| -> BTreeMap<String, String> {
            text.split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap();
                    (key.to_owned(), value.to_owned())
                })
                .collect()
        };
        let honoured = BuildOptions {
            honor_istio_labels: true,
        };
        let ambient = "istio.io/dataplane-mode=ambient";
        let none = "istio.io/dataplane-mode=none";
        // (pod labels, namespace labels, default, honoured)
        let cases = [
            ("", ambient, false, true),
            (ambient, "", false, true),
            (none, ambient, false, false),
            ("weir.dev/mesh=disabled", ambient, false, false),
            (&format!("weir.dev/mesh=enabled,{none}"), "", true, true),
            (
                "",
                &format!("weir.dev/mesh=disabled,{ambient}"),
                false,
                false,
            ),
            (none, "weir.dev/mesh=enabled", true, false),
            ("", "", false, false),
        ];
        for (pod, namespace, default, honour) in cases {
            let (pod, namespace) = (labels(pod), labels(namespace));
            let wants = |options: BuildOptions| options.wants(Some(&pod), Some(&namespace));
            assert_eq!(
                wants(BuildOptions::default()),
                default,
                "{pod:?} in {namespace:?}"
            );
            assert_eq!(
                wants(honoured),
                honour,
                "honoured: {pod:?} in {namespace:?}"
            );
        }
    }

    #[test]
    fn pod_label_enrolls_but_never_host_network_or_without_ip() {
        let pod = |name: &str, labels: &str, extra_spec: &str, status: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: plain, labels: {{{labels}}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: c}}]{extra_spec}}}\nstatus: {{{status}}}\n"
            )
        };
        let text = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n".to_owned(),
            pod(
                "labelled",
                "weir.dev/mesh: enabled",
                "",
                "podIP: 10.244.1.1",
            ),
            pod("unlabelled", "", "", "podIP: 10.244.1.2"),
            pod(
                "host",
                "weir.dev/mesh: enabled",
                ", hostNetwork: true",
                "podIP: 10.10.0.1",
            ),
            pod("pending", "weir.dev/mesh: enabled", "", ""),
        ]
        .concat();
        let cluster = cluster(&text);
        assert_eq!(names(cluster.enrolled_on("n1")), ["labelled"]);
        assert_eq!(cluster.workloads().len(), 4);
        // A hostNetwork pod's IP is its node's, so it identifies nobody.
        assert!(cluster.workload_by_ip(ip("10.10.0.1")).is_none());
        let pending = &cluster.workloads()[2];
        assert_eq!((pending.name.as_str(), pending.ready), ("pending", false));
    }

    #[test]
    fn workload_fields_follow_istio() {
        let cluster = bookinfo();
        let ratings = cluster.workload_by_ip(ip("10.244.64.15")).unwrap();
        assert_eq!(ratings.name, "ratings-v1-c6cdf8d98-5bqjt");
        // The ReplicaSet's pod-template-hash is stripped: the Deployment's name.
        assert_eq!(ratings.workload_name, "ratings-v1");
        assert_eq!(ratings.canonical_service, "ratings");
        assert_eq!(ratings.canonical_revision, "v1");
        assert_eq!(
            (ratings.app.as_deref(), ratings.version.as_deref()),
            (Some("ratings"), Some("v1"))
        );
        assert_eq!(ratings.service_account, "bookinfo-ratings");
        assert_eq!(ratings.node.as_deref(), Some("xuegod64"));
        assert!(!ratings.ready, "its Ready condition is False");
        assert_eq!(ratings.excluded_ports, [5432, 6379]);
        assert_eq!(ratings.excluded_cidrs.len(), 2);

        let productpage = cluster.workload_by_ip(ip("::ffff:10.244.63.10")).unwrap();
        assert_eq!(productpage.workload_name, "productpage-v1");
        assert!(productpage.ready, "no conditions but an IP");
        assert!(cluster.workload_by_ip(ip("10.244.63.200")).is_none());
    }

    #[test]
    fn workload_name_without_replica_set() {
        let text = "
apiVersion: v1
kind: Pod
metadata:
  name: backup-28512345-x7k2p
  labels: {app.kubernetes.io/name: backup, batch.kubernetes.io/controller-uid: abc}
  ownerReferences:
  - {apiVersion: batch/v1, kind: Job, name: backup-28512345, uid: abc, controller: true}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: standalone}
spec: {containers: [{name: c}]}
";
        let cluster = cluster(text);
        let [job, standalone] = cluster.workloads() else {
            panic!()
        };
        assert_eq!(
            (job.workload_name.as_str(), job.canonical_service.as_str()),
            ("backup-28512345", "backup")
        );
        assert_eq!(standalone.workload_name, "standalone");
        assert_eq!(standalone.canonical_service, "standalone");
        assert_eq!(standalone.canonical_revision, "latest");
        assert_eq!(standalone.service_account, "default");
    }

    #[test]
    fn selector_endpoints_resolve_named_target_port() {
        let text = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.12
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: web}
  - {name: admin, port: 9090, targetPort: 9901}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
spec:
  containers:
  - name: reviews
    ports: [{name: web, containerPort: 8080}]
status: {podIP: 10.244.63.12}
---
# Does not declare the named port: no endpoint for `http`.
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, labels: {app: reviews, version: v2}}
spec: {containers: [{name: reviews}]}
status:
  podIP: 10.244.64.13
  conditions: [{type: Ready, status: \"False\"}]
---
# Matches the labels, but in another namespace.
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: staging, labels: {app: reviews}}
spec: {containers: [{name: reviews, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.244.63.50}
";
        let cluster = cluster(text);
        let (service, http) = cluster.service_by_ip_port(ip("10.96.0.12"), 9080).unwrap();
        assert_eq!(service.hostname(), "reviews.default.svc.cluster.local");
        let key = WorkloadKey {
            namespace: "default".to_owned(),
            name: "reviews-v1".to_owned(),
        };
        let expected = Endpoint {
            ip: ip("10.244.63.12"),
            port: 8080,
            workload: Some(key.clone()),
            ready: true,
        };
        assert_eq!(http.endpoints, [expected]);
        assert_eq!(cluster.workload(&key).unwrap().ips, [ip("10.244.63.12")]);

        let admin = &service.ports[1];
        let endpoints: Vec<(IpAddr, u16, bool)> = admin
            .endpoints
            .iter()
            .map(|e| (e.ip, e.port, e.ready))
            .collect();
        assert_eq!(
            endpoints,
            [
                (ip("10.244.63.12"), 9901, true),
                (ip("10.244.64.13"), 9901, false)
            ]
        );
    }

    #[test]
    fn endpoint_slices_win_over_the_selector() {
        let cluster = bookinfo();
        let details = cluster
            .services()
            .iter()
            .find(|service| service.name == "details")
            .unwrap();
        let endpoints = &details.ports[0].endpoints;
        assert_eq!(endpoints.len(), 2);
        assert_eq!(
            (endpoints[0].ip, endpoints[0].port, endpoints[0].ready),
            (ip("10.244.63.11"), 9080, true)
        );
        assert_eq!(
            endpoints[0].workload.as_ref().unwrap().name,
            "details-v1-79dfbd6fff-kq2xm"
        );
        assert_eq!(
            (endpoints[1].ip, endpoints[1].ready, &endpoints[1].workload),
            (ip("10.244.63.99"), false, &None)
        );
    }

    #[test]
    fn endpoint_slice_ports_match_by_name() {
        let text = "
apiVersion: v1
kind: Service
metadata: {name: ratings}
spec:
  clusterIP: 10.96.0.13
  ports: [{name: http, port: 9080}, {name: grpc, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-1, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
ports: [{name: grpc, port: 19090}, {name: http, port: 18080}]
endpoints:
- addresses: [10.244.64.15]
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-v1}
spec: {containers: [{name: ratings}]}
status: {podIP: 10.244.64.15}
";
        let cluster = cluster(text);
        let (_, http) = cluster.service_by_ip_port(ip("10.96.0.13"), 9080).unwrap();
        let (_, grpc) = cluster.service_by_ip_port(ip("10.96.0.13"), 9090).unwrap();
        assert_eq!(
            (http.endpoints[0].port, grpc.endpoints[0].port),
            (18080, 19090)
        );
        // Without a targetRef the endpoint's pod is found by its IP; unset
        // conditions mean ready.
        assert_eq!(
            http.endpoints[0].workload.as_ref().unwrap().name,
            "ratings-v1"
        );
        assert!(http.endpoints[0].ready);
    }

    #[test]
    fn cluster_ip_lookup() {
        let cluster = bookinfo();
        let (service, port) = cluster.service_by_ip_port(ip("10.96.0.12"), 9080).unwrap();
        assert_eq!(
            (service.name.as_str(), port.name.as_deref()),
            ("reviews", Some("http"))
        );
        let ready: Vec<bool> = port
            .endpoints
            .iter()
            .map(|endpoint| endpoint.ready)
            .collect();
        assert_eq!(ready, [true, true, true]);
        let (ratings, port) = cluster
            .service_by_ip_port(ip("::ffff:10.96.0.13"), 9080)
            .unwrap();
        assert_eq!(ratings.name, "ratings");
        assert!(!port.endpoints[0].ready, "the ratings pod is not ready");
        assert!(cluster.service_by_ip_port(ip("10.96.0.12"), 9081).is_none());
        assert!(
            cluster
                .service_by_ip_port(ip("10.244.63.12"), 9080)
                .is_none()
        );
        assert_eq!(cluster.services().len(), 4);
    }

    const POLICIES: &str = "
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: foo, labels: {app: reviews}}
spec: {containers: [{name: reviews}]}
status: {podIP: 10.244.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-v1, namespace: bar, labels: {app: ratings}}
spec: {containers: [{name: ratings}]}
status: {podIP: 10.244.1.2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: namespace-wide, namespace: foo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-reviews, namespace: foo}
spec: {selector: {matchLabels: {app: reviews}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-ratings, namespace: foo}
spec: {selector: {matchLabels: {app: ratings}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {notIpBlocks: [10.244.0.0/16]}}]}]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: all-ratings, namespace: istio-system}
spec: {selector: {matchLabels: {app: ratings}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: bar}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}
";

    #[test]
    fn policies_for_follow_istio_selection() {
        let cluster = cluster(POLICIES);
        let policies_of = |ip_text: &str, root: &str| -> Vec<String> {
            let workload = cluster.workload_by_ip(ip(ip_text)).unwrap();
            let policies = cluster.policies_for(workload, root);
            policies.iter().map(|policy| policy.key()).collect()
        };
        // The namespace's own policies, and the root namespace's, by selector.
        assert_eq!(
            policies_of("10.244.1.1", "istio-system"),
            [
                "foo/for-reviews",
                "foo/namespace-wide",
                "istio-system/mesh-wide"
            ]
        );
        assert_eq!(
            policies_of("10.244.1.2", "istio-system"),
            ["istio-system/all-ratings", "istio-system/mesh-wide"]
        );
        // In any other namespace those are ordinary policies.
        assert_eq!(policies_of("10.244.1.2", "mesh-root"), Vec::<String>::new());
        // A policy attached to a waypoint applies to no workload at all.
        assert!(
            cluster
                .policies()
                .iter()
                .all(|policy| policy.name != "waypoint")
        );
        assert_eq!(cluster.policies().len(), 5);
    }

    #[test]
    fn routing_lookups_and_rules_for_tcp_ports_are_reported() {
        let text = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: mongo, namespace: db}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: mongo, port: 27017}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mongo, namespace: default}
spec:
  hosts: [mongo.db]
  http: [{route: [{destination: {host: mongo.db}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gateway, namespace: default}
spec:
  hosts: [mongo.db.svc.cluster.local]
  gateways: [bookinfo-gateway]
  http: [{route: [{destination: {host: mongo.db}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec: {host: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-from-test, namespace: test}
spec: {host: reviews.default.svc.cluster.local}
";
        let cluster = cluster(text);
        let reviews = "reviews.default.svc.cluster.local";
        assert_eq!(
            cluster.service_by_hostname(reviews).unwrap().name,
            "reviews"
        );
        assert!(cluster.service_by_hostname("reviews.default").is_none());
        assert_eq!(
            cluster.virtual_service_for(reviews).unwrap().name,
            "reviews"
        );
        // The gateway's VirtualService does not touch mesh traffic.
        let mongo = cluster.virtual_service_for("mongo.db.svc.cluster.local");
        assert_eq!(mongo.unwrap().name, "mongo");
        let rule = |namespace| cluster.destination_rule_for(reviews, namespace).unwrap();
        assert_eq!(rule("test").name, "reviews-from-test");
        assert_eq!(rule("default").name, "reviews");
        assert_eq!(rule("elsewhere").name, "reviews", "the service's namespace");
        let [warning] = cluster.routing_warnings() else {
            panic!("{:?}", cluster.routing_warnings())
        };
        assert_eq!(warning.object, "VirtualService default/mongo");
        assert!(
            warning.message.starts_with(
                "http rules for mongo.db.svc.cluster.local port 27017, which is not declared HTTP"
            ),
            "{}",
            warning.message
        );
    }

    #[test]
    fn serializes_for_config_dump() {
        let dump = serde_json::to_value(bookinfo()).unwrap();
        assert_eq!(dump["workloads"].as_array().unwrap().len(), 6);
        assert_eq!(dump["services"][0]["name"], "details");
        assert_eq!(dump["services"][0]["cluster_ips"][0], "10.96.0.11");
        assert!(dump.get("workload_by_ip").is_none());

        let dump = serde_json::to_value(cluster(POLICIES)).unwrap();
        let mesh_wide = &dump["policies"][4];
        assert_eq!(
            (
                &mesh_wide["namespace"],
                &mesh_wide["name"],
                &mesh_wide["action"]
            ),
            (&"istio-system".into(), &"mesh-wide".into(), &"DENY".into())
        );
        assert_eq!(
            mesh_wide["rules"][0]["from"][0],
            serde_json::json!({"source_ips": {"not_values": ["10.244.0.0/16"]}})
        );
    }
}
