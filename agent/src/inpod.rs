//! Per-pod socket factories, and finding pods' network namespaces.
//!
//! A socket belongs for life to the network namespace it was created in. So
//! each enrolled pod gets one thread that setns()'d into the pod's namespace
//! once, and makes that pod's sockets on request: its listener, and the
//! proxy's upstream sockets. Tokio workers never change namespace, and no
//! socket can be made in the wrong one.
//!
//! A pod's namespace is found by its IP ([`NetnsFinder`]): among the files
//! of `--netns-dir` and the namespaces of the node's processes (a pod's
//! sandbox always has its pause process), or first from what the CNI
//! plugin said when it made the sandbox.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Socket, Type};
use tokio::sync::oneshot;

use crate::model::WorkloadKey;
use crate::netns::{self, NetNs, NsId};

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one pod's network namespace.
#[derive(Debug)]
pub struct SocketFactory {
    jobs: mpsc::Sender<Job>,
    netns_cookie: u64,
}

impl SocketFactory {
    /// Starts the pod's thread; it ends when the factory is dropped.
    pub fn start(netns: &NetNs, pod: &str) -> io::Result<SocketFactory> {
        let file = netns.file().try_clone()?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("pod-{pod}"))
            .spawn(move || {
                let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| {
                        let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
                        netns::netns_cookie(&probe)
                    });
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })?;
        let netns_cookie = ready
            .recv()
            .map_err(|_| io::Error::other("pod thread exited at start"))??;
        Ok(SocketFactory { jobs, netns_cookie })
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Runs `make` on the pod's thread and returns what it made.
    async fn make<T, F>(&self, make: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(make());
            }))
            .map_err(|_| io::Error::other("pod thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("pod thread dropped a request"))?
    }

    /// An unconnected TCP socket in the pod for a connection to `peer`,
    /// bound to `source` when given.
    pub async fn tcp_socket(
        &self,
        peer: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<tokio::net::TcpSocket> {
        let socket = self
            .make(move || {
                let socket = Socket::new(Domain::for_address(peer), Type::STREAM, None)?;
                if let Some(ip) = source {
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                }
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })
            .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// A listener in the pod. SO_REUSEPORT lets a new agent bind before the
    /// old one has let go, so restarts do not refuse connections.
    pub async fn listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.make(move || {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })
        .await
    }
}

/// How a pod's namespace was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A file in `--netns-dir`.
    NetnsDir,
    /// A process on the node lives in it.
    Process,
    /// The CNI plugin named it when the pod's sandbox was made.
    Cni,
}

/// A network namespace found on the node, held open.
#[derive(Clone, Debug)]
pub struct FoundNetns {
    netns: Arc<NetNs>,
    id: NsId,
    source: Source,
}

impl FoundNetns {
    fn open(path: &Path, source: Source) -> io::Result<FoundNetns> {
        let netns = NetNs::open(path)?;
        let id = netns.id()?;
        Ok(FoundNetns {
            netns: Arc::new(netns),
            id,
            source,
        })
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn id(&self) -> NsId {
        self.id
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// A path that names this namespace for as long as this handle lives:
    /// the `--netns-dir` file, or else this process's descriptor of it. A
    /// process's `/proc/<pid>/ns/net` goes with that process, and a
    /// runtime's file with the pod's sandbox, while an enrolled pod's path
    /// is used until the pod is released (`nsenter --net=` for iptables).
    pub fn path(&self) -> PathBuf {
        match self.source {
            Source::NetnsDir => self.netns.path().to_path_buf(),
            Source::Process | Source::Cni => PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.netns.file().as_raw_fd()
            )),
        }
    }
}

/// What the CNI plugin said about a pod when its sandbox was made.
#[derive(Debug)]
struct Hint {
    netns: FoundNetns,
    ips: Vec<IpAddr>,
    container_id: String,
    since: Instant,
}

/// A hint for a pod the model never shows is dropped after this long.
const HINT_TTL: Duration = Duration::from_secs(60);

/// Finds pods' network namespaces by IP. It looks at every namespace file in
/// a directory and at the namespace of every process on the node, each
/// namespace once, and asks each for its addresses (one netlink dump each).
/// Namespaces the CNI plugin named for a pod are tried first.
#[derive(Debug)]
pub struct NetnsFinder {
    dir: PathBuf,
    proc: PathBuf,
    hints: HashMap<WorkloadKey, Hint>,
}

impl NetnsFinder {
    pub fn new(dir: PathBuf) -> NetnsFinder {
        NetnsFinder {
            dir,
            proc: PathBuf::from("/proc"),
            hints: HashMap::new(),
        }
    }

