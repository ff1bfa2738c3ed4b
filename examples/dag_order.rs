//! An order pipeline as a DAG, on a SQLite file in the system temp
//! directory.
//!
//! `cargo run --example dag_order`
//!
//! ```text
//!            ┌─> charge ──┐
//! validate ──┤            ├─> shipping? ─┬─> express ──┐
//!            └─> reserve ─┘              └─> standard ─┴─> notify
//! ```
//!
//! `charge` and `reserve` run in parallel and can be undone (refund,
//! release). The `shipping` choice takes the express branch for large
//! orders; the other branch is bypassed. The second order's address is
//! undeliverable: shipping fails, and the completed nodes are compensated
//! in reverse dependency order.

use std::time::Duration;

use fluxo::dag::{Compensation, Dag, DagOutput, Key, NodeCtx};
use fluxo::prelude::*;
use serde_json::{json, Value};

const TOTAL: Key<u64> = Key::new("total_cents");
const PAYMENT: Key<String> = Key::new("payment_id");

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: String,
    items: Vec<(String, u64)>,
    address: String,
}

async fn validate(n: NodeCtx) -> Result<Value, StepError> {
    let order: Order = n.input_as()?;
    if order.items.is_empty() {
        return Err(StepError::fatal("empty order").with_kind("Invalid"));
    }
    let total: u64 = order.items.iter().map(|(_, c)| c).sum();
    println!(
        "  [{}] validated: {} items, {total} cents",
        order.id,
        order.items.len()
    );
    n.set(&TOTAL, total);
    Ok(json!(order.id))
}

async fn charge(n: NodeCtx) -> Result<Value, StepError> {
    let total = n.get(&TOTAL).unwrap_or_default();
    let key = StepContext::current()
        .map(|s| s.idempotency_key())
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let payment = format!("pay-{}", n.output_as::<String>("validate")?);
    println!("  charged {total} cents as {payment} (idempotency key {key})");
    n.set(&PAYMENT, payment.clone());
    Ok(json!(payment))
}

async fn reserve(n: NodeCtx) -> Result<Value, StepError> {
    let order: Order = n.input_as()?;
    tokio::time::sleep(Duration::from_millis(30)).await;
    println!("  reserved {} items", order.items.len());
    Ok(json!(order.items.len()))
}

async fn ship(n: NodeCtx, how: &str) -> Result<Value, StepError> {
    let order: Order = n.input_as()?;
    if order.address == "nowhere" {
        println!("  {how} shipping to {:?}: undeliverable", order.address);
        return Err(StepError::fatal("undeliverable address").with_kind("Undeliverable"));
    }
    println!(
        "  {how} shipping to {} (paid by {:?})",
        order.address,
        n.get(&PAYMENT)
    );
    Ok(json!(format!("{how}-TRACK-{}", order.id)))
}

async fn refund(c: Compensation) -> Result<(), StepError> {
    println!("  compensating {}: refunding {}", c.node(), c.output());
    Ok(())
}

async fn release(c: Compensation) -> Result<(), StepError> {
    println!(
        "  compensating {}: releasing {} items",
        c.node(),
        c.output()
    );
    Ok(())
}

fn pipeline() -> Result<Dag, fluxo::dag::DagError> {
    Dag::builder("order_pipeline")
        .concurrency(4)
        .node("validate", validate)
        .node("charge", charge)
        .depends_on(["validate"])
        .retry(
            RetryPolicy::default()
                .max_attempts(3)
                .initial_interval(Duration::from_millis(100)),
        )
        .timeout(Duration::from_secs(5))
        .compensate(refund)
        .node("reserve", reserve)
        .depends_on(["validate"])
        .compensate(release)
        .choice("shipping")
        .depends_on(["charge", "reserve"])
        .branch("express", |n| n.get(&TOTAL).unwrap_or_default() >= 10_000)
        .otherwise("standard")
        .node("express", |n| ship(n, "express"))
        .node("standard", |n| ship(n, "standard"))
        .node("notify", |n: NodeCtx| async move {
            let tracking = n.output("express").or(n.output("standard")).cloned();
            println!(
                "  e-mailing the customer: tracking {}",
                tracking.clone().unwrap_or_default()
            );
            Ok(json!({ "tracking": tracking }))
        })
        .depends_on(["express", "standard"])
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = std::env::temp_dir().join("fluxo-dag-order.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    println!("journal in {}", db.display());
    let fluxo = Fluxo::sqlite(&db).await?;
    let dag = pipeline()?;
    println!("nodes in dependency order: {:?}", dag.topological_order());
    dag.register(&fluxo)?;
    let worker = fluxo.worker().spawn();

    let big = Order {
        id: "o-1".into(),
        items: vec![("keyboard".into(), 12_900), ("cable".into(), 900)],
        address: "1 Main St".into(),
    };
    println!("order o-1:");
    let h = dag.start(&fluxo, &big).await?;
    let out: DagOutput = h.result_timeout(Duration::from_secs(30)).await?;
    println!("  outputs: {}", serde_json::to_string(&out.outputs)?);
    println!("  bypassed: {:?}", out.bypassed);
    println!("  total from the shared data: {:?}", out.get(&TOTAL));

    let lost = Order {
        id: "o-2".into(),
        items: vec![("mug".into(), 1_500)],
        address: "nowhere".into(),
    };
    println!("order o-2:");
    let h2 = dag.start(&fluxo, &lost).await?;
    match h2
        .result_timeout::<DagOutput>(Duration::from_secs(30))
        .await
    {
        Err(e) => println!("  failed: {e}"),
        Ok(out) => println!("  unexpectedly shipped: {out:?}"),
    }
    println!("journal of o-2:");
    for e in h2.history().await? {
        if let fluxo::history::Event::StepCompleted { name, output } = &e.event {
            println!("  #{:<3} step {name} -> {output}", e.event_id);
        } else {
            println!("  #{:<3} {}", e.event_id, e.event.kind());
        }
    }
    worker.shutdown().await;
    Ok(())
}
