//! Typed handles on the pinned maps the programs share with user space.

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash};
use std::os::fd::AsRawFd;
use weir_common::{ConnKey, Decision, OrigDst, PodConfig, Settings};

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

/// The agent's outbound listeners by netns cookie; the kernel removes a
/// listener when it closes.
pub struct ListenerMap(SockHash<MapData, u64>);

impl ListenerMap {
    pub fn insert(&mut self, netns_cookie: u64, listener: &impl AsRawFd) -> Result<(), MapError> {
        self.0.insert(netns_cookie, listener.as_raw_fd(), 0)
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

/// Per-CPU decision counters of connect4/6.
pub struct DecisionCounters(PerCpuArray<MapData, u64>);

impl DecisionCounters {
    /// Totals over all CPUs, in `Decision::ALL` order.
    pub fn totals(&self) -> Result<[u64; Decision::COUNT as usize], MapError> {
        let mut totals = [0; Decision::COUNT as usize];
        for (slot, decision) in totals.iter_mut().zip(Decision::ALL) {
            *slot = self.0.get(&(decision as u32), 0)?.iter().sum();
        }
        Ok(totals)
    }
}

/// Every map of the object, taken out of `aya::Ebpf` by name.
pub struct Maps {
    pub settings: SettingsMap,
    pub enrolled: EnrolledMap,
    pub listeners: ListenerMap,
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
            orig_dst: OrigDstMap(take("ORIG_DST")?.try_into()?),
            sockets: SocketMap(take("SOCKETS")?.try_into()?),
            decisions: DecisionCounters(take("DECISIONS")?.try_into()?),
        })
    }
}
