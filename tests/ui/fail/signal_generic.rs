use serde::{Deserialize, Serialize};

#[fluxo::signal]
#[derive(Serialize, Deserialize)]
pub struct Approved<T> {
    pub by: T,
}

fn main() {}
