#!/usr/bin/env bash
# Runs the benchmarks on release builds: starts Tarantool, the S3 server and
# both services on free loopback ports, runs each scenario, prints its figures
# and writes them to bench-results/ (JSON lines and a Markdown table).
#   scripts/bench.sh           full sizes (1 GiB transfers)
#   scripts/bench.sh --quick   small sizes, for a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

quick=0
[ "${1:-}" = --quick ] && quick=1

ensure_tarantool
ensure_grpcurl
ensure_garage
log "building release binaries"
cargo build --release --locked -q -p mts-ingress -p mts-egress -p mts-bench

work=$(mktemp -d "${TMPDIR:-/tmp}/mts-bench.XXXXXX")
cleanup() {
    for pidfile in "$work"/run/*.pid "$work/garage/garage.pid" "$work/tarantool/tarantool.pid"; do
        [ -f "$pidfile" ] && stop_pidfile "$pidfile"
    done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/run"

tarantool_port=$(free_port) s3_port=$(free_port) rpc_port=$(free_port)
password=$(openssl rand -hex 12) access_key="GK$(openssl rand -hex 12)" secret_key=$(openssl rand -hex 32)
start_tarantool "$work/tarantool" "$tarantool_port" "$password"
start_garage "$work/garage" "$s3_port" "$rpc_port" "$access_key" "$secret_key" minitoolstream-bench

export TARANTOOL_ADDRESS="127.0.0.1:$tarantool_port" TARANTOOL_USER=minitoolstream_connector TARANTOOL_PASSWORD="$password"
export MINIO_ENDPOINT="http://127.0.0.1:$s3_port" MINIO_ACCESS_KEY_ID="$access_key" MINIO_SECRET_ACCESS_KEY="$secret_key"
export MINIO_BUCKET_NAME=minitoolstream-bench LOG_LEVEL=warn SERVER_HOST=127.0.0.1
grpcurl=$(grpcurl_bin)
declare -A ports
for service in ingress egress; do
    port=$(free_port)
    ports[$service]=$port
    SERVER_PORT=$port METRICS_PORT=0 "target/release/$service" >"$work/$service.log" 2>&1 &
    echo $! >"$work/run/$service.pid"
done
for service in ingress egress; do
    name=minitoolstream.IngressService
    [ "$service" = egress ] && name=minitoolstream.EgressService
    deadline=$((SECONDS + 60))
    until "$grpcurl" -plaintext -d "{\"service\":\"$name\"}" "127.0.0.1:${ports[$service]}" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; do
        [ $SECONDS -lt $deadline ] || die "$service is not SERVING; its log: $(tail -n 5 "$work/$service.log")"
        sleep 0.2
    done
done

bench() {
    target/release/mts-bench --ingress "http://127.0.0.1:${ports[ingress]}" --egress "http://127.0.0.1:${ports[egress]}" \
        --ingress-pid "$(cat "$work/run/ingress.pid")" --egress-pid "$(cat "$work/run/egress.pid")" "$@"
}

mkdir -p bench-results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
results="bench-results/$stamp.jsonl"
size=1024
[ "$quick" = 1 ] && size=64
for concurrency in 1 4; do
    log "large payloads: $concurrency × $size MiB"
    bench large-payloads --mib "$size" --concurrency "$concurrency" | tee -a "$results"
done

python3 - "$results" >"bench-results/$stamp.md" <<'PY'
import json, sys
print(f"Machine: {open('/proc/cpuinfo').read().count('processor')} cores; results {sys.argv[1]}\n")
print("| scenario | payload MiB | concurrency | phase | seconds | MiB/s | ingress peak RSS MiB | egress peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    for phase in ("publish", "download"):
        p = r[phase]
        print(f"| {r['scenario']} | {r['payload_mib']} | {r['concurrency']} | {phase} | {p['seconds']} | {p['mib_per_s']} | "
              f"{p.get('ingress', {}).get('peak_rss_mib', '-')} | {p.get('egress', {}).get('peak_rss_mib', '-')} |")
PY
cat "bench-results/$stamp.md"
