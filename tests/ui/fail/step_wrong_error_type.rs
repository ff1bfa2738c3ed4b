#[derive(Debug)]
pub struct PaymentError;

#[fluxo::step]
async fn charge(cents: u64) -> Result<u64, PaymentError> {
    if cents == 0 {
        return Err(PaymentError);
    }
    Ok(cents)
}

fn main() {}
