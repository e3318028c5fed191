//! Kernel-carried flows: once policy has allowed a connection and the
//! upstream is connected, the `carry_flow` stream verdict moves each
//! direction's bytes straight from one socket to the other, and the proxy
//! only decides and counts.
//!
//! Both sockets are in `FLOW_SOCKETS` from their establishment on (sock_ops
//! adds accepted sockets itself, and upstream sockets the agent registered
//! before connect()), so every byte they receive passes the verdict. The
//! verdict redirects an skb only while the agent has written every byte it
//! was handed (`FlowControl::forwarded == FlowStats::passed`): bytes that
//! came before the flow was armed, or while the agent was behind, go
//! through user space as before, and whatever the kernel redirects queues
//! behind them. Bytes never overtake each other.
//!
//! End of stream still reaches user space. Before it is passed on with
//! shutdown(SHUT_WR), the agent waits until the peer socket has queued every
//! byte of that direction: redirected skbs reach the peer's send queue
//! through its psock's backlog, asynchronously, and a FIN must not overtake
//! them. Byte metrics are the bytes user space forwarded plus the bytes the
//! kernel redirected, read from `FLOW_STATS` at every scrape for live
//! connections (`FastPath::report`) and when the connection ends.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::datapath::maps::FlowTable;
use crate::metrics::{Metrics, TcpCounters};

/// How long a direction may make no progress towards its end: passed bytes
/// still on their way to user space, or redirected bytes to the peer's send
/// queue. Past it the connection is reset rather than truncated.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket cookie, the key of every flow map.
pub fn cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length match.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The fast path's maps and the armed connections, for the metrics.
pub struct FastPath {
    pub table: FlowTable,
    /// By the client socket's cookie.
    live: Mutex<HashMap<u64, Live>>,
}

/// What the metrics already show of one armed connection's kernel bytes.
struct Live {
    upstream: u64,
    counters: Arc<TcpCounters>,
    /// Redirected bytes already added to `counters`: request, response.
    reported: (u64, u64),
}

impl FastPath {
    pub fn new(table: FlowTable) -> FastPath {
        FastPath {
            table,
            live: Mutex::default(),
        }
    }

    /// Brings the byte counters of live connections up to date with what
    /// the kernel carried so far; run before each scrape.
    pub fn report(&self, metrics: &Metrics) {
        let mut live = self.live.lock().unwrap();
        for (client, flow) in live.iter_mut() {
            let now = (
                self.redirected(*client).max(flow.reported.0),
                self.redirected(flow.upstream).max(flow.reported.1),
            );
            add(metrics, &flow.counters, flow.reported, now);
            flow.reported = now;
        }
    }

    fn redirected(&self, cookie: u64) -> u64 {
        self.table.stats(cookie).map_or(0, |s| s.redirected)
    }
}

/// Adds the growth from `before` to `now` (request, response).
fn add(metrics: &Metrics, counters: &TcpCounters, before: (u64, u64), now: (u64, u64)) {
    let (request, response) = (now.0 - before.0, now.1 - before.1);
    counters.received.fetch_add(request, Relaxed);
    counters.sent.fetch_add(response, Relaxed);
    metrics.kernel_bytes.fetch_add(request + response, Relaxed);
}

/// One armed connection: the client's socket and the upstream one.
pub struct Flow<'a> {
    fast: &'a FastPath,
    table: &'a FlowTable,
    client: u64,
    upstream: u64,
}

