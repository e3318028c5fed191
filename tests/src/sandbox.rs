//! A sandbox: the two-node cluster of network namespaces, the manifests
//! and netns directories its agents read, its cgroup, and the agents
//! started in it. Dropping it removes all of that, also when a test panics.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use weir::netns::NetNs;

use crate::agent::{self, Agent};
use crate::cgroup::SandboxCgroup;
use crate::command::{ip, run};
use crate::manifests::{self, Manifests};
use crate::pod::{Pod, PodSpec};
use crate::topology::{self, Addressing, Node, NodeId};

/// Every sandbox's directory lives under here, on tmpfs.
const SANDBOX_ROOT: &str = "/run/weir-sandbox";
/// How much of a test's name goes into its tag.
const TAG_NAME_LEN: usize = 12;

/// What makes one sandbox distinct from the others running at the same time.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// Prefixes every name the sandbox makes: nodes are `<tag>-xuegod63`,
    /// namespaces `weir-<tag>-…`, the cgroup `weir-<tag>`. `None` is the
    /// demo's sandbox, whose nodes are exactly `xuegod63` and `xuegod64`.
    pub tag: Option<String>,
    /// The second octet of the pod network `10.<subnet>.0.0/16`.
    pub subnet: u8,
}

impl SandboxOptions {
    /// The demo's sandbox: untagged, pods in 10.244.0.0/16.
    pub fn demo() -> SandboxOptions {
        SandboxOptions {
            tag: None,
            subnet: 244,
        }
    }

    /// A sandbox for one test, with a tag from [`unique_tag`] and a pod
    /// network picked from 10.100.0.0/16 to 10.199.0.0/16 by that tag.
    /// Every address lives in the sandbox's own namespaces, so two
    /// sandboxes that pick the same network still do not collide; distinct
    /// networks only make logs easier to tell apart.
    pub fn for_test(test_name: &str) -> SandboxOptions {
        let tag = unique_tag(test_name);
        let mut hasher = DefaultHasher::new();
        tag.hash(&mut hasher);
        let subnet = 100 + (hasher.finish() % 100) as u8;
        SandboxOptions {
            tag: Some(tag),
            subnet,
        }
    }
}

