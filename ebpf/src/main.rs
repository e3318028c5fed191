//! weir's eBPF programs: outbound redirect of enrolled pods' TCP connects
//! into the agent's per-pod listener on 127.0.0.1:15001.
//!
//! - `redirect_connect4/6` (cgroup/connect4, connect6) decide per connect()
//!   and rewrite the destination, remembering the original by socket cookie.
//! - `track_connect` (sock_ops) re-keys that record by (netns, local port) as
//!   soon as the port is bound, which is what the proxy sees on accept(), and
//!   forgets the socket when it closes.
//! - `restore_peer4/6` (cgroup/getpeername4, getpeername6) give the app its
//!   original destination back.
//! - `steer_inbound` (sk_lookup, attached to each enrolled pod's namespace)
//!   hands connections for the pod's address, on any port, to the agent's
//!   listener on 127.0.0.1:15006 in that namespace.
//! - `carry_flow` (sk_skb stream verdict on `FLOW_SOCKETS`) hands the bytes
//!   of an established, allowed flow straight to the peer socket, once user
//!   space has forwarded everything it was given; sock_ops puts the proxy's
//!   sockets into that map as they are established.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use weir_common::{
    ConnKey, DENY_CACHE_ENTRIES, Decision, DenyKey, Direction, FAIL_CLOSED, FLOW_ENTRIES,
    FlowControl, FlowStats, INBOUND_DELIVERY_IP, InboundConfig, MAX_ENROLLED_PODS,
    MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, ORIG_DST_ENTRIES, OUTBOUND_PORT, OrigDst, PodConfig,
    Settings,
};

/// Hash maps allocate per element instead of up front.
const BPF_F_NO_PREALLOC: u32 = 1;

const IPPROTO_TCP: u32 = 6;
/// cgroup_sock_addr return codes: 1 lets the call proceed, 0 fails it (EPERM).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// Enrolled pods by netns cookie.
#[map]
static ENROLLED: HashMap<u64, PodConfig> = HashMap::pinned(MAX_ENROLLED_PODS, 0);

/// The agent's outbound listener of each enrolled pod, by netns cookie. The
/// kernel drops a socket from a sockhash when it closes, so an entry here
/// means the agent is alive and listening in that pod: the fail-mode check.
#[map]
static LISTENERS: SockHash<u64> = SockHash::pinned(MAX_ENROLLED_PODS, 0);

/// Original destination of each redirected socket, by socket cookie; lives
/// until the socket closes, for getpeername().
#[map]
static SOCKETS: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

/// Original destination by (netns cookie, client port), read and deleted by
/// the proxy when it accepts the connection.
#[map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

/// Destinations an enrolled pod may not reach, by (netns cookie, address,
/// port), with the policy generation the agent decided in.
#[map]
static DENY_CACHE: LruHashMap<DenyKey, u64> = LruHashMap::pinned(DENY_CACHE_ENTRIES, 0);

/// Enrolled pods' inbound settings, by pod IPv4 address.
#[map]
static INBOUND_PODS: HashMap<u32, InboundConfig> = HashMap::pinned(MAX_ENROLLED_PODS, 0);

/// The agent's inbound listener of each enrolled pod, by pod IPv4 address.
#[map]
static INBOUND_LISTENERS: SockHash<u32> = SockHash::pinned(MAX_ENROLLED_PODS, 0);

/// The proxy's own sockets, by socket cookie: the accepted ones (put here by
/// sock_ops on PASSIVE_ESTABLISHED) and the upstream ones (on
/// ACTIVE_ESTABLISHED, when the agent registered them). `carry_flow` is
/// attached here and redirects between them.
#[map]
static FLOW_SOCKETS: SockHash<u64> = SockHash::pinned(FLOW_ENTRIES, 0);

/// What `carry_flow` did with each proxied socket's bytes; see `FlowStats`.
#[map]
static FLOW_STATS: HashMap<u64, FlowStats> = HashMap::pinned(FLOW_ENTRIES, BPF_F_NO_PREALLOC);

