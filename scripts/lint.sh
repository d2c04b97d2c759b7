#!/usr/bin/env bash
# Formatting, shellcheck and clippy, warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust_components
log "cargo fmt --check, shellcheck"
cargo fmt --all -- --check
if ! command -v shellcheck >/dev/null; then
    as_root apt-get install -y -qq shellcheck >/dev/null 2>&1 \
        || { as_root apt-get update -qq && as_root apt-get install -y -qq shellcheck >/dev/null; }
fi
shellcheck -x scripts/*.sh .ci/run
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