/// A tag unique across the processes and sandboxes of one machine: the
/// end of the test's name, the process id and a counter, such as
/// `cross-node-4711-0`. It is short, because it becomes part of node,
/// file and cgroup names.
pub fn unique_tag(test_name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let last_segment = test_name.rsplit("::").next().unwrap_or_default();
    let short: String = last_segment
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(TAG_NAME_LEN)
        .collect();
    let short = match short.trim_matches('-') {
        "" => "test",
        trimmed => trimmed,
    };
    format!(
        "{short}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running sandbox. See the crate documentation for the layout.
pub struct Sandbox {
    /// `""` or `"<tag>-"`, before node names.
    node_prefix: String,
    /// `"weir-"` or `"weir-<tag>-"`, before namespace names.
    netns_prefix: String,
    addressing: Addressing,
    dir: PathBuf,
    manifests: Manifests,
    netns_dir: PathBuf,
    /// Every network namespace made and not yet deleted, in creation order.
    netns: Vec<String>,
    /// Indexed by `NodeId::index`.
    nodes: Vec<Node>,
    /// Keyed by (Kubernetes namespace, name).
    pods: BTreeMap<(String, String), (Pod, PodSpec)>,
    /// Kubernetes namespaces that have a manifest.
    namespaces: BTreeSet<String>,
    /// Numbers the node-side ends of pod veths.
    next_veth: u32,
    agents: Vec<Arc<Mutex<Child>>>,
    /// Nodes that ran an agent, with the binary that uninstalls it.
    installed: BTreeMap<String, PathBuf>,
    /// Dropped after `drop` has removed everything else, since the agents
    /// must be gone first: it moves this process back to its own cgroup,
    /// removes the sandbox's cgroups, and lets the next sandbox start.
    cgroup: SandboxCgroup,
}

impl Sandbox {
    /// Builds the switch and both nodes, and moves this process into the
    /// sandbox's `pods` cgroup. Waits while another sandbox of this process
    /// is alive, since a process can be in only one cgroup.
    pub fn new(options: SandboxOptions) -> Result<Sandbox> {
        let addressing = Addressing::new(options.subnet)?;
        let (label, node_prefix, netns_prefix) = match &options.tag {
            Some(tag) => {
                check_tag(tag)?;
                (tag.as_str(), format!("{tag}-"), format!("weir-{tag}-"))
            }
            None => ("demo", String::new(), "weir-".to_owned()),
        };
        let cgroup = SandboxCgroup::create(&format!("weir-{label}"))?;
        let dir = Path::new(SANDBOX_ROOT).join(label);
        fs::create_dir_all(SANDBOX_ROOT)
            .with_context(|| format!("cannot create {SANDBOX_ROOT}"))?;
        fs::create_dir(&dir).with_context(|| {
            format!(
                "cannot create {} (left over from an earlier run?)",
                dir.display()
            )
        })?;
        let mut sandbox = Sandbox {
            node_prefix,
            netns_prefix,
            addressing,
            manifests: Manifests::new(dir.join("manifests")),
            netns_dir: dir.join("netns"),
            dir,
            netns: Vec::new(),
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            namespaces: BTreeSet::new(),
            next_veth: 0,
            agents: Vec::new(),
            installed: BTreeMap::new(),
            cgroup,
        };
        // From here on, dropping `sandbox` undoes whatever was made.
        sandbox.build()?;
        Ok(sandbox)
    }

    fn build(&mut self) -> Result<()> {
        for dir in [self.manifests.dir(), &self.netns_dir] {
            fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        self.ensure_namespace("default")?;
        let switch = format!("{}switch", self.netns_prefix);
        self.add_netns(&switch)?;
        topology::setup_switch(&switch)?;
        for id in NodeId::ALL {
            let netns_name = format!("{}{}", self.netns_prefix, id.base_name());
            let netns = self.add_netns(&netns_name)?;
            let name = format!("{}{}", self.node_prefix, id.base_name());
            let node = Node::new(id, name, netns_name, netns, self.addressing.node_ip(id));
            topology::setup_node(&switch, &node, &self.addressing)?;
            self.nodes.push(node);
        }
        Ok(())
    }

    /// The sandbox's own directory, which holds the agents' logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the agents get as `--manifests`.
    pub fn manifests_dir(&self) -> &Path {
        self.manifests.dir()
    }

    /// What the agents get as `--netns-dir`: a symlink per pod to its
    /// namespace file, so they discover only this sandbox's pods.
    pub fn netns_dir(&self) -> &Path {
        &self.netns_dir
    }

    /// What the agents get as `--cgroup`: the sandbox's cgroup, holding this
    /// process (in `pods/`) and the agents.
    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.path()
    }

    pub fn addressing(&self) -> &Addressing {
        &self.addressing
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// Creates a pod: a namespace with `eth0` on its node's pod bridge, the
    /// node's lowest free pod address, and a default route via the node;
    /// then the netns symlink and the pod's manifest, in that order, so an
    /// agent that reads the manifest can already find the namespace.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Pod> {
        let key = (spec.namespace.clone(), spec.name.clone());
        if self.pods.contains_key(&key) {
            bail!("pod {}/{} already exists", spec.namespace, spec.name);
        }
        let ip = self.addressing.free_pod_ip(spec.node, |ip| {
            self.pods.values().any(|(pod, _)| pod.ip() == ip)
        })?;
        let netns_name = format!("{}{}.{}", self.netns_prefix, spec.name, spec.namespace);
        let netns = self.add_netns(&netns_name)?;
        let veth = format!("veth{}", self.next_veth);
        self.next_veth += 1;
        topology::setup_pod(
            &netns_name,
            self.node(spec.node),
            &veth,
            ip,
            &self.addressing,
        )?;
        let link = self.netns_dir.join(&netns_name);
        std::os::unix::fs::symlink(topology::netns_path(&netns_name), &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
        self.ensure_namespace(&spec.namespace)?;
        self.write_pod(&spec, ip)?;
        let pod = Pod::new(&spec, ip, netns_name, netns);
        self.pods.insert(key, (pod.clone(), spec));
        Ok(pod)
    }

    /// Rewrites the pod's manifest with its Ready condition set to `ready`.
    pub fn set_pod_ready(&mut self, pod: &Pod, ready: bool) -> Result<()> {
        let key = (pod.namespace().to_owned(), pod.name().to_owned());
        let (_, spec) = self
            .pods
            .get_mut(&key)
            .with_context(|| format!("no pod {}/{} in this sandbox", key.0, key.1))?;
        spec.ready = ready;
        let spec = spec.clone();
        self.write_pod(&spec, pod.ip())
    }

    /// Deletes a pod: first its manifest, so the agent forgets it before
    /// the namespace goes, then its netns symlink and namespace.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        let key = (pod.namespace().to_owned(), pod.name().to_owned());
        self.pods
            .remove(&key)
            .with_context(|| format!("no pod {}/{} in this sandbox", key.0, key.1))?;
        self.manifests
            .remove(&manifests::pod_file(pod.namespace(), pod.name()))?;
        let link = self.netns_dir.join(pod.netns_name());
        fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
        ip(&format!("netns del {}", pod.netns_name()))?;
        self.netns.retain(|name| name != pod.netns_name());
        Ok(())
    }

    /// Writes (or rewrites) a Namespace with `labels`, such as
    /// `weir.dev/mesh=enabled`. Pods and services write an unlabelled one
    /// for their namespace if none exists yet.
    pub fn add_namespace(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        self.namespaces.insert(name.to_owned());
        self.manifests.write_object(
            &manifests::namespace_file(name),
            &manifests::namespace(name, labels),
        )
    }

    /// Writes a ClusterIP Service with one TCP port named `tcp`, which the
    /// proxy forwards at L4.
    pub fn add_service(
        &mut self,
        name: &str,
        namespace: &str,
        cluster_ip: Ipv4Addr,
        port: u16,
        target_port: u16,
        selector: &[(&str, &str)],
    ) -> Result<()> {
        self.write_service(
            "tcp",
            name,
            namespace,
            cluster_ip,
            (port, target_port),
            selector,
        )
    }

    /// Writes a ClusterIP Service with one TCP port named `http`, which the
    /// proxy serves as HTTP, with VirtualService routes.
    pub fn add_http_service(
        &mut self,
        name: &str,
        namespace: &str,
        cluster_ip: Ipv4Addr,
        port: u16,
        target_port: u16,
        selector: &[(&str, &str)],
    ) -> Result<()> {
        self.write_service(
            "http",
            name,
            namespace,
            cluster_ip,
            (port, target_port),
            selector,
        )
    }

    fn write_service(
        &mut self,
        port_name: &str,
        name: &str,
        namespace: &str,
        cluster_ip: Ipv4Addr,
        (port, target_port): (u16, u16),
        selector: &[(&str, &str)],
    ) -> Result<()> {
        self.ensure_namespace(namespace)?;
        let service = manifests::service(
            port_name,
            name,
            namespace,
            cluster_ip,
            port,
            target_port,
            selector,
        );
        self.manifests
            .write_object(&manifests::service_file(namespace, name), &service)
    }

    /// Writes any file into the manifests directory, atomically; for tests
    /// of manifests the sandbox would never write.
    pub fn write_manifest(&self, file_name: &str, yaml: &str) -> Result<()> {
        self.manifests.write(file_name, yaml)
    }

    pub fn remove_manifest(&self, file_name: &str) -> Result<()> {
        self.manifests.remove(file_name)
    }

    /// Starts `weir run` for `node` (see [`agent_binary`](crate::agent_binary)
    /// for which binary), inside the node's namespace and its own
    /// `agent-<node>` cgroup, logging to `<dir>/agent-<node>.log`.
    /// `extra_args` are appended to the command line.
    pub fn start_agent(&mut self, node: NodeId, extra_args: &[&str]) -> Result<Agent> {
        let manifests = self.manifests.dir().to_owned();
        let source = [OsStr::new("--manifests"), manifests.as_os_str()];
        self.spawn_agent(node, source, extra_args)
    }

    /// Like [`Sandbox::start_agent`], with the Kubernetes API source: the
    /// agent reads the API server that `kubeconfig` names (see
    /// [`ApiServer`](crate::ApiServer)) instead of the manifests directory.
    pub fn start_agent_with_kubeconfig(
        &mut self,
        node: NodeId,
        kubeconfig: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let source = [OsStr::new("--kubeconfig"), kubeconfig.as_os_str()];
        self.spawn_agent(node, source, extra_args)
    }

    fn spawn_agent(
        &mut self,
        node: NodeId,
        source: [&OsStr; 2],
        extra_args: &[&str],
    ) -> Result<Agent> {
        let bin = agent::agent_binary()?;
        let node = &self.nodes[node.index()];
        let cgroup_dir = self.cgroup.agent_cgroup(node.name())?;
        let cmd = agent::run_command(
            &bin,
            node.name(),
            source,
            self.cgroup.path(),
            &self.netns_dir,
            extra_args,
        );
        let log = self.dir.join(format!("agent-{}.log", node.name()));
        let agent = Agent::spawn(cmd, node, &cgroup_dir, log)?;
        self.agents.push(agent.process());
        self.installed.insert(node.name().to_owned(), bin);
        Ok(agent)
    }

    /// Leaves everything in place, for the demo's `--keep`: namespaces,
    /// directories, cgroups, and this process inside the sandbox's cgroup.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    fn add_netns(&mut self, name: &str) -> Result<NetNs> {
        ip(&format!("netns add {name}"))?;
        self.netns.push(name.to_owned());
        ip(&format!("-n {name} link set lo up"))?;
        let path = topology::netns_path(name);
        NetNs::open(&path).with_context(|| format!("cannot open {}", path.display()))
    }

    fn ensure_namespace(&mut self, name: &str) -> Result<()> {
        if self.namespaces.contains(name) {
            return Ok(());
        }
        self.add_namespace(name, &[])
    }

    fn write_pod(&self, spec: &PodSpec, ip: Ipv4Addr) -> Result<()> {
        let node = self.node(spec.node);
        let pod = manifests::pod(spec, ip, node.name(), node.ip());
        self.manifests
            .write_object(&manifests::pod_file(&spec.namespace, &spec.name), &pod)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for process in &self.agents {
            agent::stop(process);
        }
        for (node, bin) in &self.installed {
            if let Err(error) = run(Command::new(bin).args(["uninstall", "--node", node])) {
                eprintln!("weir-sandbox: {error:#}");
            }
        }
        for name in self.netns.iter().rev() {
            if let Err(error) = ip(&format!("netns del {name}")) {
                eprintln!("weir-sandbox: {error:#}");
            }
        }
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "weir-sandbox: cannot remove {}: {error}",
                self.dir.display()
            );
        }
    }
}