    /// Maps each address found to the namespace that holds it. Loopback and
    /// link-local addresses are skipped: every namespace has them. The
    /// agent's own namespace and the host's are skipped too: no pod lives
    /// there. An address in two namespaces maps to the first found, and
    /// `--netns-dir` is looked at first.
    pub fn scan(&self) -> io::Result<HashMap<IpAddr, FoundNetns>> {
        let mut seen = Seen::default();
        for own in ["self", "1"] {
            if let Ok(id) = NsId::of(self.proc.join(own).join("ns/net")) {
                seen.admit(id);
            }
        }
        let mut namespaces = Vec::new();
        let mut consider = |path: &Path, source| {
            // A pod or process may go away while we look; skip what vanished.
            let Ok(id) = NsId::of(path) else { return };
            if !seen.admit(id) {
                return;
            }
            match FoundNetns::open(path, source) {
                // The process may have exited, and its pid been reused,
                // between the stat and the open.
                Ok(found) if found.id == id => namespaces.push(found),
                _ => seen.forget(id),
            }
        };
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    consider(&entry?.path(), Source::NetnsDir);
                }
            }
            // Without the directory, processes still show every namespace.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for entry in std::fs::read_dir(&self.proc)? {
            let Ok(entry) = entry else { continue };
            if parse_pid(&entry.file_name()).is_some() {
                consider(&entry.path().join("ns/net"), Source::Process);
            }
        }

        let mut found = HashMap::new();
        for (netns, addrs) in namespaces.iter().zip(addresses_of_each(&namespaces)) {
            let Ok(addrs) = addrs else { continue };
            for ip in addrs {
                if !ip.is_loopback() && !is_link_local(ip) {
                    found.entry(ip).or_insert_with(|| netns.clone());
                }
            }
        }
        Ok(found)
    }

    /// Records what the CNI plugin said: the pod's namespace is at `path`
    /// (opened now, so it stays valid) and holds `ips`. Returns the
    /// namespace's id.
    pub fn hint(
        &mut self,
        key: WorkloadKey,
        container_id: String,
        path: &Path,
        ips: Vec<IpAddr>,
    ) -> io::Result<NsId> {
        let netns = FoundNetns::open(path, Source::Cni)?;
        let id = netns.id;
        self.hints.insert(
            key,
            Hint {
                netns,
                ips,
                container_id,
                since: Instant::now(),
            },
        );
        Ok(id)
    }

    /// Forgets the hint of the sandbox `container_id` (of any sandbox when
    /// it is empty): a DEL for an old sandbox leaves a newer one's hint.
    pub fn unhint(&mut self, key: &WorkloadKey, container_id: &str) {
        if self
            .hints
            .get(key)
            .is_some_and(|hint| container_id.is_empty() || hint.container_id == container_id)
        {
            self.hints.remove(key);
        }
    }

    /// The pod's IPv4 address as the CNI plugin saw it, for pods whose
    /// address the model does not know yet: the kubelet reports it only
    /// after the CNI plugins ran.
    pub fn hinted_ipv4(&self, key: &WorkloadKey) -> Option<Ipv4Addr> {
        self.hints.get(key)?.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    /// The hinted namespace of the pod, if it really holds `ip`.
    pub fn hinted(&self, key: &WorkloadKey, ip: IpAddr) -> Option<FoundNetns> {
        let hint = self.hints.get(key)?;
        let addrs = hint.netns.netns.run(netlink::addresses).ok()?.ok()?;
        addrs.contains(&ip).then(|| hint.netns.clone())
    }

    /// Drops the hints of pods `known` does not know and that are older than
    /// [`HINT_TTL`]: their DEL was missed, and the hint holds a namespace.
    pub fn prune_hints(&mut self, known: impl Fn(&WorkloadKey) -> bool) {
        self.hints
            .retain(|key, hint| known(key) || hint.since.elapsed() < HINT_TTL);
    }
}

/// Namespaces already looked at, or never to be.
#[derive(Default)]
struct Seen(HashSet<NsId>);

impl Seen {
    /// True the first time `id` comes.
    fn admit(&mut self, id: NsId) -> bool {
        self.0.insert(id)
    }

    fn forget(&mut self, id: NsId) {
        self.0.remove(&id);
    }
}

/// The pid a `/proc` entry stands for, if it is a process's.
fn parse_pid(name: &OsStr) -> Option<u32> {
    let name = name.to_str()?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

/// Each namespace's addresses, asked from one thread that moves from
/// namespace to namespace: a netlink socket belongs to the namespace it is
/// created in. The thread ends afterwards; no other thread moves.
fn addresses_of_each(namespaces: &[FoundNetns]) -> Vec<io::Result<Vec<IpAddr>>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                namespaces
                    .iter()
                    .map(|found| {
                        found.netns.enter()?;
                        netlink::addresses()
                    })
                    .collect()
            })
            .join()
            .unwrap_or_else(|_| Vec::new())
    })
}

/// RTM_GETADDR over NETLINK_ROUTE, with netlink-packet-route.
mod netlink {
    use std::io;
    use std::mem::MaybeUninit;
    use std::net::IpAddr;
    use std::time::Duration;

    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use socket2::{Domain, Protocol, Socket, Type};

    const RECV_TIMEOUT: Duration = Duration::from_secs(2);

    /// The addresses of the calling thread's network namespace, from one
    /// dump over a socket made here.
    pub fn addresses() -> io::Result<Vec<IpAddr>> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        socket.set_read_timeout(Some(RECV_TIMEOUT))?;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = 1;
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        // Unconnected and unaddressed, a netlink socket sends to the kernel.
        socket.send(&bytes)?;

