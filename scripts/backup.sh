#!/usr/bin/env bash
# Takes a consistent backup of MiniToolStream into a new directory: Tarantool's
# checkpoint (box.snapshot(), pinned with box.backup.start() and read over the
# network) and every object it names, copied while object deletions are held.
# Prints what it saved and how large it is.
#   scripts/backup.sh DIR
# Tarantool and the bucket are named by the services' variables
# (TARANTOOL_ADDRESS, TARANTOOL_USER, TARANTOOL_PASSWORD, MINIO_ENDPOINT,
# MINIO_ACCESS_KEY_ID, MINIO_SECRET_ACCESS_KEY, MINIO_BUCKET_NAME,
# MINIO_USE_SSL); unset, the system scripts/up.sh runs is backed up.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
[ $# -eq 1 ] || die "usage: scripts/backup.sh DIR (a new or empty directory)"
use_local_system_unless_configured || true
bin=$(mts_backup_bin)
exec "$bin" backup --to "$1"