/// Tags become parts of file, cgroup and Kubernetes node names.
fn check_tag(tag: &str) -> Result<()> {
    let valid = tag.starts_with(|c: char| c.is_ascii_alphanumeric())
        && tag
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!("sandbox tag {tag:?} must be lowercase letters, digits and dashes");
    }
    Ok(())
}

/// These build real sandboxes, so they need root. They start no agent.
#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddrV4, TcpListener, TcpStream};

    use super::*;

    fn sandbox(test_name: &str) -> Sandbox {
        Sandbox::new(SandboxOptions::for_test(test_name)).expect("cannot build sandbox")
    }

    /// Sends a byte each way over a connection the server accepted, and
    /// returns the client address the server saw.
    fn exchange(mut client: TcpStream, listener: &TcpListener) -> IpAddr {
        let (mut server, peer) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        peer.ip()
    }

    #[test]
    fn pods_reach_pods_across_and_within_nodes() {
        let mut sandbox = sandbox("pods_reach_pods_across_and_within_nodes");
        let productpage = sandbox
            .add_pod(PodSpec::new("productpage", NodeId::Xuegod63))
            .unwrap();
        let reviews = sandbox
            .add_pod(PodSpec::new("reviews", NodeId::Xuegod64))
            .unwrap();
        let ratings = sandbox
            .add_pod(PodSpec::new("ratings", NodeId::Xuegod63))
            .unwrap();
        assert_eq!(
            productpage.ip(),
            sandbox.addressing().pod_ip(NodeId::Xuegod63, 2)
        );
        assert_eq!(
            ratings.ip(),
            sandbox.addressing().pod_ip(NodeId::Xuegod63, 3)
        );
        assert_eq!(
            reviews.ip(),
            sandbox.addressing().pod_ip(NodeId::Xuegod64, 2)
        );

        for server in [&reviews, &ratings] {
            let listener = server.listen(9080).unwrap();
            let client = productpage.connect(server.addr(9080)).unwrap();
            assert_eq!(exchange(client, &listener), IpAddr::V4(productpage.ip()));
        }

        // A dual-stack client and server see each other as mapped addresses.
        let listener = ratings.listen_v6(9081).unwrap();
        let client = reviews
            .connect_v6(SocketAddrV4::new(ratings.ip(), 9081))
            .unwrap();
        assert_eq!(
            exchange(client, &listener),
            IpAddr::V6(reviews.ip().to_ipv6_mapped())
        );
    }

    #[test]
    fn nothing_routes_out_of_the_sandbox() {
        let mut sandbox = sandbox("nothing_routes_out_of_the_sandbox");
        let pod = sandbox
            .add_pod(PodSpec::new("productpage", NodeId::Xuegod63))
            .unwrap();
        // TEST-NET-1: `route get` asks the kernel's routing table; no packet is sent.
        let outside = "192.0.2.1";
        let via_node = ip(&format!("-n {} route get {outside}", pod.netns_name())).unwrap();
        assert!(
            via_node.contains(
                &sandbox
                    .addressing()
                    .pod_gateway(NodeId::Xuegod63)
                    .to_string()
            )
        );
        for id in NodeId::ALL {
            let node = sandbox.node(id).netns_name();
            assert_eq!(
                ip(&format!("-n {node} route show default")).unwrap().trim(),
                ""
            );
            let error = ip(&format!("-n {node} route get {outside}")).unwrap_err();
            assert!(format!("{error:#}").contains("unreachable"), "{error:#}");
        }
    }

    #[test]
    fn manifests_describe_the_cluster() {
        let mut sandbox = sandbox("manifests_describe_the_cluster");
        sandbox
            .add_namespace("bookinfo", &[("weir.dev/mesh", "enabled")])
            .unwrap();
        let spec = PodSpec::new("reviews-v1", NodeId::Xuegod64)
            .namespace("bookinfo")
            .service_account("bookinfo-reviews")
            .label("app", "reviews")
            .ready(false);
        let pod = sandbox.add_pod(spec).unwrap();
        let cluster_ip = sandbox.addressing().service_ip(10);
        sandbox
            .add_service(
                "reviews",
                "bookinfo",
                cluster_ip,
                9080,
                9080,
                &[("app", "reviews")],
            )
            .unwrap();

        let manifests_dir = sandbox.manifests_dir().to_owned();
        let read = |file: &str| -> serde_json::Value {
            let text = fs::read_to_string(manifests_dir.join(file)).unwrap();
            serde_yaml::from_str(&text).unwrap()
        };
        let namespace = read("namespace-bookinfo.yaml");
        assert_eq!(namespace["metadata"]["labels"]["weir.dev/mesh"], "enabled");
        let manifest = read("pod-bookinfo-reviews-v1.yaml");
        assert_eq!(
            manifest["spec"]["nodeName"],
            sandbox.node(NodeId::Xuegod64).name()
        );
        assert_eq!(manifest["spec"]["serviceAccountName"], "bookinfo-reviews");
        assert_eq!(manifest["metadata"]["labels"]["app"], "reviews");
        assert_eq!(manifest["status"]["podIP"], pod.ip().to_string());
        assert_eq!(manifest["status"]["conditions"][0]["status"], "False");
        let service = read("service-bookinfo-reviews.yaml");
        assert_eq!(service["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(service["spec"]["selector"]["app"], "reviews");

        sandbox.set_pod_ready(&pod, true).unwrap();
        assert_eq!(
            read("pod-bookinfo-reviews-v1.yaml")["status"]["conditions"][0]["status"],
            "True"
        );

        let link = sandbox.netns_dir().join(pod.netns_name());
        assert!(link.exists());
        sandbox.remove_pod(&pod).unwrap();
        assert!(!link.exists());
        assert!(!manifests_dir.join("pod-bookinfo-reviews-v1.yaml").exists());
        let namespaces = ip("netns list").unwrap();
        assert!(!namespaces.contains(pod.netns_name()));
    }

    #[test]
    fn drop_removes_everything() {
        let options = SandboxOptions::for_test("drop_removes_everything");
        let prefix = format!("weir-{}-", options.tag.as_deref().unwrap());
        let mut sandbox = Sandbox::new(options).unwrap();
        sandbox
            .add_pod(PodSpec::new("productpage", NodeId::Xuegod63))
            .unwrap();
        let cgroup = sandbox.cgroup_path().to_owned();
        let dir = sandbox.dir().to_owned();
        let namespaces = || ip("netns list").unwrap();
        assert_eq!(
            namespaces()
                .lines()
                .filter(|line| line.starts_with(&prefix))
                .count(),
            4
        );
        assert!(cgroup.join("pods").is_dir());
        let procs = fs::read_to_string(cgroup.join("pods/cgroup.procs")).unwrap();
        assert!(
            procs
                .lines()
                .any(|pid| pid == std::process::id().to_string())
        );

        drop(sandbox);
        assert!(!namespaces().lines().any(|line| line.starts_with(&prefix)));
        assert!(!cgroup.exists());
        assert!(!dir.exists());
    }

    #[test]
    fn tags_are_short_and_distinct() {
        let first = unique_tag("crate::module::Some_Long_Test_Name_Here");
        let second = unique_tag("crate::module::Some_Long_Test_Name_Here");
        assert_ne!(first, second);
        assert!(first.starts_with("some-long-te-"), "{first}");
        assert!(check_tag(&first).is_ok());
        assert_eq!(unique_tag("::__").split('-').next(), Some("test"));
    }
}
