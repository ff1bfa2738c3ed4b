//! A user-onboarding workflow built at run time with the builder API, on a
//! SQLite file in the system temp directory.
//!
//! `cargo run --example builder_flow`
//!
//! It creates an account (validated by middleware), branches on the plan,
//! sends three welcome messages in parallel, waits durably for an
//! "email verified" signal, runs a three-message drip loop with a durable
//! sleep, activates the account, and prints its journal: every step,
//! branch choice, loop iteration and scheduling decision is an entry.

use std::time::Duration;

use fluxo::flow::{step, Flow};
use fluxo::middleware::MiddlewareStack;
use fluxo::middleware_builtin::{MiddlewareStackExt, ValidationMiddleware};
use fluxo::prelude::*;
use serde_json::{json, Value};

fn onboarding() -> Flow {
    let validate = MiddlewareStack::new().with(ValidationMiddleware::new().input(|v| {
        match v.get("email").and_then(Value::as_str) {
            Some(e) if e.contains('@') => Ok(()),
            _ => Err("an e-mail address is required".to_owned()),
        }
    }));
    let welcome = |channel: &'static str| {
        step(channel, move |user: Value| async move {
            println!(
                "  [{channel}] welcome, {}!",
                user["name"].as_str().unwrap_or("?")
            );
            Ok(json!(channel))
        })
    };
    Flow::new("OnboardUser")
        .version(1)
        // Only this step validates its input: the stack wraps its function.
        .step(
            "create_account",
            validate.apply(|user: Value| async move {
                println!("  creating an account for {}", user["email"]);
                let mut user = user;
                user["account_id"] = json!(4242);
                Ok(user)
            }),
        )
        .if_(
            "pro_plan",
            |user| user["plan"] == "pro",
            step("assign_manager", |mut user: Value| async move {
                println!("  pro plan: assigning an account manager");
                user["manager"] = json!("bo");
                Ok(user)
            }),
            step("self_serve", |user: Value| async move {
                println!("  free plan: self-serve onboarding");
                Ok(user)
            }),
        )
        .parallel(
            "welcome",
            [welcome("email"), welcome("sms"), welcome("in_app")],
        )
        .step("sent", |channels: Value| async move {
            println!("  welcome messages sent on {channels}");
            Ok(json!({ "channels": channels }))
        })
        .wait_for_signal("verification", "email_verified")
        .step("verified", |signal: Value| async move {
            println!("  e-mail verified at {}", signal["at"]);
            Ok(json!(0))
        })
        .loop_(
            "drip",
            3,
            Flow::empty()
                .step("drip_email", |n: Value| async move {
                    let n = n.as_i64().unwrap_or_default() + 1;
                    println!("  drip e-mail #{n}");
                    Ok(json!(n))
                })
                .sleep("pause", Duration::from_millis(200)),
        )
        .step("activate", |sent: Value| async move {
            println!("  activating the account after {sent} drip e-mails");
            Ok(json!({ "active": true, "drip_emails": sent }))
        })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = std::env::temp_dir().join("fluxo-builder-flow.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    println!("journal in {}", db.display());
    let fluxo = Fluxo::sqlite(&db).await?;
    let flow = onboarding();
    flow.register(&fluxo)?;
    let worker = fluxo.worker().spawn();

    let user = json!({ "name": "Ana", "email": "ana@example.com", "plan": "pro" });
    let h = flow.start(&fluxo, user).await?;
    println!("started {} ({})", h.workflow(), h.id());

    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("status while waiting for the signal: {}", h.status().await?);
    h.signal("email_verified", json!({ "at": "2026-01-01T10:00:00Z" }))
        .await?;
    let out: Value = h.result_timeout(Duration::from_secs(30)).await?;
    println!("done: {out}");

    // Middleware rejects a user without an e-mail address, and the step's
    // failure is the workflow's.
    let bad = flow.start(&fluxo, json!({ "name": "Bo" })).await?;
    match bad.result_value().await {
        Err(e) => println!("rejected: {e}"),
        Ok(v) => println!("unexpectedly accepted: {v}"),
    }

    println!("journal of {}:", h.id());
    for e in h.history().await? {
        if let fluxo::history::Event::StepCompleted { name, .. } = &e.event {
            println!("  #{:<3} seq {:<3} step {name}", e.event_id, e.seq);
        } else {
            println!("  #{:<3} seq {:<3} {}", e.event_id, e.seq, e.event.kind());
        }
    }
    worker.shutdown().await;
    Ok(())
}
