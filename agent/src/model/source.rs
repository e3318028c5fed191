//! What every model source hands the agent: a stream of cluster snapshots,
//! a count of rejected objects, and whether the first full view is in.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::cluster::Cluster;

/// A running model source. Dropping it stops the source.
pub struct ModelWatch {
    snapshots: watch::Receiver<Arc<Cluster>>,
    synced: watch::Receiver<bool>,
    rejected: Arc<AtomicU64>,
    /// Whatever keeps the source running: a file watcher, watch tasks.
    _source: Box<dyn Send + Sync>,
}

impl ModelWatch {
    pub(crate) fn new(
        snapshots: watch::Receiver<Arc<Cluster>>,
        synced: watch::Receiver<bool>,
        rejected: Arc<AtomicU64>,
        source: impl Send + Sync + 'static,
    ) -> Self {
        Self {
            snapshots,
            synced,
            rejected,
            _source: Box::new(source),
        }
    }

    /// A receiver that sees a new snapshot after each change that alters the
    /// cluster.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Cluster>> {
        self.snapshots.clone()
    }

    /// The latest snapshot.
    pub fn current(&self) -> Arc<Cluster> {
        self.snapshots.borrow().clone()
    }

    /// Waits until the source has seen everything once. Until then a
    /// snapshot may lack objects that exist, and acting on it would release
    /// pods that are still wanted.
    pub async fn synced(&self) {
        let mut synced = self.synced.clone();
        // Fails only if the source is gone, and then it never syncs.
        if synced.wait_for(|synced| *synced).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// How many times an object or file was rejected, over all loads.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for ModelWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelWatch")
            .field("synced", &*self.synced.borrow())
            .field("rejected", &self.rejected())
            .finish_non_exhaustive()
    }
}
