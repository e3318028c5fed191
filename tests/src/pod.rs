//! Pods: what a test asks for, and the handle it gets back to open sockets
//! inside the pod's network namespace.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use weir::netns::NetNs;

use crate::socket;
use crate::topology::NodeId;

/// A pod to create. `PodSpec::new` fills in the defaults, and the builder
/// methods or struct update syntax change them.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    /// The Kubernetes namespace.
    pub namespace: String,
    pub node: NodeId,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The container's named ports, which Services may target by name.
    pub ports: Vec<(String, u16)>,
    /// The pod's Ready condition; only ready pods are service endpoints.
    pub ready: bool,
}

impl PodSpec {
    /// A ready pod in namespace `default` with service account `default`,
    /// no labels, and one container port `http` 9080, as bookinfo's pods.
    pub fn new(name: &str, node: NodeId) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            node,
            service_account: "default".to_owned(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            ports: vec![("http".to_owned(), 9080)],
            ready: true,
        }
    }

    pub fn namespace(mut self, namespace: &str) -> PodSpec {
        namespace.clone_into(&mut self.namespace);
        self
    }

    pub fn service_account(mut self, service_account: &str) -> PodSpec {
        service_account.clone_into(&mut self.service_account);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> PodSpec {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn ports(mut self, ports: &[(&str, u16)]) -> PodSpec {
        self.ports = ports
            .iter()
            .map(|&(name, port)| (name.to_owned(), port))
            .collect();
        self
    }

    pub fn ready(mut self, ready: bool) -> PodSpec {
        self.ready = ready;
        self
    }
}

/// A pod of a running sandbox. Clones share the namespace handle, which
/// stays usable (though unnamed) even after the sandbox deleted the pod.
#[derive(Clone, Debug)]
pub struct Pod {
    name: String,
    namespace: String,
    node: NodeId,
    ip: Ipv4Addr,
    netns_name: String,
    netns: Arc<NetNs>,
}

impl Pod {
    pub(crate) fn new(spec: &PodSpec, ip: Ipv4Addr, netns_name: String, netns: NetNs) -> Pod {
        Pod {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            node: spec.node,
            ip,
            netns_name,
            netns: Arc::new(netns),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip():port`, the address to connect to this pod on.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// The name `ip netns` knows the pod's namespace by.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// An IPv4 listener on `0.0.0.0:port` inside the pod.
    pub fn listen(&self, port: u16) -> io::Result<TcpListener> {
        socket::listen(&self.netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    }

    /// A dual-stack listener on `[::]:port` inside the pod, as a Java server
    /// opens; IPv4 clients show up as `::ffff:a.b.c.d`.
    pub fn listen_v6(&self, port: u16) -> io::Result<TcpListener> {
        socket::listen(
            &self.netns,
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        )
    }

    /// Connects from inside the pod, from a socket of `addr`'s family.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        socket::connect(&self.netns, addr)
    }

    /// Starts a process that lives in the pod's namespace, as a pod's pause
    /// container does, so that the pod can be found from the node's
    /// processes. It is killed when the handle drops, which must be before
    /// the sandbox drops (declare it after the sandbox).
    pub fn spawn_pause(&self) -> io::Result<Pause> {
        let netns_fd = self.netns.file().as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec the child only makes one system
        // call, on a descriptor that `self` keeps open.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Pause(cmd.spawn()?))
    }

    /// Connects from inside the pod from an IPv6 socket to the IPv4-mapped
    /// form of `addr`, `::ffff:a.b.c.d`, as a dual-stack client does; the
    /// eBPF side sees this in connect6, not connect4.
    pub fn connect_v6(&self, addr: SocketAddrV4) -> io::Result<TcpStream> {
        let mapped = SocketAddrV6::new(addr.ip().to_ipv6_mapped(), addr.port(), 0, 0);
        socket::connect(&self.netns, mapped.into())
    }
}

/// A process in a pod's namespace; killed and reaped on drop.
#[derive(Debug)]
pub struct Pause(Child);

impl Pause {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
