//! Postgres connection loss: the server drops every connection of the store
//! in the middle of a run; workers log, back off, reconnect and carry on, and
//! nothing that was acknowledged is lost.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use fluxo::prelude::*;

#[fluxo::step(retry(max_attempts = 10, initial = "50ms"))]
async fn tick(i: u32) -> Result<u32, StepError> {
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(i)
}

#[fluxo::workflow]
async fn ticker(_ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut sum = 0;
    for i in 0..n {
        sum += tick(i).await?;
    }
    Ok(sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_survive_terminated_connections() {
    let Some(store) = fluxo::store::postgres::test_store_from_env().await else {
        return;
    };
    let pool = store.pool().clone();
    let app = store.schema().to_owned();
    let fluxo = Fluxo::from_store(Arc::new(store));
    fluxo.register(Ticker).unwrap();
    let worker = fluxo.worker().concurrency(20).spawn();
    let mut handles = Vec::new();
    for _ in 0..40 {
        handles.push(Ticker::start(&fluxo, 60).await.unwrap());
    }
    // Kill every connection of this store, three times, while it runs.
    let killer =
        sqlx::PgPool::connect_with((*pool.connect_options()).clone().application_name("killer"))
            .await
            .unwrap();
    let mut killed = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let n: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&app)
        .fetch_all(&killer)
        .await
        .unwrap();
        killed += n.len();
    }
    assert!(killed > 0, "connections were terminated");
    let mut running = 0;
    for h in &handles {
        // This read may itself land on a terminated connection: retry it.
        let mut status = h.status().await;
        for _ in 0..10 {
            if status.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = h.status().await;
        }
        running += usize::from(status.unwrap() == WorkflowStatus::Running);
    }
    assert!(running > 0, "the kills came mid-run");
    let expected: u32 = (0..60).sum();
    for h in &handles {
        assert_eq!(
            h.result_timeout(Duration::from_secs(120)).await.unwrap(),
            expected
        );
        let history = fluxo.history(h.id()).await.unwrap();
        for (i, e) in history.iter().enumerate() {
            assert_eq!(e.event_id, i as u64, "no gap or duplicate");
        }
    }
    worker.shutdown().await;
}
