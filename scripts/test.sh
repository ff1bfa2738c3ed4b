#!/usr/bin/env bash
# The project's test command: starts (or installs) the database servers the
# backend tests need, then runs every test. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=services.sh
source scripts/services.sh || [ -z "${CI:-}" ]
cargo test --workspace --all-features "$@"
