#!/usr/bin/env bash
# Removes MiniToolStream: scripts/undeploy.sh [base|dev|prod|external-s3] [--purge]
# Persistent volumes (Tarantool's and MinIO's data) stay unless --purge is given.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
overlay=base purge=0
for arg in "$@"; do
    case "$arg" in
        --purge) purge=1 ;;
        base | dev | prod | external-s3) overlay=$arg ;;
        *) die "usage: scripts/undeploy.sh [base|dev|prod|external-s3] [--purge]" ;;
    esac
done
dir=k8s/base
[ "$overlay" = base ] || dir=k8s/overlays/$overlay
command -v kubectl >/dev/null || die "kubectl is not installed"
kubectl cluster-info --request-timeout=5s >/dev/null 2>&1 \
    || die "no Kubernetes cluster answers (kubectl cluster-info fails); check KUBECONFIG and the current context"
if [ "$purge" = 1 ]; then
    log "deleting everything in $dir, data volumes included"
    kubectl -n minitoolstream delete pvc -l 'app in (tarantool,minio)' --ignore-not-found
    kubectl kustomize --load-restrictor LoadRestrictionsNone "$dir" | kubectl delete -f - --ignore-not-found
else
    log "deleting the workloads of $dir; namespace, Secret and data volumes stay"
    kubectl kustomize --load-restrictor LoadRestrictionsNone "$dir" | python3 -c '
import sys, yaml
keep = {"Namespace", "Secret"}
docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] not in keep]
print(yaml.safe_dump_all(docs))' | kubectl delete -f - --ignore-not-found
fi
