//! Integration tests, examples and benches for Fluxo.