impl<'a> Flow<'a> {
    /// Arms both directions of a connection whose upstream socket was
    /// registered (`upstream` is its cookie), counted under `counters`.
    /// None when the client's cookie cannot be read or the kernel refuses;
    /// the connection then goes through user space only.
    pub fn arm(
        fast: &'a FastPath,
        client: &TcpStream,
        upstream: u64,
        counters: Arc<TcpCounters>,
    ) -> Option<Flow<'a>> {
        let flow = Flow {
            fast,
            table: &fast.table,
            client: cookie(client).ok()?,
            upstream,
        };
        fast.live.lock().unwrap().insert(
            flow.client,
            Live {
                upstream,
                counters,
                reported: (0, 0),
            },
        );
        let armed = flow.table.arm(flow.client, flow.upstream, 0).is_ok()
            && flow.table.arm(flow.upstream, flow.client, 0).is_ok();
        if !armed {
            fast.live.lock().unwrap().remove(&flow.client);
            flow.forget();
            return None;
        }
        Some(flow)
    }

    /// Client to upstream.
    pub fn request(&self) -> Direction<'a> {
        Direction {
            table: self.table,
            from: self.client,
            to: self.upstream,
        }
    }

    /// Upstream to client.
    pub fn response(&self) -> Direction<'a> {
        Direction {
            table: self.table,
            from: self.upstream,
            to: self.client,
        }
    }

    /// Adds the rest of what the kernel carried to the connection's byte
    /// counters and forgets both sockets.
    pub fn finish(self, metrics: &Metrics) {
        let mut live = self.fast.live.lock().unwrap();
        if let Some(flow) = live.remove(&self.client) {
            let now = (
                self.fast.redirected(self.client).max(flow.reported.0),
                self.fast.redirected(self.upstream).max(flow.reported.1),
            );
            add(metrics, &flow.counters, flow.reported, now);
        }
        drop(live);
        self.forget();
    }

    fn forget(&self) {
        self.table.forget(self.client);
        self.table.forget(self.upstream);
    }
}

/// One direction of an armed flow, for the copy loop.
pub struct Direction<'a> {
    table: &'a FlowTable,
    from: u64,
    to: u64,
}

impl Direction<'_> {
    /// User space has written `forwarded` bytes of this direction in all;
    /// once that catches up with what was passed, the kernel takes over.
    pub fn forwarded(&self, forwarded: u64) -> io::Result<()> {
        self.table.arm(self.from, self.to, forwarded)
    }

    /// At end of stream, after user space forwarded `forwarded` bytes:
    /// None while bytes the verdict passed have not reached user space yet
    /// (they can sit in the psock's backlog for a moment after the FIN is
    /// visible), else the bytes the kernel redirected.
    pub fn redirected_at_end(&self, forwarded: u64) -> Option<u64> {
        match self.table.stats(self.from) {
            Some(stats) if stats.passed > forwarded => None,
            Some(stats) => Some(stats.redirected),
            None => Some(0),
        }
    }

    /// Waits until `to` has queued every byte of this direction: the
    /// `forwarded` ones user space wrote and the `redirected` ones.
    pub async fn drained(&self, to: &TcpStream, forwarded: u64, redirected: u64) -> io::Result<()> {
        // What user space wrote is in the send queue already.
        if redirected == 0 {
            return Ok(());
        }
        let expected = forwarded + redirected;
        let mut last = 0;
        let mut progress = Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            let queued = queued_bytes(to)?;
            if queued >= expected {
                return Ok(());
            }
            if queued != last {
                last = queued;
                progress = Instant::now();
            } else if progress.elapsed() > STALL_TIMEOUT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "redirected bytes did not reach the peer socket",
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

/// Ends a wait for passed bytes that never arrive.
pub struct Stall(Option<Instant>);

impl Stall {
    pub fn new() -> Stall {
        Stall(None)
    }

    pub async fn pause(&mut self) -> io::Result<()> {
        let since = *self.0.get_or_insert_with(Instant::now);
        if since.elapsed() > STALL_TIMEOUT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "passed bytes did not reach the proxy",
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(())
    }
}

/// Offsets in `struct tcp_info` (linux/tcp.h), which the libc crate does not
/// carry in full.
const TCPI_NOTSENT_BYTES: usize = 144;
const TCPI_BYTES_SENT: usize = 200;
const TCPI_BYTES_RETRANS: usize = 208;
const TCP_INFO_LEN: usize = 216;

/// Payload bytes ever queued on a socket for sending: sent once
/// (`bytes_sent - bytes_retrans`) plus not sent yet. One getsockopt, taken
/// under the socket's lock, so the three agree with each other.
fn queued_bytes(socket: &TcpStream) -> io::Result<u64> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the buffer and its length match.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < TCP_INFO_LEN {
        return Err(io::Error::other("tcp_info too short for byte counts"));
    }
    let u64_at = |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().unwrap());
    let notsent = u32::from_ne_bytes(
        info[TCPI_NOTSENT_BYTES..TCPI_NOTSENT_BYTES + 4]
            .try_into()
            .unwrap(),
    );
    Ok(u64_at(TCPI_BYTES_SENT) - u64_at(TCPI_BYTES_RETRANS) + u64::from(notsent))
}
