//! A complete workflow: steps taking references, owned `Clone` values, `mut`
//! parameters and `&self`, with `?` and early `return` in their bodies, plus
//! declared signals.
#![deny(warnings)]

use fluxo::{StepError, WorkflowContext, WorkflowError};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub cents: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentId(pub String);

#[derive(Debug, Serialize, Deserialize)]
pub struct Receipt {
    pub payment: PaymentId,
    pub shipped: bool,
    pub approved_by: Option<String>,
}

#[fluxo::signal]
#[derive(Debug, Serialize, Deserialize)]
pub struct Approved {
    pub by: String,
}

#[fluxo::signal(name = "order.rejected")]
#[derive(Debug, Serialize, Deserialize)]
pub enum Rejected {
    OutOfStock,
    Fraud { reason: String },
}

fn validate(order: &Order) -> Result<u64, StepError> {
    if order.cents == 0 {
        return Err(StepError::fatal("empty order"));
    }
    Ok(order.cents)
}

/// Charges the order.
#[fluxo::step(
    retry(
        max_attempts = 5,
        initial = "200ms",
        max = "30s",
        backoff = 2.0,
        jitter = 0.1,
        non_retryable("Declined")
    ),
    timeout = "10s"
)]
pub async fn charge(order: &Order) -> Result<PaymentId, StepError> {
    let cents = validate(order)?;
    if cents > 1_000_000 {
        return Err(StepError::fatal("over the limit").with_kind("Declined"));
    }
    Ok(PaymentId(format!("pay-{}-{cents}", order.id)))
}

#[fluxo::step(name = "ship_order", retry(max_attempts = 3))]
async fn ship(order: Order, mut attempts_left: u32, _note: String) -> Result<bool, StepError> {
    while attempts_left > 0 {
        attempts_left -= 1;
        if order.cents % 2 == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

#[fluxo::step(timeout = "1h 30m")]
async fn log_receipt(_: &Receipt) -> Result<(), StepError> {
    Ok(())
}

pub struct Mailer {
    pub from: String,
}

impl Mailer {
    #[fluxo::step(retry(initial = "1s", max = "2days"))]
    pub async fn send(&self, to: &str, body: String) -> Result<usize, StepError> {
        if to.is_empty() {
            return Err(StepError::retryable("no recipient"));
        }
        Ok(self.from.len() + body.len())
    }
}

#[fluxo::workflow(version = 1, signals(Approved, Rejected))]
pub async fn order_flow(ctx: WorkflowContext, order: Order) -> Result<Receipt, WorkflowError> {
    let _ = &ctx;
    let payment = charge(&order).await?;
    let shipped = ship(order.clone(), 3, String::from("fragile")).await?;
    let mailer = Mailer {
        from: "shop@example.com".into(),
    };
    mailer
        .send("ana@example.com", format!("{payment:?}"))
        .await?;
    let receipt = Receipt {
        payment,
        shipped,
        approved_by: None,
    };
    if !shipped {
        return Err(WorkflowError::new("not shipped"));
    }
    log_receipt(&receipt).await?;
    Ok(receipt)
}

async fn use_handles(fluxo: &fluxo::Fluxo, order: Order) -> Result<(), fluxo::Error> {
    let handle: fluxo::WorkflowHandle<OrderFlow> = OrderFlow::start(fluxo, order.clone()).await?;
    handle.signal(Approved { by: "ana".into() }).await?;
    handle
        .signal(Rejected::Fraud {
            reason: "stolen card".into(),
        })
        .await?;
    let _other = OrderFlow::handle(fluxo, "order-42");
    let _same = OrderFlow::handle(fluxo, String::from("order-42"));
    let _third = OrderFlow::start_with(fluxo, order, Default::default()).await?;
    Ok(())
}

fn assert_workflow<W: fluxo::Workflow<Input = Order, Output = Receipt>>(_: W) {}
fn assert_signal<S: fluxo::Signal>() -> &'static str {
    S::NAME
}

fn main() {
    assert_workflow(OrderFlow);
    assert_eq!(<OrderFlow as fluxo::Workflow>::NAME, "order_flow");
    assert_eq!(<OrderFlow as fluxo::Workflow>::VERSION, 1);
    assert_eq!(assert_signal::<Approved>(), "Approved");
    assert_eq!(assert_signal::<Rejected>(), "order.rejected");
    let _ = format!("{:?}", OrderFlow::default());
    let _ = use_handles;
}
