//! State shared by a [`Fluxo`](crate::Fluxo) handle, its workers and its
//! running instances.

use std::sync::{Arc, RwLock};

use tokio::sync::{watch, Notify};

use crate::store::Store;
use crate::workflow::Registry;

pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub registry: RwLock<Registry>,
    /// Bumped when this process creates or wakes work, so local workers
    /// claim at once instead of waiting for their next poll.
    pub work: watch::Sender<u64>,
    /// Notified when an instance finishes in this process.
    pub finished: Notify,
}

impl Shared {
    pub(crate) fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Shared {
            store,
            registry: RwLock::new(Registry::default()),
            work: watch::Sender::new(0),
            finished: Notify::new(),
        })
    }

    pub(crate) fn notify_work(&self) {
        self.work.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }
}
