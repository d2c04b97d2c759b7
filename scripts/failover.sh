#!/usr/bin/env bash
# Manual failover of the local replica set that `scripts/up.sh --ha` runs:
# promotes the live member furthest along (the largest vclock sum) to take
# writes, makes every other live member read-only, and records it in
# .local/ha-leader for the next up; a lost leader is listed in .local/ha-rejoin
# and rejoins from the others. Tarantool 2.6 has no automatic election:
# the promoted member becomes writable, then settles the synchronous writes
# the lost leader left unconfirmed (mts_promote: box.ctl.clear_synchro_queue
# without waiting for the lost leader). The
# services find the new leader within about a second, without a restart.
# On Tarantool 2.11+ (Kubernetes, election_mode = 'candidate') election does
# this by itself; see the runbook.
#
#   scripts/failover.sh            promote the most advanced live member
#   scripts/failover.sh 3302       promote this one (it must be live)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
state="$(pwd)/.local"
[ -f "$state/credentials" ] || die "no .local/credentials: start the replica set with scripts/up.sh --ha"
# shellcheck disable=SC1091
source "$state/credentials"
ensure_tarantool
wanted=${1:-}

# `tarantool` as a client: prints "PORT RO LSN" for each live member.
members=$(MTS_ADMIN_PASSWORD=$TARANTOOL_ADMIN_PASSWORD tarantool -e "
local net = require('net.box')
for _, port in ipairs({3301, 3302, 3303}) do
    local c = net.connect('mts_test_admin:' .. os.getenv('MTS_ADMIN_PASSWORD') .. '@127.0.0.1:' .. port,
        {connect_timeout = 1, wait_connected = 1})
    if c:is_connected() then
        local ok, ro, lsn = pcall(c.eval, c,
            'local n = 0 for _, v in pairs(box.info.vclock) do n = n + v end return box.info.ro, n')
        if ok then
            print(port .. ' ' .. tostring(ro) .. ' ' .. tostring(lsn))
        end
        c:close()
    end
end
os.exit(0)")
[ -n "$members" ] || die "no member of the replica set answers on 127.0.0.1:3301-3303"
log "live members (port, read-only, vclock sum):"
printf '%s\n' "$members" >&2

if [ -n "$wanted" ]; then
    printf '%s\n' "$members" | grep -q "^$wanted " || die "member $wanted is not live"
    leader=$wanted
else
    leader=$(printf '%s\n' "$members" | sort -k3,3nr | head -n1 | cut -d' ' -f1)
fi
live=$(printf '%s\n' "$members" | wc -l)
[ "$live" -ge 2 ] || log "warning: only $live member is live: without a quorum of 2 no write commits until another is back"

MTS_ADMIN_PASSWORD=$TARANTOOL_ADMIN_PASSWORD tarantool -e "
local net = require('net.box')
local leader = $leader
local function admin(port)
    return net.connect('mts_test_admin:' .. os.getenv('MTS_ADMIN_PASSWORD') .. '@127.0.0.1:' .. port,
        {connect_timeout = 1, wait_connected = 1})
end
for _, port in ipairs({3301, 3302, 3303}) do
    if port ~= leader then
        local c = admin(port)
        if c:is_connected() then
            c:eval('box.cfg({read_only = true})')
            c:close()
        end
    end
end
local c = admin(leader)
c:eval('mts_promote()')
c:close()
os.exit(0)"
# The lost leader may hold writes no other member has (unconfirmed when it
# died). Tarantool 2.6 would hand them to the others when it came back, so it
# rejoins with its data set aside and gets everything from the quorum.
previous=$(cat "$state/ha-leader" 2>/dev/null || echo 3301)
if [ "$previous" != "$leader" ] && ! printf '%s\n' "$members" | grep -q "^$previous "; then
    echo "$previous" >>"$state/ha-rejoin"
    log "127.0.0.1:$previous, the lost leader, rejoins from the others when it comes back (scripts/up.sh --ha)"
fi
echo "$leader" >"$state/ha-leader"
log "127.0.0.1:$leader takes writes now; a member that comes back starts read-only (scripts/up.sh --ha)"
