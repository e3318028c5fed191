//! Byte copying between the client and upstream sockets.
//!
//! Each direction starts with plain reads and writes through a small buffer
//! that exists only while bytes are in hand, so an idle connection holds
//! none: for request/response traffic that is the fewest system calls. A read that fills the buffer marks a bulk
//! stream, which from then on moves with splice(2) through a pipe: the bytes
//! stay in the kernel and the buffer is freed, yet every byte is still
//! counted for the metrics.
//!
//! A flow the kernel carries (see `fast_path`) only ever uses reads and
//! writes: its sockets' received bytes live in their psocks, where splice(2)
//! does not look. User space then moves only what came before the kernel
//! took over, and reports its progress to the verdict after every write.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::fast_path::{self, Flow};
use crate::metrics::TcpCounters;

/// Most bytes moved by one splice: the pipe's default capacity.
const CHUNK: usize = 64 * 1024;
/// The buffer of the read/write phase; a read that fills it switches to splice.
const SMALL: usize = 8 * 1024;

/// Copies both ways until both sides have finished. End of stream on one
/// side becomes a shutdown(SHUT_WR) towards the other, so half-closed
/// connections keep working. Counters advance as bytes move. `flow` is the
/// kernel's part, when it carries the connection; `splice` is false when
/// either socket may be in a sockmap (the fast path is on), armed or not.
pub async fn bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TcpCounters,
    flow: Option<&Flow<'_>>,
    splice: bool,
) -> io::Result<()> {
    let request = one_way(
        client,
        upstream,
        &counters.received,
        flow.map(Flow::request),
        splice,
    );
    let response = one_way(
        upstream,
        client,
        &counters.sent,
        flow.map(Flow::response),
        splice,
    );
    tokio::try_join!(request, response).map(drop)
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &AtomicU64,
    kernel: Option<fast_path::Direction<'_>>,
    splice: bool,
) -> io::Result<()> {
    let mut forwarded = 0u64;
    let mut stall = fast_path::Stall::new();
    loop {
        from.readable().await?;
        let mut buf = vec![0; SMALL];
        let n = match from.try_read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => result?,
        };
        if n == 0 {
            if let Some(kernel) = &kernel {
                let Some(redirected) = kernel.redirected_at_end(forwarded) else {
                    stall.pause().await?;
                    continue;
                };
                kernel.drained(to, forwarded, redirected).await?;
            }
            return socket2::SockRef::from(to).shutdown(Shutdown::Write);
        }
        write_all(to, &buf[..n]).await?;
        bytes.fetch_add(n as u64, Relaxed);
        forwarded += n as u64;
        match &kernel {
            Some(kernel) => kernel.forwarded(forwarded)?,
            None if n == SMALL && splice => {
                drop(buf); // not held through the splice phase
                return splice_all(from, to, bytes).await;
            }
            None => {}
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => data = &data[result?..],
        }
    }
    Ok(())
}

/// The rest of a bulk stream, through a pipe.
async fn splice_all(from: &TcpStream, to: &TcpStream, bytes: &AtomicU64) -> io::Result<()> {
    let pipe = Pipe::new()?;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write(), CHUNK)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => break result?,
            }
        };
        if n == 0 {
            return socket2::SockRef::from(to).shutdown(Shutdown::Write);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read(), to.as_raw_fd(), left)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => left -= result?,
            }
        }
        bytes.fetch_add(n as u64, Relaxed);
    }
}

/// Moves up to `len` bytes from `from` to `to` without blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call, and
    // null offsets mean "the descriptor's own position", as sockets need.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pipe, read end and write end.
struct Pipe([OwnedFd; 2]);

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are new and ours.
        Ok(Pipe(fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    fn read(&self) -> RawFd {
        self.0[0].as_raw_fd()
    }

    fn write(&self) -> RawFd {
        self.0[1].as_raw_fd()
    }
}