/// The agent's arming of each proxied socket; see `FlowControl`.
#[map]
static FLOW_CONTROL: HashMap<u64, FlowControl> = HashMap::pinned(FLOW_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static DECISIONS: PerCpuArray<u64> = PerCpuArray::pinned(2 * Decision::COUNT, 0);

#[inline(always)]
fn count(decision: Decision) {
    count_in(Direction::Outbound, decision);
}

#[inline(always)]
fn count_in(direction: Direction, decision: Decision) {
    if let Some(counter) = DECISIONS.get_ptr_mut(direction.slot(decision)) {
        // SAFETY: per-CPU slot, nothing else writes it concurrently.
        unsafe { *counter += 1 };
    }
}

/// 127.0.0.1 as it sits in `user_ip4` (network byte order).
const LOOPBACK4: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
/// The `::ffff:` prefix word of an IPv4-mapped IPv6 address.
const MAPPED_PREFIX: u32 = 0x0000_ffff_u32.to_be();

fn is_loopback4(ip4: u32) -> bool {
    u32::from_be(ip4) >> 24 == 127
}

fn is_excluded(pod: &PodConfig, ip4: u32, port: u16) -> bool {
    if is_loopback4(ip4) {
        return true;
    }
    for i in 0..MAX_EXCLUDED_PORTS {
        if i as u32 >= pod.n_excluded_ports {
            break;
        }
        if pod.excluded_ports[i] == port {
            return true;
        }
    }
    for i in 0..MAX_EXCLUDED_CIDRS {
        if i as u32 >= pod.n_excluded_cidrs {
            break;
        }
        let cidr = pod.excluded_cidrs[i];
        if ip4 & cidr.mask == cidr.addr {
            return true;
        }
    }
    false
}

/// Whether the agent's own listener for this netns is alive.
fn agent_listening(netns_cookie: u64) -> bool {
    let map = (&raw const LISTENERS).cast_mut().cast();
    let key = &raw const netns_cookie;
    // SAFETY: SockHash is repr(transparent) over its map definition, so its
    // address is the map pointer the helper expects. A hit returns a
    // referenced socket that must be released.
    unsafe {
        let sk = bpf_map_lookup_elem(map, key.cast());
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// Whether policy, as the agent last decided it, denies this destination.
/// The agent fills the cache only with decisions that hold for every
/// endpoint behind the destination.
fn denied(netns_cookie: u64, ip4: u32, port: u16) -> bool {
    let key = DenyKey {
        netns_cookie,
        ip4,
        port,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(generation) = (unsafe { DENY_CACHE.get(key).copied() }) else {
        return false;
    };
    SETTINGS
        .get(0)
        .is_some_and(|s| s.policy_generation == generation)
}

enum Verdict {
    Pass,
    Refuse,
    Redirect,
}

/// The shared decision for connect4 and connect6, on an IPv4 destination.
fn decide(ctx: &SockAddrContext, ip4: u32, port: u16) -> Verdict {
    // SAFETY: the helper accepts this program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod) = (unsafe { ENROLLED.get(netns) }) else {
        count(Decision::NotEnrolled);
        return Verdict::Pass;
    };
    // SAFETY: the helper takes no arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if let Some(settings) = SETTINGS.get(0)
        && settings.agent_cgroup_id == cgroup
    {
        count(Decision::OwnSocket);
        return Verdict::Pass;
    }
    if is_excluded(pod, ip4, port) {
        count(Decision::Excluded);
        return Verdict::Pass;
    }
    if denied(netns, ip4, port) {
        count(Decision::Denied);
        return Verdict::Refuse;
    }
    if !agent_listening(netns) {
        let closed = SETTINGS.get(0).is_some_and(|s| s.fail_mode == FAIL_CLOSED);
        if closed {
            count(Decision::FailClosed);
            return Verdict::Refuse;
        }
        count(Decision::FailOpen);
        return Verdict::Pass;
    }
    let orig = OrigDst {
        ip4,
        port: port.to_be(),
        _pad: 0,
    };
    // SAFETY: the helper accepts this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCKETS.insert(cookie, orig, 0).is_err() {
        // Without a record the proxy could not serve the connection.
        count(Decision::OrigDstMiss);
        return Verdict::Pass;
    }
    count(Decision::Redirected);
    Verdict::Redirect
}

fn is_tcp(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    unsafe { (*ctx.sock_addr).protocol == IPPROTO_TCP }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    if !is_tcp(&ctx) {
        return ALLOW;
    }
    // SAFETY: fields of the kernel's bpf_sock_addr, copied to the stack.
    let (ip4, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    match decide(&ctx, ip4, u16::from_be(port as u16)) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect => {
            // SAFETY: connect4 may rewrite the destination.
            unsafe {
                (*ctx.sock_addr).user_ip4 = LOOPBACK4;
                (*ctx.sock_addr).user_port = u32::from(OUTBOUND_PORT.to_be());
            }
            ALLOW
        }
    }
}

/// Dual-stack apps (Java, for one) connect to IPv4 through AF_INET6 sockets
/// with `::ffff:a.b.c.d`; those are redirected like IPv4. Native IPv6 is
/// left alone for now.
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    if !is_tcp(&ctx) {
        return ALLOW;
    }
    // SAFETY: fields of the kernel's bpf_sock_addr, copied to the stack.
    let (w0, w1, w2, w3, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
            sa.user_port,
        )
    };
    if w0 != 0 || w1 != 0 || w2 != MAPPED_PREFIX {
        return ALLOW;
    }
    match decide(&ctx, w3, u16::from_be(port as u16)) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect => {
            // SAFETY: connect6 may rewrite the destination; user_ip6 takes
            // 4-byte stores only.
            unsafe {
                (*ctx.sock_addr).user_ip6[3] = LOOPBACK4;
                (*ctx.sock_addr).user_port = u32::from(OUTBOUND_PORT.to_be());
            }
            ALLOW
        }
    }
}

