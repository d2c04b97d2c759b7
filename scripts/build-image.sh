#!/usr/bin/env bash
# Builds the ingress and egress images: scripts/build-image.sh [TAG] (default 0.1.0).
# IMPORT_K3S=1 also imports them into a local k3s, as the deployment guide does.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
tag=${1:-0.1.0}
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not running (docker info fails); start it or build on a machine that has one"
for service in ingress egress; do
    log "building minitoolstream-$service:$tag"
    docker build -f "$service/Dockerfile" -t "minitoolstream-$service:$tag" .
    if [ "${IMPORT_K3S:-0}" = 1 ]; then
        log "importing minitoolstream-$service:$tag into k3s"
        docker save "minitoolstream-$service:$tag" | as_root k3s ctr images import -
    fi
done
log "built minitoolstream-ingress:$tag and minitoolstream-egress:$tag"
[ "$tag" = 0.1.0 ] || log "deploy this tag with: IMAGE_TAG=$tag scripts/deploy.sh [overlay]"
