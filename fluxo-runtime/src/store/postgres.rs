//! Postgres backend (work in progress).
