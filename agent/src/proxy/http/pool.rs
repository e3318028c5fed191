//! Upstream HTTP connections, kept open between requests: HTTP/1.1 ones,
//! one request at a time each, and one multiplexed HTTP/2 (h2c prior
//! knowledge) connection per endpoint. The pool is keyed by the source
//! pod's network namespace and the endpoint, so a connection, which carries
//! its pod's source address and identity, is never shared between pods.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use crate::inpod::SocketFactory;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub enum Sender {
    /// With the number of requests it carried.
    Http1(http1::SendRequest<Body>, u32),
    Http2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(sender, _) => sender.is_closed(),
            Sender::Http2(sender) => sender.is_closed(),
        }
    }

    /// Waits until an HTTP/1.1 connection can take a request.
    pub async fn ready(&mut self) -> bool {
        match self {
            Sender::Http1(sender, _) => sender.ready().await.is_ok(),
            Sender::Http2(sender) => sender.ready().await.is_ok(),
        }
    }

    /// Sends `request`; when it could not go out at all, the error gives it
    /// back, so that it can be sent on another connection.
    pub async fn send(
        &mut self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        match self {
            Sender::Http1(sender, uses) => {
                *uses += 1;
                sender.try_send_request(request).await
            }
            Sender::Http2(sender) => sender.try_send_request(request).await,
        }
    }
}

/// Idle HTTP/1.1 connections kept per (pod, endpoint) at most.
const MAX_IDLE: usize = 32;

/// (netns cookie of the source pod, endpoint, HTTP/2)
type Key = (u64, SocketAddr, bool);

static IDLE: LazyLock<Mutex<HashMap<Key, Vec<Sender>>>> = LazyLock::new(Mutex::default);
/// Open connections, idle or not.
static LIVE: LazyLock<Mutex<HashMap<Key, usize>>> = LazyLock::new(Mutex::default);

/// Drops the idle connections of pods not in `pods` (netns cookies). Open
/// counts go as their connections close.
pub fn forget_other_pods(pods: &HashSet<u64>) {
    IDLE.lock().unwrap().retain(|key, _| pods.contains(&key.0));
}

/// How many connections of this pod to `addr` are open.
pub fn live(cookie: u64, addr: SocketAddr, http2: bool) -> usize {
    LIVE.lock()
        .unwrap()
        .get(&(cookie, addr, http2))
        .copied()
        .unwrap_or(0)
}

/// A pooled HTTP/1.1 connection that is still busy with a response, to
/// wait for when no other connection may be opened.
pub fn take_busy(cookie: u64, addr: SocketAddr) -> Option<Sender> {
    let mut idle = IDLE.lock().unwrap();
    let senders = idle.get_mut(&(cookie, addr, false))?;
    senders.retain(|sender| !sender.is_closed());
    senders.pop()
}

struct Live(Key);

impl Live {
    fn open(key: Key) -> Live {
        *LIVE.lock().unwrap().entry(key).or_default() += 1;
        Live(key)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap();
        if let Some(count) = live.get_mut(&self.0) {
            *count -= 1;
            if *count == 0 {
                live.remove(&self.0);
            }
        }
    }
}

/// An open connection of this pod to `addr` that can take a request now,
/// if one is pooled.
pub fn take(cookie: u64, addr: SocketAddr, http2: bool) -> Option<Sender> {
    let key = (cookie, addr, http2);
    let mut idle = IDLE.lock().unwrap();
    let senders = idle.get_mut(&key)?;
    senders.retain(|sender| !sender.is_closed());
    let found = if http2 {
        // Shared by every request of the pod to this endpoint.
        senders.iter().find_map(|sender| match sender {
            Sender::Http2(sender) => Some(Sender::Http2(sender.clone())),
            Sender::Http1(..) => None,
        })
    } else {
        // One whose last response is no longer streaming to the app.
        let ready = senders
            .iter()
            .position(|sender| matches!(sender, Sender::Http1(s, _) if s.is_ready()));
        ready.map(|index| senders.swap_remove(index))
    };
    if senders.is_empty() {
        idle.remove(&key);
    }
    found
}

/// Keeps a connection for reuse; an HTTP/1.1 one becomes ready again once
/// its response body has been read. One that carried
/// `max_requests_per_connection` requests is let go, and closes when idle.
pub fn put(
    cookie: u64,
    addr: SocketAddr,
    sender: Sender,
    max_requests_per_connection: Option<u32>,
) {
    if sender.is_closed() {
        return;
    }
    if let (Sender::Http1(_, uses), Some(max)) = (&sender, max_requests_per_connection)
        && *uses >= max
    {
        return;
    }
    let http2 = matches!(sender, Sender::Http2(_));
    let mut idle = IDLE.lock().unwrap();
    let senders = idle.entry((cookie, addr, http2)).or_default();
    senders.retain(|sender| !sender.is_closed());
    if (http2 && senders.is_empty()) || (!http2 && senders.len() < MAX_IDLE) {
        senders.push(sender);
    }
}

/// A new connection from the pod's namespace (its own source address) to
/// `addr`, with its driver task running.
pub async fn connect(
    factory: &SocketFactory,
    addr: SocketAddr,
    http2: bool,
    timeout: Option<Duration>,
) -> io::Result<Sender> {
    let socket = factory.tcp_socket(addr, None).await?;
    let timeout = timeout.unwrap_or(super::super::CONNECT_TIMEOUT);
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let live = Live::open((factory.netns_cookie(), addr, http2));
    if http2 {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, %error, "upstream HTTP/2 connection ended");
            }
            drop(live);
        });
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = http1::handshake(io).await.map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, %error, "upstream HTTP connection ended");
            }
            drop(live);
        });
        Ok(Sender::Http1(sender, 0))
    }
}
