#!/usr/bin/env bash
# Runs every check and test of Kairos, as CI does (`.ci/run` calls exactly this script).
# It installs what the tests need by itself, so it works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, property, in-process API, golden replay, crash tests)"
cargo test --workspace --locked
