#!/usr/bin/env bash
# Deploys MiniToolStream: scripts/deploy.sh [base|dev|prod|external-s3] (default base)
# applies the kustomization; scripts/deploy.sh helm [HELM ARGS...] installs or
# upgrades the Helm chart instead (release minitoolstream, e.g. -f values.yaml).
# Then waits for every rollout and shows pods, services and autoscalers.
# IMAGE_TAG=TAG deploys images built with that tag.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
overlay=${1:-base}
case "$overlay" in
    base) dir=k8s/base ;;
    dev | prod | external-s3) dir=k8s/overlays/$overlay ;;
    helm) dir=k8s/helm/minitoolstream ;;
    *) die "unknown overlay '$overlay'; use base, dev, prod, external-s3 or helm" ;;
esac
[ $# -gt 0 ] && shift
command -v kubectl >/dev/null || die "kubectl is not installed"
kubectl cluster-info --request-timeout=5s >/dev/null 2>&1 \
    || die "no Kubernetes cluster answers (kubectl cluster-info fails); check KUBECONFIG and the current context"
if [ "$overlay" = prod ] && ! kubectl get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
    die "the prod overlay needs the Prometheus Operator (CRD servicemonitors.monitoring.coreos.com is missing)"
fi

if [ "$overlay" = helm ]; then
    ensure_helm
    images=()
    if [ -n "${IMAGE_TAG:-}" ]; then
        images=(--set "ingress.image.tag=$IMAGE_TAG" --set "egress.image.tag=$IMAGE_TAG")
    fi
    # The namespace as the kustomize base makes it: restricted Pod Security.
    kubectl create namespace minitoolstream --dry-run=client -o yaml | kubectl apply -f -
    kubectl label namespace minitoolstream --overwrite \
        pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/enforce-version=latest
    log "installing $dir (release minitoolstream)"
    "$(helm_bin)" upgrade --install minitoolstream "$dir" --namespace minitoolstream "${images[@]}" "$@"
else
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
fi
log "waiting for rollouts"
kubectl -n minitoolstream rollout status statefulset/tarantool --timeout=300s
if kubectl -n minitoolstream get statefulset/minio >/dev/null 2>&1; then
    kubectl -n minitoolstream rollout status statefulset/minio --timeout=300s
fi
kubectl -n minitoolstream rollout status deployment/minitoolstream-ingress --timeout=300s
kubectl -n minitoolstream rollout status deployment/minitoolstream-egress --timeout=300s
kubectl -n minitoolstream get pods,svc,hpa -o wide