fn redirected_socket(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the helper accepts this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the map can change.
    unsafe { SOCKETS.get(cookie).copied() }
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peer4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected_socket(&ctx) {
        // SAFETY: getpeername4 may rewrite the reported address.
        unsafe {
            (*ctx.sock_addr).user_ip4 = orig.ip4;
            (*ctx.sock_addr).user_port = u32::from(orig.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peer6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected_socket(&ctx) {
        // SAFETY: getpeername6 may rewrite the reported address. Only
        // IPv4-mapped connects are redirected, so the prefix is already
        // `::ffff:` and only the IPv4 word changes.
        unsafe {
            (*ctx.sock_addr).user_ip6[3] = orig.ip4;
            (*ctx.sock_addr).user_port = u32::from(orig.port);
        }
    }
    ALLOW
}

#[sock_ops]
pub fn track_connect(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_accepted(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_upstream(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: the helper accepts this program's context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = SOCKETS.remove(cookie);
            // An accepted socket the proxy never took over (it refused the
            // connection, or the client went away first): nobody else
            // deletes its record. One the proxy armed it deletes itself,
            // after reading the byte counts.
            // SAFETY: only presence is checked.
            if unsafe { FLOW_CONTROL.get(cookie) }.is_none() {
                let _ = FLOW_STATS.remove(cookie);
            }
        }
        _ => {}
    }
    1
}

fn fast_path() -> bool {
    SETTINGS.get(0).is_some_and(|s| s.fast_path != 0)
}

/// Adds an established socket to `FLOW_SOCKETS` under its cookie. Runs in
/// the softirq that established it, so before any payload reaches it: every
/// byte it receives passes `carry_flow`.
fn add_flow_socket(ctx: &SockOpsContext, cookie: u64) -> bool {
    // SAFETY: the kernel hands a valid bpf_sock_ops for the whole call.
    let ops = unsafe { &mut *ctx.ops };
    FLOW_SOCKETS
        .update(cookie, ops, u64::from(BPF_NOEXIST))
        .is_ok()
}

/// A connection accepted by one of the agent's listeners: the outbound one
/// on 127.0.0.1:15001 of an enrolled pod, or the inbound one that
/// `steer_inbound` handed it to (same checks as there).
fn on_accepted(ctx: &SockOpsContext) {
    if !fast_path() || ctx.family() != AF_INET {
        return;
    }
    let (local_ip4, remote_ip4, local_port) = (ctx.local_ip4(), ctx.remote_ip4(), ctx.local_port());
    let proxied = if local_ip4 == LOOPBACK4 && local_port == u32::from(OUTBOUND_PORT) {
        // SAFETY: the helper accepts this program's context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: only presence is checked.
        unsafe { ENROLLED.get(netns) }.is_some()
    } else {
        steered_inbound(local_ip4, remote_ip4, local_port)
    };
    if !proxied {
        return;
    }
    // SAFETY: the helper accepts this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if FLOW_STATS
        .insert(cookie, FlowStats::default(), u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    if !add_flow_socket(ctx, cookie) {
        let _ = FLOW_STATS.remove(cookie);
        return;
    }
    // Hear about the close, to forget the record if the proxy never takes
    // the connection over.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// Whether `steer_inbound` handed this connection to the agent (when the
/// agent listens).
fn steered_inbound(local_ip4: u32, remote_ip4: u32, local_port: u32) -> bool {
    if is_loopback4(local_ip4) || remote_ip4 == u32::from_ne_bytes(INBOUND_DELIVERY_IP) {
        return false;
    }
    // SAFETY: the value is copied out at once.
    let Some(pod) = (unsafe { INBOUND_PODS.get(local_ip4).copied() }) else {
        return false;
    };
    for i in 0..MAX_EXCLUDED_PORTS {
        if i as u32 >= pod.n_excluded_ports {
            break;
        }
        if u32::from(pod.excluded_ports[i]) == local_port {
            return false;
        }
    }
    // Whether the agent's listener is alive is not checked (sock_ops may
    // not release the socket a lookup returns): while no agent runs, the
    // app's socket lands in the map too, without a record of the agent's,
    // and every byte passes.
    true
}

/// An upstream socket the agent registered in `FLOW_STATS` before connect().
fn on_upstream(ctx: &SockOpsContext) {
    // SAFETY: the helper accepts this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: only presence is checked.
    if unsafe { FLOW_STATS.get(cookie) }.is_none() {
        return;
    }
    let _ = add_flow_socket(ctx, cookie);
}

/// Every skb that reaches a socket of `FLOW_SOCKETS`. Redirected to the
/// peer's send queue when the agent armed the flow and has written every
/// byte passed to it so far; passed to the socket's own receive queue (and
/// so to the agent) otherwise. Sockets without a record always pass.
#[stream_verdict]
pub fn carry_flow(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper accepts this program's skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    // A FIN without payload. Whichever psock backlog it went through (the
    // peer's, redirected; this socket's own, passed behind queued skbs)
    // would take its zero-byte send for a broken pipe and stop. TCP has
    // already seen the FIN: user space reads the end of stream all the
    // same, and there is no byte to lose.
    if len == 0 {
        return SK_DROP;
    }
    let Some(stats) = FLOW_STATS.get_ptr_mut(cookie) else {
        return SK_PASS;
    };
    // SAFETY: the value is copied out at once.
    if let Some(control) = unsafe { FLOW_CONTROL.get(cookie).copied() } {
        // SAFETY: a live map value; only this program writes it, and one
        // socket's skbs are judged one at a time.
        let passed = unsafe { core::ptr::read_volatile(&raw const (*stats).passed) };
        if control.armed != 0 && control.forwarded == passed {
            let mut peer = control.peer;
            if FLOW_SOCKETS.redirect_skb(&ctx, &mut peer, 0) == i64::from(SK_PASS) {
                // SAFETY: as above.
                unsafe { add(&raw mut (*stats).redirected, len) };
                return SK_PASS;
            }
        }
    }
    // SAFETY: as above.
    unsafe { add(&raw mut (*stats).passed, len) };
    SK_PASS
}

/// Adds to a counter that only this program writes: the verdicts of one
/// socket run under its lock, one at a time, and the agent only reads
/// (aligned 8-byte loads and stores do not tear).
///
/// # Safety
/// `counter` points into a live map value.
unsafe fn add(counter: *mut u64, n: u64) {
    // SAFETY: the caller's promise.
    unsafe { core::ptr::write_volatile(counter, core::ptr::read_volatile(counter) + n) };
}

/// The SYN is about to leave, so the local port is known: publish the
/// original destination under the key the proxy will look up.
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: the helpers accept this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the map can change.
    let Some(orig) = (unsafe { SOCKETS.get(cookie).copied() }) else {
        return;
    };
    let key = ConnKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    if ORIG_DST.insert(key, orig, 0).is_err() {
        count(Decision::OrigDstMiss);
    }
    // Hear about the close, to forget the socket's record.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const AF_INET: u32 = 2;

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: fields of the kernel's bpf_sk_lookup, copied to the stack.
    let (family, protocol, local_ip4, remote_ip4, local_port) = unsafe {
        let l = &*ctx.lookup;
        (
            l.family,
            l.protocol,
            l.local_ip4,
            l.remote_ip4,
            l.local_port,
        )
    };
    // Loopback inside the pod, and the proxy's own delivery from
    // 127.0.0.6, go to the app as they are.
    if family != AF_INET
        || protocol != IPPROTO_TCP
        || is_loopback4(local_ip4)
        || remote_ip4 == u32::from_ne_bytes(INBOUND_DELIVERY_IP)
    {
        return SK_PASS;
    }
    // SAFETY: the value is copied out at once.
    let Some(pod) = (unsafe { INBOUND_PODS.get(local_ip4).copied() }) else {
        count_in(Direction::Inbound, Decision::NotEnrolled);
        return SK_PASS;
    };
    for i in 0..MAX_EXCLUDED_PORTS {
        if i as u32 >= pod.n_excluded_ports {
            break;
        }
        if u32::from(pod.excluded_ports[i]) == local_port {
            count_in(Direction::Inbound, Decision::Excluded);
            return SK_PASS;
        }
    }
    if INBOUND_LISTENERS
        .redirect_sk_lookup(&ctx, local_ip4, 0)
        .is_ok()
    {
        count_in(Direction::Inbound, Decision::Redirected);
        return SK_PASS;
    }
    if SETTINGS.get(0).is_some_and(|s| s.fail_mode == FAIL_CLOSED) {
        count_in(Direction::Inbound, Decision::FailClosed);
        return SK_DROP;
    }
    count_in(Direction::Inbound, Decision::FailOpen);
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
