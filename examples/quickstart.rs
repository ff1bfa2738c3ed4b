//! Quick start: an order workflow on a SQLite file.
//!
//! `cargo run --example quickstart`
//!
//! The payment step fails twice and is retried, the workflow waits for an
//! approval signal, sleeps durably, then ships and e-mails in parallel.
//! Kill it with Ctrl-C at any point and run it again: the order id is fixed,
//! so the second run picks the instance up where the journal left it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fluxo::prelude::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    payment: String,
    approved_by: String,
    tracking: String,
    emailed: bool,
}

/// A typed message the workflow can wait for.
#[fluxo::signal]
#[derive(Debug, Serialize, Deserialize)]
struct Approved {
    by: String,
}

static CHARGE_ATTEMPTS: AtomicU32 = AtomicU32::new(0);

/// Charges the card. The payment provider is flaky: the first two attempts
/// fail, and the retry policy takes care of it.
#[fluxo::step(
    retry(max_attempts = 5, initial = "200ms", max = "2s"),
    timeout = "10s"
)]
async fn charge(order: &Order) -> Result<String, StepError> {
    let attempt = CHARGE_ATTEMPTS.fetch_add(1, Ordering::SeqCst) + 1;
    let key = StepContext::current()
        .map(|s| s.idempotency_key())
        .unwrap_or_default();
    if attempt <= 2 {
        println!(
            "  charge {} cents (attempt {attempt}, key {key}): provider timed out",
            order.cents
        );
        return Err(StepError::retryable("payment provider timed out"));
    }
    println!(
        "  charge {} cents (attempt {attempt}, key {key}): ok",
        order.cents
    );
    Ok(format!("pay_{}", order.id))
}

#[fluxo::step]
async fn ship(order: &Order) -> Result<String, StepError> {
    println!("  shipping {}", order.id);
    Ok(format!("TRACK-{}", order.id.to_uppercase()))
}

#[fluxo::step]
async fn email(order: &Order) -> Result<bool, StepError> {
    println!("  e-mailing the customer about {}", order.id);
    Ok(true)
}

#[fluxo::workflow(version = 1, signals(Approved))]
async fn order_flow(ctx: WorkflowContext, order: Order) -> Result<Receipt, WorkflowError> {
    let payment = charge(&order).await?;
    println!("  waiting for approval...");
    let approval = ctx.wait::<Approved>().timeout(days(2)).await?;
    println!(
        "  approved by {}; cooling off for 2 s (a durable timer)",
        approval.by
    );
    ctx.sleep(secs(2)).await;
    let (tracking, emailed) = ctx.join(ship(&order), email(&order)).await;
    Ok(Receipt {
        payment,
        approved_by: approval.by,
        tracking: tracking?,
        emailed: emailed?,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let fluxo = Fluxo::sqlite("quickstart.db").await?;
    fluxo.register(OrderFlow)?;
    let worker = fluxo.worker().concurrency(8).spawn();

    let order = Order {
        id: "order-42".into(),
        cents: 4_200,
    };
    println!("starting {} (journal in quickstart.db)", order.id);
    let handle = OrderFlow::start_with(&fluxo, order, StartOptions::new().id("order-42")).await?;

    // Someone approves the order a moment later, possibly from another process.
    tokio::time::sleep(Duration::from_millis(500)).await;
    match handle.signal(Approved { by: "ana".into() }).await {
        Ok(()) => println!("sent approval"),
        Err(fluxo::Error::WorkflowFinished { .. }) => {
            println!("order-42 already finished in an earlier run")
        }
        Err(e) => return Err(e.into()),
    }

    let receipt = handle.result().await?;
    println!("done: {receipt:?}");
    println!("journal:");
    for entry in fluxo.history(handle.id()).await? {
        println!(
            "  #{:<2} seq {:<2} {}",
            entry.event_id,
            entry.seq,
            entry.event.kind()
        );
    }
    worker.shutdown().await;
    Ok(())
}
