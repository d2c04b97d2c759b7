#!/usr/bin/env bash
# Stops what scripts/up.sh started; data stays in .local/ for the next up.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
state="$(pwd)/.local"
for pidfile in "$state/run/ingress.pid" "$state/run/egress.pid" "$state/garage/garage.pid" "$state/tarantool/tarantool.pid" \
    "$state"/tarantool-33*/tarantool.pid; do
    if pid_alive "$pidfile"; then log "stopping $(basename "$pidfile" .pid)"; fi
    stop_pidfile "$pidfile"
done
log "stopped; remove .local/ to start from scratch"
