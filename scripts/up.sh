#!/usr/bin/env bash
# Runs the whole system locally: installs what is missing (Tarantool, the
# Garage S3 server, grpcurl), starts Tarantool on 127.0.0.1:3301 and S3 on
# 127.0.0.1:9000, builds and starts ingress (50051) and egress (50052) with all
# state under .local/, and returns once both report SERVING. Running it again
# leaves running parts alone. scripts/down.sh stops everything.
#
# --ha: Tarantool as a replica set of three (127.0.0.1:3301, 3302, 3303) with
# synchronous replication (a write commits once two members have it); the
# services are given all three and follow the one that takes writes. This
# Tarantool (2.6) has no automatic election: scripts/failover.sh promotes a
# member when the leader is lost (see "High availability" in the README).
set -euo pipefail
ha=0
case "${1:-}" in
    --ha) ha=1 ;;
    '') ;;
    *) echo "usage: scripts/up.sh [--ha]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
source scripts/lib.sh
root=$(pwd)
state="$root/.local"
mkdir -p "$state/run" "$state/logs"

ensure_tarantool
ensure_grpcurl
ensure_garage

# Local-only credentials, generated once and kept in .local/.
[ -f "$state/credentials" ] || cat >"$state/credentials" <<CREDS
TARANTOOL_PASSWORD=$(openssl rand -hex 12)
MINIO_ACCESS_KEY_ID=GK$(openssl rand -hex 12)
MINIO_SECRET_ACCESS_KEY=$(openssl rand -hex 32)
TARANTOOL_REPLICATION_PASSWORD=$(openssl rand -hex 12)
TARANTOOL_ADMIN_PASSWORD=$(openssl rand -hex 12)
CREDS
# shellcheck disable=SC1091
source "$state/credentials"

# Credentials files from before --ha lack these.
if [ -z "${TARANTOOL_REPLICATION_PASSWORD:-}" ]; then
    printf 'TARANTOOL_REPLICATION_PASSWORD=%s\nTARANTOOL_ADMIN_PASSWORD=%s\n' \
        "$(openssl rand -hex 12)" "$(openssl rand -hex 12)" >>"$state/credentials"
    # shellcheck disable=SC1091
    source "$state/credentials"
fi
tarantool_address=127.0.0.1:3301
if [ $ha = 1 ]; then
    peers=127.0.0.1:3301,127.0.0.1:3302,127.0.0.1:3303
    tarantool_address=$peers
    # The member that takes writes: the first, or the one failover.sh chose.
    leader=$(cat "$state/ha-leader" 2>/dev/null || echo 3301)
    for port in "$leader" $(printf '%s\n' 3301 3302 3303 | grep -vx "$leader"); do
        dir="$state/tarantool-$port"
        if pid_alive "$dir/tarantool.pid"; then
            log "tarantool $port already running"
            continue
        fi
        read_only=true
        [ "$port" = "$leader" ] && read_only=false
        if grep -qx "$port" "$state/ha-rejoin" 2>/dev/null; then
            # A leader lost in a failover: its unconfirmed writes must not
            # reach the others, so its data is set aside and it rejoins.
            aside="$dir.replaced-$(date +%Y%m%dT%H%M%S)"
            [ -d "$dir" ] && mv "$dir" "$aside" && log "tarantool $port rejoins; its old data is in $aside"
            grep -vx "$port" "$state/ha-rejoin" >"$state/ha-rejoin.new" || true
            mv "$state/ha-rejoin.new" "$state/ha-rejoin"
        fi
        log "starting tarantool on 127.0.0.1:$port (read_only=$read_only)"
        start_member "$dir" "$port" "$TARANTOOL_PASSWORD" "$TARANTOOL_REPLICATION_PASSWORD" "$peers" \
            "$read_only" "$TARANTOOL_ADMIN_PASSWORD"
    done
    echo "$leader" >"$state/ha-leader"
elif pid_alive "$state/tarantool/tarantool.pid"; then
    log "tarantool already running"
