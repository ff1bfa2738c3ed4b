//! Compile-time behaviour of `#[fluxo::workflow]`, `#[fluxo::step]` and
//! `#[fluxo::signal]`: what must compile, and the errors misuse produces.
//!
//! The compiler's messages list types from the dependencies in the build,
//! which depend on the enabled features, so the expected `.stderr` files are
//! for the full feature set that the test command uses
//! (`cargo test --workspace --all-features`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    if cfg!(all(
        feature = "sqlite",
        feature = "postgres",
        feature = "redis",
        feature = "mongodb"
    )) {
        t.compile_fail("tests/ui/fail/*.rs");
    } else {
        eprintln!(
            "SKIPPED: the compile-fail cases run with --all-features (their expected messages \
             list types from every backend's dependencies)"
        );
    }
}
