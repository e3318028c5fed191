//! Upstream HTTP/1.1 connections, kept open between requests. The pool is
//! keyed by the source pod's network namespace and the endpoint, so a
//! connection, which carries its pod's source address and identity, is
//! never shared between pods.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::inpod::SocketFactory;

pub type Sender = SendRequest<Full<Bytes>>;

/// Idle connections kept per (pod, endpoint) at most.
const MAX_IDLE: usize = 32;

/// (netns cookie of the source pod, endpoint)
type Key = (u64, SocketAddr);

static IDLE: LazyLock<Mutex<HashMap<Key, Vec<Sender>>>> = LazyLock::new(Mutex::default);

/// An idle, open connection of this pod to `addr`, if one is pooled.
pub fn take(cookie: u64, addr: SocketAddr) -> Option<Sender> {
    let mut idle = IDLE.lock().unwrap();
    let senders = idle.get_mut(&(cookie, addr))?;
    let mut busy = Vec::new();
    let mut found = None;
    while let Some(sender) = senders.pop() {
        if sender.is_closed() {
            continue;
        }
        if sender.is_ready() {
            found = Some(sender);
            break;
        }
        // Its last response is still streaming to the app.
        busy.push(sender);
    }
    senders.extend(busy);
    if senders.is_empty() {
        idle.remove(&(cookie, addr));
    }
    found
}

/// Returns a connection for reuse; it becomes ready once its response body
/// has been read.
pub fn put(cookie: u64, addr: SocketAddr, sender: Sender) {
    if sender.is_closed() {
        return;
    }
    let mut idle = IDLE.lock().unwrap();
    let senders = idle.entry((cookie, addr)).or_default();
    senders.retain(|sender| !sender.is_closed());
    if senders.len() < MAX_IDLE {
        senders.push(sender);
    }
}

/// A new connection from the pod's namespace (its own source address) to
/// `addr`, with its HTTP/1.1 driver task running.
pub async fn connect(factory: &SocketFactory, addr: SocketAddr) -> io::Result<Sender> {
    let socket = factory.tcp_socket(addr, None).await?;
    let stream = tokio::time::timeout(super::super::CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%addr, %error, "upstream HTTP connection ended");
        }
    });
    Ok(sender)
}