else
    log "starting tarantool on 127.0.0.1:3301"
    start_tarantool "$state/tarantool" 3301 "$TARANTOOL_PASSWORD"
fi
if pid_alive "$state/garage/garage.pid"; then
    log "garage (S3) already running"
else
    log "starting garage (S3) on 127.0.0.1:9000"
    start_garage "$state/garage" 9000 3901 "$MINIO_ACCESS_KEY_ID" "$MINIO_SECRET_ACCESS_KEY" minitoolstream
fi

log "building ingress, egress and the mts command (release)"
cargo build --release --locked -p mts-ingress -p mts-egress -p mts-cli
mts="$root/target/release/mts"

export TARANTOOL_ADDRESS=$tarantool_address TARANTOOL_USER=minitoolstream_connector TARANTOOL_PASSWORD
export MINIO_ENDPOINT=127.0.0.1:9000 MINIO_ACCESS_KEY_ID MINIO_SECRET_ACCESS_KEY MINIO_BUCKET_NAME=minitoolstream
export MINIO_USE_SSL=false LOG_FORMAT="${LOG_FORMAT:-json}" LOG_LEVEL="${LOG_LEVEL:-info}"
for service in ingress egress; do
    if pid_alive "$state/run/$service.pid"; then
        log "$service already running"
        continue
    fi
    port=50051 metrics=9091
    [ "$service" = egress ] && port=50052 metrics=9092
    log "starting $service on 127.0.0.1:$port (metrics on :$metrics)"
    SERVER_HOST=127.0.0.1 SERVER_PORT=$port METRICS_PORT=$metrics \
        nohup "target/release/$service" >>"$state/logs/$service.log" 2>&1 &
    echo $! >"$state/run/$service.pid"
done

grpcurl=$(grpcurl_bin)
for target in 50051:minitoolstream.IngressService 50052:minitoolstream.EgressService; do
    port=${target%%:*} service=${target#*:}
    deadline=$((SECONDS + 90))
    name=ingress; [ "$port" = 50052 ] && name=egress
    until "$grpcurl" -plaintext -d "{\"service\":\"$service\"}" "127.0.0.1:$port" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; do
        pid_alive "$state/run/$name.pid" || die "$name exited; the end of .local/logs/$name.log:
$(tail -n 5 "$state/logs/$name.log")"
        [ $SECONDS -lt $deadline ] || die "$service on port $port is not SERVING after 90 s; see .local/logs/$name.log"
        sleep 0.2
    done
    log "$service on 127.0.0.1:$port is SERVING"
done

cat <<MSG

MiniToolStream is running (logs in .local/logs, data in .local/, metrics on
http://127.0.0.1:9091/metrics and :9092). The mts command is $mts
(it reaches 127.0.0.1:50051 and :50052 by default). Try it:

  MTS=$mts
  \$MTS pub demo.hello --data hello
  \$MTS pub demo.files ./README.md              # any file, any size, streamed
  \$MTS sub demo.files me --out ./inbox --count 1
  \$MTS consumer ls demo.files
  \$MTS subject info demo.files --json

Or with grpcurl:

  GRPCURL=$grpcurl
  \$GRPCURL -plaintext 127.0.0.1:50051 list
  \$GRPCURL -plaintext -d '{"subject":"demo.hello","data":"'\$(printf hello | base64)'","headers":{"k":"v"}}' \\
      127.0.0.1:50051 minitoolstream.IngressService/Publish
  \$GRPCURL -plaintext -d '{"subject":"demo.hello","durable_name":"me"}' 127.0.0.1:50052 minitoolstream.EgressService/Subscribe
  \$GRPCURL -plaintext -d '{"subject":"demo.hello","durable_name":"me","batch_size":10}' 127.0.0.1:50052 minitoolstream.EgressService/Fetch
  \$GRPCURL -plaintext -d '{"subject":"demo.hello","durable_name":"me","sequence":1}' 127.0.0.1:50052 minitoolstream.EgressService/AckMessage

Stop everything with scripts/down.sh.
MSG
