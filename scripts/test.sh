#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, the deployment files
# (schemas, lint, policy scan), unit tests, and the service and end-to-end
# tests against a real Tarantool and a real S3 server (Garage) that this
# script starts on free ports and stops afterwards. Arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_tarantool
ensure_grpcurl
ensure_rust_components
ensure_garage

work=$(mktemp -d "${TMPDIR:-/tmp}/mts-test.XXXXXX")
cleanup() {
    stop_pidfile "$work/garage/garage.pid"
    stop_pidfile "$work/tarantool/tarantool.pid"
    if [ "${KEEP_TEST_STATE:-0}" = 1 ]; then log "test state kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

tarantool_port=$(free_port)
s3_port=$(free_port)
rpc_port=$(free_port)
password=$(openssl rand -hex 12)
admin_password=$(openssl rand -hex 12)
access_key="GK$(openssl rand -hex 12)"
secret_key=$(openssl rand -hex 32)

log "starting tarantool on 127.0.0.1:$tarantool_port"
start_tarantool "$work/tarantool" "$tarantool_port" "$password" "$admin_password"
log "starting garage (S3) on 127.0.0.1:$s3_port"
start_garage "$work/garage" "$s3_port" "$rpc_port" "$access_key" "$secret_key" minitoolstream-test

export MTS_TEST_TARANTOOL_ADDRESS="127.0.0.1:$tarantool_port"
export MTS_TEST_TARANTOOL_USER=minitoolstream_connector
export MTS_TEST_TARANTOOL_PASSWORD="$password"
export MTS_TEST_TARANTOOL_ADMIN_PASSWORD="$admin_password"
export MTS_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
export MTS_TEST_S3_ACCESS_KEY="$access_key"
export MTS_TEST_S3_SECRET_KEY="$secret_key"
export MTS_TEST_S3_BUCKET=minitoolstream-test
GRPCURL="$(grpcurl_bin)"
export GRPCURL
MTS_TEST_GARAGE_BIN="$(garage_bin)"
export MTS_TEST_GARAGE_BIN

if [ "${SKIP_LINT:-0}" != 1 ]; then
    scripts/lint.sh
    scripts/validate-deploy.sh
fi
log "cargo test"
cargo test --workspace --locked --no-fail-fast "$@"
