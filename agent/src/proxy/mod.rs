//! The node proxy: one outbound listener per enrolled pod, all served by the
//! agent's tokio runtime.

mod copy;
mod destination;
pub mod outbound;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use crate::datapath::maps::OrigDstMap;
use crate::metrics::Metrics;
use crate::model::Cluster;

pub use destination::Balancer;

/// What every connection handler shares.
pub struct ProxyContext {
    pub cluster: watch::Receiver<Arc<Cluster>>,
    pub orig_dst: Mutex<OrigDstMap>,
    pub metrics: Arc<Metrics>,
    pub balancer: Balancer,
    /// Accepted connections with no original destination: evicted, or a
    /// direct connection to the listener.
    pub orig_dst_misses: AtomicU64,
    pub connections: Arc<Connections>,
}

/// Counts live connections, so that a draining agent knows when it is done.
#[derive(Default)]
pub struct Connections {
    live: AtomicUsize,
    idle: Notify,
}

impl Connections {
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.live.fetch_add(1, Relaxed);
        ConnectionGuard(self.clone())
    }

    pub fn live(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// Resolves once no connection is live.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