        let mut found = Vec::new();
        let mut buffer = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        loop {
            let n = socket.recv(&mut buffer)?;
            // SAFETY: recv initialised the first n bytes.
            let datagram = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), n) };
            if parse(datagram, &mut found)? {
                return Ok(found);
            }
        }
    }

    /// Adds the addresses in one datagram of the dump to `found`; true once
    /// the dump is done.
    pub(super) fn parse(mut datagram: &[u8], found: &mut Vec<IpAddr>) -> io::Result<bool> {
        while !datagram.is_empty() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(datagram)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(true),
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(true),
                    };
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                    found.extend(local_address(&address));
                }
                _ => {}
            }
            // Messages start at 4-byte boundaries.
            let next = (message.header.length as usize).next_multiple_of(4);
            if next == 0 || next >= datagram.len() {
                break;
            }
            datagram = &datagram[next..];
        }
        Ok(false)
    }

    /// The interface's own address. IFA_LOCAL is that on point-to-point
    /// IPv4 links, where IFA_ADDRESS is the peer's; IPv6 only has
    /// IFA_ADDRESS. getifaddrs() chooses the same way.
    fn local_address(message: &AddressMessage) -> Option<IpAddr> {
        let mut address = None;
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Local(ip) => return Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        address
    }
}

/// The addresses of the calling thread's network namespace.
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| ifa.address)
        .filter_map(
            |addr| match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                _ => None,
            },
        )
        .collect())
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use netlink_packet_core::{
        DoneMessage, NLM_F_MULTIPART, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};

    use super::*;

    fn emit(payload: NetlinkPayload<RouteNetlinkMessage>, into: &mut Vec<u8>) {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_MULTIPART;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let start = into.len();
        into.resize(start + message.buffer_len(), 0);
        message.serialize(&mut into[start..]);
    }

    fn address(attributes: Vec<AddressAttribute>) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut message = AddressMessage::default();
        message.attributes = attributes;
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(message))
    }

    #[test]
    fn dump_messages_give_each_interfaces_own_address() {
        let mut datagram = Vec::new();
        // A point-to-point link: IFA_ADDRESS is the peer, IFA_LOCAL ours.
        emit(
            address(vec![
                AddressAttribute::Address("10.1.0.2".parse().unwrap()),
                AddressAttribute::Local("10.1.0.1".parse().unwrap()),
                AddressAttribute::Label("ptp0".into()),
            ]),
            &mut datagram,
        );
        emit(
            address(vec![AddressAttribute::Address("fd00::5".parse().unwrap())]),
            &mut datagram,
        );
        let mut found = Vec::new();
        assert!(!netlink::parse(&datagram, &mut found).unwrap());
        assert_eq!(
            found,
            [
                "10.1.0.1".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );

        let mut end = Vec::new();
        emit(NetlinkPayload::Done(DoneMessage::default()), &mut end);
        assert!(netlink::parse(&end, &mut found).unwrap());
        assert_eq!(found.len(), 2);
    }

    #[test]
    fn netlink_sees_what_getifaddrs_sees() {
        let from_netlink: BTreeSet<IpAddr> = netlink::addresses().unwrap().into_iter().collect();
        let from_libc: BTreeSet<IpAddr> = addresses().unwrap().into_iter().collect();
        assert!(from_netlink.contains(&IpAddr::from([127, 0, 0, 1])));
        // getifaddrs also lists v6 link-local scopes the same way; both read
        // one namespace's addresses.
        assert_eq!(from_netlink, from_libc);
    }

    #[test]
    fn proc_entries_that_are_processes() {
        assert_eq!(parse_pid(OsStr::new("4711")), Some(4711));
        for name in ["self", "thread-self", "", "12a", "-1", "sys"] {
            assert_eq!(parse_pid(OsStr::new(name)), None, "{name}");
        }
    }

    #[test]
    fn each_namespace_is_admitted_once() {
        let mut seen = Seen::default();
        let (own, pod) = (NsId::new(4, 1), NsId::new(4, 2));
        // The agent's own namespace is seen before any scan.
        assert!(seen.admit(own));
        assert!(!seen.admit(own));
        assert!(seen.admit(pod));
        assert!(!seen.admit(pod));
        // Another device, the same inode: another namespace.
        assert!(seen.admit(NsId::new(5, 2)));
        // A namespace that vanished while it was opened may come back by
        // another process.
        seen.forget(pod);
        assert!(seen.admit(pod));
    }

    #[test]
    fn a_scan_skips_this_processes_namespace() {
        let finder = NetnsFinder::new(PathBuf::from("/nonexistent/weir-netns"));
        // Without the directory, the scan still runs (over /proc); this
        // process's own addresses are never claimed as a pod's.
        let found = finder.scan().unwrap();
        let own = NsId::of("/proc/self/ns/net").unwrap();
        assert!(
            found
                .values()
                .all(|netns| netns.id() != own && netns.source() == Source::Process)
        );
    }
}
