#!/usr/bin/env bash
# Validates k8s/ (every overlay, the Helm chart with several value sets, the
# examples), docker-compose.yml and the monitoring files: schemas, lint,
# policy scan, and that the base is what the chart renders. Installs the
# validators it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_deploy_validators
log "validating deployment files"
CHECKOV="$(checkov_bin)" PROMTOOL="$(promtool_bin)" HELM="$(helm_bin)" NODE="$(node_bin)" \
    CRD_MODELS="$(crd_models_dir)/node_modules" python3 scripts/validate_deploy.py
