//! Circuit breaking with a DestinationRule's `connectionPool`, as Envoy
//! does it: requests at once are limited (HTTP/1.1 by `maxConnections`,
//! either protocol by `http2MaxRequests`), so many more may wait
//! (`http1MaxPendingRequests`), and the rest are answered 503 with
//! `response_flags="UO"` at once; `maxRetries` limits retries at once.
//! State is kept per source pod and destination (host, subset, port), as a
//! sidecar keeps it per client.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::routing::ConnectionPool;

/// (netns cookie, host, subset, port, settings)
type Key = (u64, String, String, u16, ConnectionPool);

static BREAKERS: LazyLock<Mutex<HashMap<Key, Arc<Breaker>>>> = LazyLock::new(Mutex::default);

#[derive(Debug)]
pub struct Breaker {
    pub pool: ConnectionPool,
    /// HTTP/1.1 requests at once.
    connections: Option<Arc<Semaphore>>,
    /// Requests at once.
    requests: Option<Arc<Semaphore>>,
    waiting: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
}

/// Forgets the breakers of pods not in `pods` (netns cookies).
pub fn forget_other_pods(pods: &HashSet<u64>) {
    BREAKERS
        .lock()
        .unwrap()
        .retain(|key, _| pods.contains(&key.0));
}

/// The breaker of this pod's requests to one destination; a change of the
/// settings starts a new one.
pub fn breaker(
    cookie: u64,
    host: &str,
    subset: &str,
    port: u16,
    pool: &ConnectionPool,
) -> Arc<Breaker> {
    let key = (
        cookie,
        host.to_owned(),
        subset.to_owned(),
        port,
        pool.clone(),
    );
    let mut breakers = BREAKERS.lock().unwrap();
    // Settings that changed leave old breakers behind; drop unused ones.
    breakers.retain(|_, breaker| Arc::strong_count(breaker) > 1);
    breakers
        .entry(key)
        .or_insert_with(|| {
            let semaphore =
                |limit: Option<u32>| limit.map(|limit| Arc::new(Semaphore::new(limit as usize)));
            Arc::new(Breaker {
                connections: semaphore(pool.max_connections),
                requests: semaphore(pool.max_requests),
                waiting: Arc::default(),
                retries: Arc::default(),
                pool: pool.clone(),
            })
        })
        .clone()
}

/// The breaker said no: too many requests wait already.
#[derive(Debug)]
pub struct Overflow;

/// What a request holds while it is in flight, until its response body
/// has been read.
#[derive(Debug, Default)]
pub struct Admission(Vec<OwnedSemaphorePermit>);

impl Breaker {
    /// Lets a request go, at once or after waiting its turn, or refuses it.
    pub async fn admit(&self, http2: bool) -> Result<Admission, Overflow> {
        let limits = [
            (!http2).then_some(self.connections.as_ref()).flatten(),
            self.requests.as_ref(),
        ];
        let mut permits = Vec::new();
        for semaphore in limits.into_iter().flatten() {
            if let Ok(permit) = semaphore.clone().try_acquire_owned() {
                permits.push(permit);
                continue;
            }
            let max = self
                .pool
                .max_pending_requests
                .map_or(usize::MAX, |max| max as usize);
            if self.waiting.fetch_add(1, SeqCst) >= max {
                self.waiting.fetch_sub(1, SeqCst);
                return Err(Overflow);
            }
            let _waiting = Decrement(self.waiting.clone());
            let permit = semaphore
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Overflow)?;
            permits.push(permit);
        }
        Ok(Admission(permits))
    }

    /// A retry may start; holding the guard counts it as running.
    pub fn retry(&self) -> Option<RetryGuard> {
        let max = self.pool.max_retries.map_or(usize::MAX, |max| max as usize);
        if self.retries.fetch_add(1, SeqCst) >= max {
            self.retries.fetch_sub(1, SeqCst);
            return None;
        }
        Some(RetryGuard(Decrement(self.retries.clone())))
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

pub struct RetryGuard(#[allow(dead_code)] Decrement);

/// A response body that keeps its request's admission until it ends.
pub struct Admitted<B> {
    pub body: B,
    pub admission: Admission,
}

impl<B: Body + Unpin> Body for Admitted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.admission.0.clear();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_beyond_the_active_and_pending_limits() {
        let pool = ConnectionPool {
            max_connections: Some(1),
            max_pending_requests: Some(1),
            max_retries: Some(1),
            ..ConnectionPool::default()
        };
        let breaker = breaker(9, "h", "", 80, &pool);
        let first = breaker.admit(false).await.unwrap();
        // One may wait; the next overflows.
        let waiter = {
            let breaker = breaker.clone();
            tokio::spawn(async move { breaker.admit(false).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        while breaker.waiting.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(breaker.admit(false).await.is_err());
        drop(first);
        assert!(waiter.await.unwrap().is_ok());
        // HTTP/2 requests are not limited by connections.
        let _held = breaker.admit(false).await.unwrap();
        assert!(breaker.admit(true).await.is_ok());

        let retry = breaker.retry();
        assert!(retry.is_some());
        assert!(breaker.retry().is_none(), "one retry at once");
        drop(retry);
        assert!(breaker.retry().is_some());
    }
}
