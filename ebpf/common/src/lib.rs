//! Map keys and values shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding, so both sides agree on
//! the layout byte for byte. Changing any of them means bumping
//! [`LAYOUT_VERSION`], which moves the pinned maps to a new directory.
#![no_std]

/// Version of the pinned map layout. Maps live under `maps-v<N>/`.
pub const LAYOUT_VERSION: u32 = 2;

/// The outbound listener every enrolled pod gets, on 127.0.0.1.
pub const OUTBOUND_PORT: u16 = 15001;
/// The inbound listener every enrolled pod gets, on 127.0.0.1.
pub const INBOUND_PORT: u16 = 15006;
/// The source address the inbound proxy delivers from; sk_lookup lets it
/// through to the app, as Istio's sidecar does.
pub const INBOUND_DELIVERY_IP: [u8; 4] = [127, 0, 0, 6];

/// Most ports and CIDRs a pod can exclude from redirection.
pub const MAX_EXCLUDED_PORTS: usize = 16;
pub const MAX_EXCLUDED_CIDRS: usize = 8;

/// Entries in the original-destination maps. One per connection in flight
/// between connect() and the proxy's accept(), plus one per live redirected
/// socket for getpeername(); LRU eviction beyond that is counted.
pub const ORIG_DST_ENTRIES: u32 = 262_144;
pub const MAX_ENROLLED_PODS: u32 = 4096;
/// Cached denials: (pod, destination) pairs that connect() refuses at once.
pub const DENY_CACHE_ENTRIES: u32 = 65_536;
/// Proxied sockets the kernel can carry (two per connection).
pub const FLOW_ENTRIES: u32 = 131_072;

/// Which way a connection goes, relative to the enrolled pod.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound = 0,
    Inbound = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

    pub const fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// The slot of `decision` in this direction's half of `DECISIONS`.
    pub const fn slot(self, decision: Decision) -> u32 {
        self as u32 * Decision::COUNT + decision as u32
    }
}

/// What connect4/6 decided, as an index into the `DECISIONS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Redirected = 0,
    NotEnrolled = 1,
    Excluded = 2,
    OwnSocket = 3,
    Denied = 4,
    FailOpen = 5,
    FailClosed = 6,
    OrigDstMiss = 7,
}

impl Decision {
    pub const COUNT: u32 = 8;
    pub const ALL: [Decision; Self::COUNT as usize] = [
        Decision::Redirected,
        Decision::NotEnrolled,
        Decision::Excluded,
        Decision::OwnSocket,
        Decision::Denied,
        Decision::FailOpen,
        Decision::FailClosed,
        Decision::OrigDstMiss,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Decision::Redirected => "redirected",
            Decision::NotEnrolled => "not_enrolled",
            Decision::Excluded => "excluded",
            Decision::OwnSocket => "own_socket",
            Decision::Denied => "denied",
            Decision::FailOpen => "fail_open",
            Decision::FailClosed => "fail_closed",
            Decision::OrigDstMiss => "orig_dst_miss",
        }
    }
}

/// What pods get while no agent listens: pass straight through, or refuse.
pub const FAIL_OPEN: u32 = 0;
pub const FAIL_CLOSED: u32 = 1;

/// Node-wide settings, the single entry of the `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// cgroup v2 id of the agent: sockets it connects are its own and are
    /// never redirected. Pods cannot change which cgroup they run in.
    pub agent_cgroup_id: u64,
    /// Identifies the agent build that installed the programs; a restart of
    /// the same build reuses them.
    pub build_id: u64,
    /// Bumped by the agent on every policy or pod change; a cached denial
    /// from an older generation no longer counts.
    pub policy_generation: u64,
    pub fail_mode: u32,
    /// Non-zero: sock_ops puts the proxy's sockets into `FLOW_SOCKETS`, so
    /// that established flows can be carried by the kernel (see
    /// [`FlowControl`]). Was padding in layout 2, hence compatible.
    pub fast_path: u32,
}

/// A CIDR in network byte order; `mask` has the prefix bits set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr4 {
    pub addr: u32,
    pub mask: u32,
}

/// One enrolled pod, keyed by the netns cookie of its network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// Destination ports (host order) that are never redirected.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
    pub excluded_cidrs: [Cidr4; MAX_EXCLUDED_CIDRS],
    pub n_excluded_ports: u32,
    pub n_excluded_cidrs: u32,
}

/// An enrolled pod's inbound settings, keyed by its IPv4 address (network
/// order): the address is what sk_lookup sees.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundConfig {
    /// Local ports (host order) the app receives directly.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
    pub n_excluded_ports: u32,
    pub _pad: u32,
}

/// Key of `DENY_CACHE`: a pod (by netns cookie) and a destination it may
/// not reach. The value is the policy generation the denial was made in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenyKey {
    pub netns_cookie: u64,
    /// Network byte order, as connect4 sees it.
    pub ip4: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The destination the app passed to connect(), IPv4 in network order.
/// IPv4-mapped IPv6 destinations are stored as their IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub ip4: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `ORIG_DST`: the redirected socket's netns and local port, which is
/// what the proxy sees as the peer of the accepted connection. The netns
/// cookie keeps identical loopback tuples in different pods apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// What the stream verdict did with one proxied socket's incoming bytes,
/// keyed by its socket cookie. Written only by the kernel: sock_ops creates
/// it (accepted sockets) or the agent registers it before connect()
/// (upstream sockets), and the agent deletes it when the connection ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Bytes left to user space (the socket's own receive queue).
    pub passed: u64,
    /// Bytes sent straight to the peer socket's send queue.
    pub redirected: u64,
}

/// The agent's side of one proxied socket, keyed by its socket cookie.
/// Written only by the agent. The verdict redirects an incoming skb to
/// `peer` only while `armed` and `forwarded == FlowStats::passed`: every
/// byte user space was handed has been written to the peer, so the
/// redirected bytes queue behind them, never ahead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    /// Socket cookie of the other socket of the connection.
    pub peer: u64,
    /// Bytes user space read from this socket and wrote to the peer.
    pub forwarded: u64,
    pub armed: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C) plain data with explicit padding.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::InboundConfig {}
    unsafe impl aya::Pod for super::DenyKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::FlowControl {}
}
