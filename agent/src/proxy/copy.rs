//! Byte copying between the client and upstream sockets.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::TcpCounters;

const BUFFER: usize = 16 * 1024;

/// Copies both ways until both sides have finished. End of stream on one
/// side becomes a shutdown(SHUT_WR) towards the other, so half-closed
/// connections keep working. Counters advance as bytes move.
pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    counters: &TcpCounters,
) -> io::Result<()> {
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let request = one_way(&mut client_read, &mut upstream_write, &counters.received);
    let response = one_way(&mut upstream_read, &mut client_write, &counters.sent);
    tokio::try_join!(request, response).map(drop)
}

async fn one_way<R, W>(from: &mut R, to: &mut W, bytes: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Allocated when the direction first runs, not per accepted connection.
    let mut buf = vec![0; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        bytes.fetch_add(n as u64, Relaxed);
    }
}
