#!/usr/bin/env bash
# Deploys MiniToolStream: scripts/deploy.sh [base|dev|prod|external-s3] (default base).
# Applies the kustomization, waits for every rollout, then shows pods,
# services and autoscalers. IMAGE_TAG=TAG deploys images built with that tag.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
overlay=${1:-base}
case "$overlay" in
    base) dir=k8s/base ;;
    dev | prod | external-s3) dir=k8s/overlays/$overlay ;;
    *) die "unknown overlay '$overlay'; use base, dev, prod or external-s3" ;;
esac
command -v kubectl >/dev/null || die "kubectl is not installed"
kubectl cluster-info --request-timeout=5s >/dev/null 2>&1 \
    || die "no Kubernetes cluster answers (kubectl cluster-info fails); check KUBECONFIG and the current context"
if [ "$overlay" = prod ] && ! kubectl get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
    die "the prod overlay needs the Prometheus Operator (CRD servicemonitors.monitoring.coreos.com is missing)"
fi

rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
# The Tarantool ConfigMap is generated from shared/storage/lua, outside k8s/.
kubectl kustomize --load-restrictor LoadRestrictionsNone "$dir" >"$rendered"
if [ -n "${IMAGE_TAG:-}" ]; then
    sed -i -E "s#image: (minitoolstream-(ingress|egress)):[^[:space:]]+#image: \1:${IMAGE_TAG}#" "$rendered"
fi
if grep -q 'change-me' "$rendered" && [ "$overlay" != dev ]; then
    log "WARNING: the Secret still holds placeholder credentials; replace them (k8s/README.md, 'Secrets')"
fi

log "applying $dir"
kubectl apply -f "$rendered"
log "waiting for rollouts"
kubectl -n minitoolstream rollout status statefulset/tarantool --timeout=300s
if kubectl -n minitoolstream get statefulset/minio >/dev/null 2>&1; then
    kubectl -n minitoolstream rollout status statefulset/minio --timeout=300s
fi
kubectl -n minitoolstream rollout status deployment/minitoolstream-ingress --timeout=300s
kubectl -n minitoolstream rollout status deployment/minitoolstream-egress --timeout=300s
kubectl -n minitoolstream get pods,svc,hpa -o wide
