//! Typed handles on the pinned maps the programs share with user space.

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use weir_common::{
    ConnKey, Decision, DenyKey, Direction, FlowControl, FlowStats, InboundConfig, OrigDst,
    PodConfig, Settings,
};

/// An IPv4 address as the programs see it: network order in a u32.
pub fn ipv4_key(ip: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Node-wide settings read by connect4/6.
pub struct SettingsMap(Array<MapData, Settings>);

impl SettingsMap {
    pub fn get(&self) -> Result<Settings, MapError> {
        self.0.get(&0, 0)
    }

    pub fn set(&mut self, settings: Settings) -> Result<(), MapError> {
        self.0.set(0, settings, 0)
    }
}

/// Enrolled pods by netns cookie.
pub struct EnrolledMap(HashMap<MapData, u64, PodConfig>);

impl EnrolledMap {
    pub fn insert(&mut self, netns_cookie: u64, pod: &PodConfig) -> Result<(), MapError> {
        self.0.insert(netns_cookie, pod, 0)
    }

    pub fn remove(&mut self, netns_cookie: u64) -> Result<(), MapError> {
        match self.0.remove(&netns_cookie) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    pub fn cookies(&self) -> Vec<u64> {
        self.0.keys().filter_map(Result::ok).collect()
    }

    /// Live entries, for the occupancy metric.
    pub fn entries(&self) -> usize {
        self.0.keys().filter(Result::is_ok).count()
    }
}

/// The agent's listeners, by netns cookie (outbound) or pod address
/// (inbound); the kernel removes a listener when it closes.
pub struct ListenerMap<K>(SockHash<MapData, K>);

impl<K: aya::Pod> ListenerMap<K> {
    pub fn insert(&mut self, key: K, listener: &impl AsRawFd) -> Result<(), MapError> {
        self.0.insert(key, listener.as_raw_fd(), 0)
    }

    /// Live entries, for the occupancy metric.
    pub fn entries(&self) -> usize {
        self.0.keys().filter(Result::is_ok).count()
    }
}

/// Enrolled pods' inbound settings by IPv4 address (network order).
pub struct InboundPodMap(HashMap<MapData, u32, InboundConfig>);

impl InboundPodMap {
    pub fn insert(&mut self, ip4: u32, config: &InboundConfig) -> Result<(), MapError> {
        self.0.insert(ip4, config, 0)
    }

    pub fn remove(&mut self, ip4: u32) {
        let _ = self.0.remove(&ip4);
    }

    pub fn addresses(&self) -> Vec<u32> {
        self.0.keys().filter_map(Result::ok).collect()
    }

    /// Live entries, for the occupancy metric.
    pub fn entries(&self) -> usize {
        self.0.keys().filter(Result::is_ok).count()
    }
}

/// Cached denials that connect4 enforces without asking the proxy.
pub struct DenyCache(HashMap<MapData, DenyKey, u64>);

impl DenyCache {
    pub fn insert(&mut self, key: DenyKey, generation: u64) -> Result<(), MapError> {
        self.0.insert(key, generation, 0)
    }

    /// Live entries, for the occupancy metric.
    pub fn entries(&self) -> usize {
        self.0.keys().filter(Result::is_ok).count()
    }
}

/// Original destinations by (netns cookie, client port).
pub struct OrigDstMap(HashMap<MapData, ConnKey, OrigDst>);

impl OrigDstMap {
    /// Reads and deletes the record of one redirected connection.
    pub fn take(&mut self, key: ConnKey) -> Option<OrigDst> {
        let orig = self.0.get(&key, 0).ok()?;
        // Deleting frees the slot early; LRU would evict it eventually.
        let _ = self.0.remove(&key);
        Some(orig)
    }

    /// Live entries, for the occupancy metric.
    pub fn entries(&self) -> usize {
        self.0.keys().filter(Result::is_ok).count()
    }
}

/// Original destinations of live redirected sockets by socket cookie.
pub struct SocketMap(HashMap<MapData, u64, OrigDst>);

impl SocketMap {
    /// Live entries, for the occupancy metric.
    pub fn entries(&self) -> usize {
        self.0.keys().filter(Result::is_ok).count()
    }
}

/// Per-CPU decision counters of the programs, per direction.
pub struct DecisionCounters(PerCpuArray<MapData, u64>);

impl DecisionCounters {
    /// The total over all CPUs of one decision.
    pub fn total(&self, direction: Direction, decision: Decision) -> Result<u64, MapError> {
        Ok(self.0.get(&direction.slot(decision), 0)?.iter().sum())
    }
}

/// The maps of kernel-carried flows (`FLOW_STATS`, `FLOW_CONTROL`), used
/// by every connection's task without a lock: plain bpf(2) calls on the
/// map descriptors, keyed by socket cookie.
pub struct FlowTable {
    stats: MapData,
    control: MapData,
}

/// `union bpf_attr` for the map element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

fn map_call(cmd: libc::c_long, map: &MapData, key: &u64, value: u64) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value,
        flags: 0,
    };
    // SAFETY: `attr` and the buffers it points to outlive the call, and
    // the value buffers have the map's value size (checked by the callers'
    // types).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl FlowTable {
    /// Registers an upstream socket before connect(): sock_ops then adds
    /// it to `FLOW_SOCKETS` as it is established.
    pub fn register(&self, cookie: u64) -> io::Result<()> {
        let stats = FlowStats::default();
        map_call(
            BPF_MAP_UPDATE_ELEM,
            &self.stats,
            &cookie,
            std::ptr::from_ref(&stats) as u64,
        )
    }

    /// What the verdict did with a socket's bytes so far.
    pub fn stats(&self, cookie: u64) -> Option<FlowStats> {
        let mut stats = FlowStats::default();
        map_call(
            BPF_MAP_LOOKUP_ELEM,
            &self.stats,
            &cookie,
            std::ptr::from_mut(&mut stats) as u64,
        )
        .ok()?;
        Some(stats)
    }

    /// Arms a socket towards `peer`, `forwarded` bytes having been written
    /// to it by user space; called again as that count grows.
    pub fn arm(&self, cookie: u64, peer: u64, forwarded: u64) -> io::Result<()> {
        let control = FlowControl {
            peer,
            forwarded,
            armed: 1,
            _pad: 0,
        };
        map_call(
            BPF_MAP_UPDATE_ELEM,
            &self.control,
            &cookie,
            std::ptr::from_ref(&control) as u64,
        )
    }

    /// Forgets a socket once its connection is over.
    pub fn forget(&self, cookie: u64) {
        let _ = map_call(BPF_MAP_DELETE_ELEM, &self.control, &cookie, 0);
        let _ = map_call(BPF_MAP_DELETE_ELEM, &self.stats, &cookie, 0);
    }

    /// Forgets the records of sockets that are no longer in `FLOW_SOCKETS`
    /// (the kernel drops closed sockets from it): those of an agent that
    /// died with its connections armed. Returns how many went.
    pub fn sweep(&self, sockets: &SockHash<MapData, u64>) -> usize {
        let live: std::collections::HashSet<u64> = sockets.keys().filter_map(Result::ok).collect();
        let mut gone: Vec<u64> = cookies(&self.control)
            .into_iter()
            .chain(cookies(&self.stats))
            .filter(|cookie| !live.contains(cookie))
            .collect();
        gone.sort_unstable();
        gone.dedup();
        for cookie in &gone {
            self.forget(*cookie);
        }
        gone.len()
    }
}

