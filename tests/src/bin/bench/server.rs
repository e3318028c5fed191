//! The servers: one thread per server pod, inside the pod's network
//! namespace, running a single-threaded tokio runtime with an echo listener
//! (request/response, a connection per request, idle connections) and a
//! sink listener (bulk transfer).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use weir_sandbox::Pod;

/// Echoes whatever it reads.
pub const ECHO_PORT: u16 = 9080;
/// Reads until end of stream, then answers with the byte count (u64, big
/// endian).
pub const SINK_PORT: u16 = 9081;
/// An HTTP/1.1 server answering every request with 1 KiB.
pub const HTTP_PORT: u16 = 9082;
/// Whatever happens, a server stops by itself after this.
const LIFETIME: Duration = Duration::from_secs(30 * 60);
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests are 1 KiB; idle connections hold one buffer each.
const ECHO_BUFFER: usize = 4 * 1024;
const SINK_BUFFER: usize = 256 * 1024;
/// Where weir's inbound proxy delivers from (weir_common::INBOUND_DELIVERY_IP).
const HTTP_BODY: usize = 1024;
const INBOUND_DELIVERY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// What a server saw, to check that a scenario really took the path it
/// claims.
#[derive(Debug, Default)]
pub struct Accepted {
    pub total: AtomicU64,
    /// Connections that came from weir's inbound proxy (peer 127.0.0.6).
    pub via_weir: AtomicU64,
}

impl Accepted {
    pub fn read(&self) -> (u64, u64) {
        (self.total.load(Relaxed), self.via_weir.load(Relaxed))
    }
}

/// A running server. Dropping it stops it and joins its thread.
pub struct Server {
    pod: String,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    accepted: Arc<Accepted>,
}

impl Server {
    /// Binds both listeners inside `pod` and starts serving.
    pub fn start(pod: &Pod) -> Result<Server> {
        let (stop, stopped) = watch::channel(false);
        let accepted = Arc::new(Accepted::default());
        let (ready_tx, ready) = std::sync::mpsc::channel::<io::Result<()>>();
        let netns = pod.netns().file().try_clone()?;
        let counters = Arc::clone(&accepted);
        let thread = std::thread::Builder::new()
            .name(format!("server-{}", pod.name()))
            .spawn(move || {
                let setup = || -> io::Result<([StdListener; 3], tokio::runtime::Runtime)> {
                    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let bind = |port| -> io::Result<StdListener> {
                        let listener =
                            StdListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
                        listener.set_nonblocking(true)?;
                        Ok(listener)
                    };
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let listeners = [bind(ECHO_PORT)?, bind(SINK_PORT)?, bind(HTTP_PORT)?];
                    Ok((listeners, runtime))
                };
                let (listeners, runtime) = match setup() {
                    Ok(parts) => {
                        let _ = ready_tx.send(Ok(()));
                        parts
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                runtime.block_on(serve(listeners, counters, stopped));
                // Dropping the runtime drops every connection task.
            })?;
        ready
            .recv()
            .map_err(|_| anyhow!("server thread for {} died", pod.name()))?
            .with_context(|| format!("cannot start the server in pod {}", pod.name()))?;
        Ok(Server {
            pod: pod.name().to_owned(),
            stop,
            thread: Some(thread),
            accepted,
        })
    }

    pub fn accepted(&self) -> &Accepted {
        &self.accepted
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("weir-bench: the server of pod {} panicked", self.pod);
        }
    }
}

async fn serve(
    listeners: [StdListener; 3],
    accepted: Arc<Accepted>,
    mut stopped: watch::Receiver<bool>,
) {
    let [echo, sink, http] = match listeners.map(TcpListener::from_std) {
        [Ok(echo), Ok(sink), Ok(http)] => [echo, sink, http],
        [Err(error), ..] | [_, Err(error), _] | [.., Err(error)] => {
            eprintln!("weir-bench: server listener: {error}");
            return;
        }
    };
    let lifetime = tokio::time::sleep(LIFETIME);
    tokio::pin!(lifetime);
    loop {
        tokio::select! {
            result = echo.accept() => match result {
                Ok((stream, peer)) => {
                    count(&accepted, peer);
                    tokio::spawn(echo_connection(stream));
                }
                Err(error) => accept_failed(error).await,
            },
            result = sink.accept() => match result {
                Ok((stream, peer)) => {
                    count(&accepted, peer);
                    tokio::spawn(sink_connection(stream));
                }
                Err(error) => accept_failed(error).await,
            },
            result = http.accept() => match result {
                Ok((stream, peer)) => {
                    count(&accepted, peer);
                    tokio::spawn(http_connection(stream));
                }
                Err(error) => accept_failed(error).await,
            },
            _ = stopped.changed() => return,
            () = &mut lifetime => return,
        }
    }
}

fn count(accepted: &Accepted, peer: SocketAddr) {
    accepted.total.fetch_add(1, Relaxed);
    if peer.ip() == INBOUND_DELIVERY_IP {
        accepted.via_weir.fetch_add(1, Relaxed);
    }
}

/// Out of descriptors, most likely: say so, and do not spin.
async fn accept_failed(error: io::Error) {
    eprintln!("weir-bench: server accept failed: {error}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn echo_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0; ECHO_BUFFER];
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Answers each request on a kept-alive connection with 1 KiB. The bench's
/// client sends GETs without bodies, one at a time, so a request ends at
/// its blank line.
async fn http_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {HTTP_BODY}\r\n\r\n"
    )
    .into_bytes();
    response.resize(response.len() + HTTP_BODY, b'x');
    let mut buf = vec![0; ECHO_BUFFER];
    let mut filled = 0;
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf[filled..])).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        filled += n;
        while let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            if stream.write_all(&response).await.is_err() {
                return;
            }
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buf.len() {
            return;
        }
    }
}

async fn sink_connection(mut stream: TcpStream) {
    let mut buf = vec![0; SINK_BUFFER];
    let mut total: u64 = 0;
    loop {
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => total += n as u64,
            _ => return,
        }
    }
    let _ = stream.write_all(&total.to_be_bytes()).await;
}
