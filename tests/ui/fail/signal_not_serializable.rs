#[fluxo::signal]
pub struct Approved {
    pub by: String,
}

fn main() {}
