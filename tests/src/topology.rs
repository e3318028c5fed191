//! The sandbox's network layout: the two nodes, the addresses every
//! namespace holds, and the iproute2 commands that wire them together.
//!
//! Every veth is created with both ends directly inside their target
//! namespaces, so no interface, address or route ever appears in the root
//! namespace. Nodes have no default route: nothing leaves the sandbox.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use weir::netns::NetNs;

use crate::command::ip;

/// Where `ip netns add` puts its namespace files.
const NETNS_RUN_DIR: &str = "/var/run/netns";
/// The bridge in the switch namespace that joins the nodes.
const SWITCH_BRIDGE: &str = "br0";
/// The bridge in each node that its pods hang off, named as flannel names it.
const POD_BRIDGE: &str = "cni0";

/// One of the sandbox's two nodes, named after the seed cluster's machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeId {
    Xuegod63,
    Xuegod64,
}

impl NodeId {
    pub const ALL: [NodeId; 2] = [NodeId::Xuegod63, NodeId::Xuegod64];

    /// The node's name without any sandbox tag: `xuegod63` or `xuegod64`.
    pub fn base_name(self) -> &'static str {
        match self {
            NodeId::Xuegod63 => "xuegod63",
            NodeId::Xuegod64 => "xuegod64",
        }
    }

    /// 63 or 64: the last octet of the node's address and the third octet
    /// of its pod subnet.
    pub fn number(self) -> u8 {
        match self {
            NodeId::Xuegod63 => 63,
            NodeId::Xuegod64 => 64,
        }
    }

    /// The other node.
    pub fn peer(self) -> NodeId {
        match self {
            NodeId::Xuegod63 => NodeId::Xuegod64,
            NodeId::Xuegod64 => NodeId::Xuegod63,
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// The address plan of one sandbox. Pods live in `10.<subnet>.0.0/16`
/// (`10.<subnet>.63.0/24` on xuegod63, `10.<subnet>.64.0/24` on xuegod64),
/// nodes at `10.10.0.63` and `10.10.0.64` on the switch, and services in
/// `10.96.0.0/16`.
#[derive(Clone, Copy, Debug)]
pub struct Addressing {
    subnet: u8,
}

impl Addressing {
    pub const SERVICE_CIDR: &str = "10.96.0.0/16";
    const NODE_NET: u8 = 10;
    const SERVICE_NET: u8 = 96;
    /// The first pod address on a node; `.1` is the node's gateway.
    const FIRST_POD_HOST: u8 = 2;

    pub(crate) fn new(subnet: u8) -> Result<Addressing> {
        if subnet == Self::NODE_NET || subnet == Self::SERVICE_NET {
            bail!("pod subnet 10.{subnet}.0.0/16 would overlap the node or service network");
        }
        Ok(Addressing { subnet })
    }

    /// The second octet of the pod network.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    /// The node's address on the switch.
    pub fn node_ip(&self, node: NodeId) -> Ipv4Addr {
        Ipv4Addr::new(10, Self::NODE_NET, 0, node.number())
    }

    /// The node's address on its pod bridge, the pods' default gateway.
    pub fn pod_gateway(&self, node: NodeId) -> Ipv4Addr {
        self.pod_ip(node, 1)
    }

    /// Address `host` in the node's pod subnet.
    pub fn pod_ip(&self, node: NodeId, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, node.number(), host)
    }

    /// The node's pod subnet, such as `10.244.63.0/24`.
    pub fn pod_cidr(&self, node: NodeId) -> String {
        format!("{}/24", self.pod_ip(node, 0))
    }

    /// The `n`th address in the service network.
    pub fn service_ip(&self, n: u16) -> Ipv4Addr {
        let [high, low] = n.to_be_bytes();
        Ipv4Addr::new(10, Self::SERVICE_NET, high, low)
    }

    /// The lowest address in the node's pod subnet not in `used`.
    pub(crate) fn free_pod_ip(
        &self,
        node: NodeId,
        used: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Ipv4Addr> {
        (Self::FIRST_POD_HOST..u8::MAX)
            .map(|host| self.pod_ip(node, host))
            .find(|&ip| !used(ip))
            .with_context(|| format!("no free address left in {}", self.pod_cidr(node)))
    }
}

/// A node of a running sandbox: a network namespace that routes between
/// the switch and its pods.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    name: String,
    netns_name: String,
    netns: NetNs,
    ip: Ipv4Addr,
}

impl Node {
    pub(crate) fn new(
        id: NodeId,
        name: String,
        netns_name: String,
        netns: NetNs,
        ip: Ipv4Addr,
    ) -> Node {
        Node {
            id,
            name,
            netns_name,
            netns,
            ip,
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The Kubernetes node name, which the agent's `--node` takes.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name `ip netns` knows the node's namespace by.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// The node's address on the switch.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// The file `ip netns add <name>` creates.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Makes the switch: a bridge the nodes' uplinks join.
pub(crate) fn setup_switch(switch: &str) -> Result<()> {
    ip(&format!("-n {switch} link add {SWITCH_BRIDGE} type bridge"))?;
    ip(&format!("-n {switch} link set {SWITCH_BRIDGE} up"))?;
    Ok(())
}

/// Wires a node: `eth0` on the switch, `cni0` as its pods' gateway, a route
/// to the other node's pods, and forwarding on. There is no default route.
pub(crate) fn setup_node(switch: &str, node: &Node, addressing: &Addressing) -> Result<()> {
    let ns = node.netns_name();
    // The switch-side end is named after the node, so `ip -n <switch> link`
    // reads like a port list.
    let port = node.id().base_name();
    ip(&format!(
        "link add eth0 netns {ns} type veth peer name {port} netns {switch}"
    ))?;
    ip(&format!(
        "-n {switch} link set {port} master {SWITCH_BRIDGE} up"
    ))?;
    let uplink = node.ip();
    ip(&format!("-n {ns} addr add {uplink}/24 dev eth0"))?;
    ip(&format!("-n {ns} link set eth0 up"))?;

    let gateway = addressing.pod_gateway(node.id());
    ip(&format!("-n {ns} link add {POD_BRIDGE} type bridge"))?;
    ip(&format!("-n {ns} addr add {gateway}/24 dev {POD_BRIDGE}"))?;
    ip(&format!("-n {ns} link set {POD_BRIDGE} up"))?;

    let peer = node.id().peer();
    let (peer_pods, peer_ip) = (addressing.pod_cidr(peer), addressing.node_ip(peer));
    ip(&format!("-n {ns} route add {peer_pods} via {peer_ip}"))?;

    // /proc/sys/net shows the namespace of the thread that opens it, so a
    // thread inside the node flips forwarding there and nowhere else.
    node.netns()
        .run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
        .with_context(|| format!("cannot enable forwarding in {ns}"))
}

/// Wires a pod: `eth0` inside it, its peer `host_veth` on the node's pod
/// bridge, the pod's address, and a default route that leads only to the
/// node.
pub(crate) fn setup_pod(
    pod_ns: &str,
    node: &Node,
    host_veth: &str,
    ip_addr: Ipv4Addr,
    addressing: &Addressing,
) -> Result<()> {
    let node_ns = node.netns_name();
    ip(&format!(
        "link add eth0 netns {pod_ns} type veth peer name {host_veth} netns {node_ns}"
    ))?;
    ip(&format!(
        "-n {node_ns} link set {host_veth} master {POD_BRIDGE} up"
    ))?;
    ip(&format!("-n {pod_ns} addr add {ip_addr}/24 dev eth0"))?;
    ip(&format!("-n {pod_ns} link set eth0 up"))?;
    let gateway = addressing.pod_gateway(node.id());
    ip(&format!("-n {pod_ns} route add default via {gateway}"))?;
    Ok(())
}
