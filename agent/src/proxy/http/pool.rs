//! Upstream HTTP connections, kept open between requests: HTTP/1.1 ones,
//! one request at a time each, and one multiplexed HTTP/2 (h2c prior
//! knowledge) connection per endpoint. The pool is keyed by the source
//! pod's network namespace and the endpoint, so a connection, which carries
//! its pod's source address and identity, is never shared between pods.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};

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
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(sender) => sender.is_closed(),
            Sender::Http2(sender) => sender.is_closed(),
        }
    }

    /// Sends `request`; when it could not go out at all, the error gives it
    /// back, so that it can be sent on another connection.
    pub async fn send(
        &mut self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        match self {
            Sender::Http1(sender) => sender.try_send_request(request).await,
            Sender::Http2(sender) => sender.try_send_request(request).await,
        }
    }
}

/// Idle HTTP/1.1 connections kept per (pod, endpoint) at most.
const MAX_IDLE: usize = 32;

/// (netns cookie of the source pod, endpoint, HTTP/2)
type Key = (u64, SocketAddr, bool);

static IDLE: LazyLock<Mutex<HashMap<Key, Vec<Sender>>>> = LazyLock::new(Mutex::default);

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
            Sender::Http1(_) => None,
        })
    } else {
        // One whose last response is no longer streaming to the app.
        let ready = senders
            .iter()
            .position(|sender| matches!(sender, Sender::Http1(s) if s.is_ready()));
        ready.map(|index| senders.swap_remove(index))
    };
    if senders.is_empty() {
        idle.remove(&key);
    }
    found
}

/// Keeps a connection for reuse; an HTTP/1.1 one becomes ready again once
/// its response body has been read.
pub fn put(cookie: u64, addr: SocketAddr, sender: Sender) {
    if sender.is_closed() {
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
pub async fn connect(factory: &SocketFactory, addr: SocketAddr, http2: bool) -> io::Result<Sender> {
    let socket = factory.tcp_socket(addr, None).await?;
    let stream = tokio::time::timeout(super::super::CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, %error, "upstream HTTP/2 connection ended");
            }
        });
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = http1::handshake(io).await.map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, %error, "upstream HTTP connection ended");
            }
        });
        Ok(Sender::Http1(sender))
    }
}
