#!/usr/bin/env bash
# Runs the benchmarks on release builds: starts Tarantool, the S3 server, both
# services and the peer (NATS JetStream, file storage, one replica) on free
# loopback ports, runs every scenario against each system taking part, and
# writes bench-results/<time>.jsonl and .md (a table with the ratios).
#   scripts/bench.sh           full sizes (about 6 minutes after the build)
#   scripts/bench.sh --quick   small sizes and short runs (under 2 minutes)
#   scripts/bench.sh --smoke   --quick on unoptimised builds, failing when a scenario
#                              moves nothing or ours has errors: checks the harness
#                              itself; its figures mean nothing
#   scripts/bench.sh --only publish   one scenario (publish, delivery, large-publish, ..., capacity)
#   scripts/bench.sh --ha      ours on a replica set of three Tarantool members with
#                              synchronous replication (a commit needs two), all on
#                              this machine
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

quick=0 smoke=0 only='' ha=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --smoke) quick=1 smoke=1 ;;
        --only) only=$2; shift ;;
        --ha) ha=1 ;;
        *) die "usage: scripts/bench.sh [--quick|--smoke] [--ha] [--only publish|delivery|large-publish|fanout|large-payloads|drain|capacity]" ;;
    esac
    shift
done

ensure_tarantool
ensure_grpcurl
ensure_garage
if ! command -v nats-server >/dev/null; then
    log "installing nats-server (apt), the peer"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi
profile=release bin=target/release
[ "$smoke" = 1 ] && profile=dev bin=target/debug
log "building $profile binaries"
cargo build --profile "$profile" --locked -q -p mts-ingress -p mts-egress -p mts-bench
# A build leaves gigabytes of dirty pages; written back during scenario 1, they
# took a third off its first run (8.5k against 16.2k msg/s a few minutes later).
sync

work=$(mktemp -d "${TMPDIR:-/tmp}/mts-bench.XXXXXX")
cleanup() {
    for pidfile in "$work"/run/*.pid "$work/garage/garage.pid" "$work"/tarantool*/tarantool.pid; do
        [ -f "$pidfile" ] && stop_pidfile "$pidfile"
    done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/run" "$work/nats"

tarantool_port=$(free_port) s3_port=$(free_port) rpc_port=$(free_port) nats_port=$(free_port)
password=$(openssl rand -hex 12) access_key="GK$(openssl rand -hex 12)" secret_key=$(openssl rand -hex 32)
# The local default: the hot tier keeps Tarantool within it however much the
# runs store (the 30 s runs write a few GiB); the rest goes to segments.
tarantool_address=127.0.0.1:$tarantool_port
if [ "$ha" = 1 ]; then
    second=$(free_port) third=$(free_port) replication=$(openssl rand -hex 12)
    tarantool_address=127.0.0.1:$tarantool_port,127.0.0.1:$second,127.0.0.1:$third
    read_only=false
    for member in "tarantool:$tarantool_port" "tarantool-2:$second" "tarantool-3:$third"; do
        MTS_TARANTOOL_MEMTX_MB=256 start_member "$work/${member%%:*}" "${member#*:}" "$password" "$replication" \
            "$tarantool_address" "$read_only"
        read_only=true
    done
else
    MTS_TARANTOOL_MEMTX_MB=256 start_tarantool "$work/tarantool" "$tarantool_port" "$password"
fi
start_garage "$work/garage" "$s3_port" "$rpc_port" "$access_key" "$secret_key" minitoolstream-bench
nats-server -js -sd "$work/nats" -a 127.0.0.1 -p "$nats_port" >"$work/nats.log" 2>&1 &
echo $! >"$work/run/nats.pid"
wait_port 127.0.0.1 "$nats_port" 15 nats-server

export TARANTOOL_ADDRESS="$tarantool_address" TARANTOOL_USER=minitoolstream_connector TARANTOOL_PASSWORD="$password"
export MINIO_ENDPOINT="http://127.0.0.1:$s3_port" MINIO_ACCESS_KEY_ID="$access_key" MINIO_SECRET_ACCESS_KEY="$secret_key"
export MINIO_BUCKET_NAME=minitoolstream-bench LOG_LEVEL=warn SERVER_HOST=127.0.0.1
grpcurl=$(grpcurl_bin)
declare -A ports
for service in ingress egress; do
    port=$(free_port)
    ports[$service]=$port
    SERVER_PORT=$port METRICS_PORT=0 "$bin/$service" >"$work/$service.log" 2>&1 &
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
    "$bin/mts-bench" --ingress "http://127.0.0.1:${ports[ingress]}" --egress "http://127.0.0.1:${ports[egress]}" \
        --nats "nats://127.0.0.1:$nats_port" \
        --pid "ingress=$(cat "$work/run/ingress.pid")" --pid "egress=$(cat "$work/run/egress.pid")" \
        --pid "tarantool=$(cat "$work/tarantool/tarantool.pid")" --pid "garage=$(cat "$work/garage/garage.pid")" \
        --pid "nats-server=$(cat "$work/run/nats.pid")" "$@"
}

mkdir -p bench-results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
results="bench-results/$stamp.jsonl"
if [ "$quick" = 1 ]; then
    secs=3 rate=2000 large_mib=4 streams=100 fan_msgs=10 payload_mib=64 drain=5000 capacity=100000
else
    secs=30 rate=5000 large_mib=16 streams=1000 fan_msgs=50 payload_mib=1024 drain=100000 capacity=5000000
fi
run() {
    [ -z "$only" ] || [ "$1" = "$only" ] || return 0
    log "$*"
    bench "$@" | tee -a "$results"
}
for system in ours ours-many jetstream tarantool; do
    run publish --system "$system" --size 1024 --concurrency 64 --seconds "$secs"
done
for system in ours ours-many jetstream; do
    run delivery --system "$system" --size 1024 --rate "$rate" --seconds "$secs"
done
large_secs=$secs
[ "$quick" = 1 ] || large_secs=20
for system in ours s3 nats-object-store; do
    run large-publish --system "$system" --mib "$large_mib" --concurrency 4 --seconds "$large_secs"
    # Gigabytes were just written: flush them, so the next run does not pay
    # for this one's writeback.
    sync
done
run fanout --streams "$streams" --messages "$fan_msgs" --interval-ms 200
for concurrency in 1 4; do
    for system in ours s3 nats-object-store; do
        run large-payloads --system "$system" --mib "$payload_mib" --concurrency "$concurrency"
        sync
    done
done
for system in ours jetstream; do
    run drain --system "$system" --size 1024 --messages "$drain" --consumers 4
done
run capacity --size 1024 --messages "$capacity"

mode=()
[ "$smoke" = 1 ] && mode=(--smoke)
status=0
python3 scripts/bench_report.py "$results" "${mode[@]}" >"bench-results/$stamp.md" || status=$?
cat "bench-results/$stamp.md"
[ "$status" = 0 ] || die "the benchmark run had errors (above)"
