#!/usr/bin/env bash
# Restores a backup made by scripts/backup.sh into an empty Tarantool data
# directory (Tarantool stopped) and an empty bucket; then start Tarantool on
# that directory.
#   scripts/restore.sh BACKUP_DIR TARANTOOL_DATA_DIR    with the services' variables set
#   scripts/restore.sh BACKUP_DIR                       into the local system of scripts/up.sh:
#       scripts/down.sh && rm -rf .local/tarantool .local/garage   (or whatever was lost)
#       scripts/restore.sh BACKUP_DIR && scripts/up.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
case $# in 1 | 2) ;; *) die "usage: scripts/restore.sh BACKUP_DIR [TARANTOOL_DATA_DIR]" ;; esac
backup=$1
if use_local_system_unless_configured; then
    state="$(pwd)/.local"
    target=${2:-$state/tarantool}
    pid_alive "$state/tarantool/tarantool.pid" && die "the local Tarantool is running; stop it first: scripts/down.sh"
    if ! pid_alive "$state/garage/garage.pid"; then
        ensure_garage
        log "starting garage (S3) on 127.0.0.1:9000 for the restore"
        start_garage "$state/garage" 9000 3901 "$MINIO_ACCESS_KEY_ID" "$MINIO_SECRET_ACCESS_KEY" "$MINIO_BUCKET_NAME"
    fi
else
    [ $# -eq 2 ] || die "name Tarantool's data directory: scripts/restore.sh BACKUP_DIR TARANTOOL_DATA_DIR"
    target=$2
fi
bin=$(mts_backup_bin)
exec "$bin" restore --from "$backup" --tarantool-dir "$target"
