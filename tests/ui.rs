//! Compile-time behaviour of `#[fluxo::workflow]`, `#[fluxo::step]` and
//! `#[fluxo::signal]`: what must compile, and the errors misuse produces.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
