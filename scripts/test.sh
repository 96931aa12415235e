#!/usr/bin/env bash
# The project's test command: formatting, lints, every test (unit, integration against
# qemu-img, property tests, doc tests, fuzz corpora). Needs qemu-img/qemu-io on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets --all-features -- -D warnings
cargo test --all-features
