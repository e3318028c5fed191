//! Typed handles on the pinned maps the programs share with user space.

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash};
use std::os::fd::AsRawFd;
use weir_common::{
    ConnKey, Decision, DenyKey, Direction, InboundConfig, OrigDst, PodConfig, Settings,
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
}

impl Maps {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Maps, MapError> {
        let mut take = |name: &str| -> Result<Map, MapError> {
            ebpf.take_map(name).ok_or_else(|| MapError::InvalidName {
                name: name.to_owned(),
            })
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
        })
    }
}
