//! A background task that ends with its owner.

use tokio::task::AbortHandle;

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
