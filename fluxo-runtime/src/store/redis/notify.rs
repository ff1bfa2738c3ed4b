//! Work notifications: one background task per store subscribes to the
//! prefix's channel on a connection of its own and turns every message into
//! a bump of a counter.

use std::time::Duration;

use crate::abort_on_drop::AbortOnDrop;
use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind};
use tokio::sync::{mpsc, watch};

/// The first wait before connecting again after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between attempts to connect.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the subscription may stay silent before the connection is
/// checked with a `PING` (a peer that vanished without closing the socket
/// sends nothing, ever).
const CHECK_AFTER: Duration = Duration::from_secs(15);
/// How long connecting, subscribing or a check may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A running subscriber; the task stops when this is dropped.
pub(super) struct Notifier {
    rx: watch::Receiver<u64>,
    _task: AbortOnDrop,
}

impl Notifier {
    /// Starts the subscriber on the current Tokio runtime; `None` outside
    /// one. The connection speaks RESP3 (Redis 6 or newer), which delivers
    /// messages on an ordinary connection; `name` is its client name, as
    /// shown by `CLIENT LIST`.
    pub(super) fn start(client: &Client, channel: String, name: String) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = match Client::open(info.set_redis_settings(settings)) {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up work notifications; workers will poll");
                return None;
            }
        };
        let (tx, rx) = watch::channel(0);
        let task = runtime.spawn(subscribe(client, channel, name, tx));
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

/// Subscribes until aborted, connecting again with a back-off after
/// failures.
async fn subscribe(client: Client, channel: String, name: String, tx: watch::Sender<u64>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let error = subscribe_once(&client, &channel, &name, &tx, &mut backoff).await;
        tracing::warn!(
            %error,
            channel = %channel,
            retry_in = ?backoff,
            "work notification subscriber lost its connection; reconnecting"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects, subscribes and forwards messages until something fails.
async fn subscribe_once(
    client: &Client,
    channel: &str,
    name: &str,
    tx: &watch::Sender<u64>,
    backoff: &mut Duration,
) -> String {
    let (push_tx, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_push_sender(push_tx);
    let mut conn: MultiplexedConnection = match client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Ok(conn) => conn,
        Err(e) => return e.to_string(),
    };
    // The name only helps operators; a server that refuses it still delivers.
    if let Err(e) = ::redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async::<()>(&mut conn)
        .await
    {
        tracing::debug!(error = %e, name, "cannot name the notification connection");
    }
    if let Err(e) = conn.subscribe(channel).await {
        return e.to_string();
    }
    tracing::debug!(channel, "subscribed to work notifications");
    *backoff = FIRST_BACKOFF;
    // Messages sent while not subscribed are lost: tell the workers to look
    // for themselves.
    bump(tx);
    loop {
        match tokio::time::timeout(CHECK_AFTER, pushes.recv()).await {
            Ok(Some(push)) => match push.kind {
                PushKind::Message => {
                    // One bump for a burst of messages.
                    let mut closed = false;
                    while let Ok(push) = pushes.try_recv() {
                        closed |= push.kind == PushKind::Disconnection;
                    }
                    bump(tx);
                    if closed {
                        return "the connection was closed".to_owned();
                    }
                }
                PushKind::Disconnection => return "the connection was closed".to_owned(),
                _ => {}
            },
            Ok(None) => return "the connection stopped delivering messages".to_owned(),
            Err(_) => {
                if let Err(e) = ::redis::cmd("PING").query_async::<()>(&mut conn).await {
                    return e.to_string();
                }
            }
        }
    }
}
