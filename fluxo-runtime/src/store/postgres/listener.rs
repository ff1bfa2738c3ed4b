//! Work notifications: one background task per store listens on the
//! schema's channel and turns every notification into a bump of a counter.

use std::time::Duration;

use crate::abort_on_drop::AbortOnDrop;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;

/// The first wait before connecting again after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between attempts to connect.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A running listener; the task stops when this is dropped.
pub(super) struct Notifier {
    rx: watch::Receiver<u64>,
    _task: AbortOnDrop,
}

impl Notifier {
    /// Starts listening on `channel` with a connection of its own (the
    /// store's pool is not lent a connection for good). `None` outside a
    /// Tokio runtime.
    pub(super) fn start(options: PgConnectOptions, channel: String) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = watch::channel(0);
        let task = runtime.spawn(listen(options, channel, tx));
        Some(Notifier {
            rx,
            _task: AbortOnDrop(task.abort_handle()),
        })
    }

    /// A new receiver; it sees only bumps made after this call.
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n = n.wrapping_add(1));
}

/// Listens until aborted, reconnecting with a back-off after failures.
async fn listen(options: PgConnectOptions, channel: String, tx: watch::Sender<u64>) {
    // A pool of one connection, only there to (re)connect the listener.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let error = listen_once(&pool, &channel, &tx, &mut backoff).await;
        tracing::warn!(
            %error,
            channel = %channel,
            retry_in = ?backoff,
            "work notification listener lost its connection; reconnecting"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects, listens and forwards notifications until something fails.
async fn listen_once(
    pool: &PgPool,
    channel: &str,
    tx: &watch::Sender<u64>,
    backoff: &mut Duration,
) -> sqlx::Error {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(listener) => listener,
        Err(e) => return e,
    };
    if let Err(e) = listener.listen(channel).await {
        return e;
    }
    tracing::debug!(channel, "listening for work notifications");
    *backoff = FIRST_BACKOFF;
    // Notifications sent while not connected are lost: tell the workers to
    // look for themselves.
    bump(tx);
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => {
                // One bump for a burst of notifications.
                while listener.next_buffered().is_some() {}
                bump(tx);
            }
            Ok(None) => {
                // The connection dropped and the listener reconnected by
                // itself; whatever was sent in between is lost.
                tracing::warn!(channel, "work notification listener reconnected");
                bump(tx);
            }
            Err(e) => return e,
        }
    }
}