/// Every key of a hash map keyed by socket cookie.
fn cookies(map: &MapData) -> Vec<u64> {
    let mut keys = Vec::new();
    let mut key = None;
    loop {
        let mut next = 0u64;
        let attr = ElemAttr {
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: key
                .as_ref()
                .map_or(0, |k: &u64| std::ptr::from_ref(k) as u64),
            value: std::ptr::from_mut(&mut next) as u64,
            flags: 0,
        };
        // SAFETY: as in `map_call`; `next` has the key size.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw const attr,
                size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        if ret < 0 {
            return keys;
        }
        keys.push(next);
        key = Some(next);
    }
}

/// Every map of the object, taken out of `aya::Ebpf` by name.
pub struct Maps {
    pub settings: SettingsMap,
    pub enrolled: EnrolledMap,
    pub listeners: ListenerMap<u64>,
    pub inbound_pods: InboundPodMap,
    pub inbound_listeners: ListenerMap<u32>,
    pub deny_cache: DenyCache,
    pub orig_dst: OrigDstMap,
    pub sockets: SocketMap,
    pub decisions: DecisionCounters,
    /// The proxy's sockets, where `carry_flow` is attached.
    pub flow_sockets: SockHash<MapData, u64>,
    pub flows: FlowTable,
}

impl Maps {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Maps, MapError> {
        let mut take = |name: &str| -> Result<Map, MapError> {
            ebpf.take_map(name).ok_or_else(|| MapError::InvalidName {
                name: name.to_owned(),
            })
        };
        // The programs were loaded with these descriptors: keep them open.
        let mut raw_map = |name: &str| -> Result<MapData, MapError> {
            match take(name)? {
                Map::HashMap(data) => Ok(data),
                _ => Err(MapError::InvalidName {
                    name: name.to_owned(),
                }),
            }
        };
        let flows = FlowTable {
            stats: raw_map("FLOW_STATS")?,
            control: raw_map("FLOW_CONTROL")?,
        };
        Ok(Maps {
            settings: SettingsMap(take("SETTINGS")?.try_into()?),
            enrolled: EnrolledMap(take("ENROLLED")?.try_into()?),
            listeners: ListenerMap(take("LISTENERS")?.try_into()?),
            inbound_pods: InboundPodMap(take("INBOUND_PODS")?.try_into()?),
            inbound_listeners: ListenerMap(take("INBOUND_LISTENERS")?.try_into()?),
            deny_cache: DenyCache(take("DENY_CACHE")?.try_into()?),
            orig_dst: OrigDstMap(take("ORIG_DST")?.try_into()?),
            sockets: SocketMap(take("SOCKETS")?.try_into()?),
            decisions: DecisionCounters(take("DECISIONS")?.try_into()?),
            flow_sockets: take("FLOW_SOCKETS")?.try_into()?,
            flows,
        })
    }
}
