#!/usr/bin/env bash
# Validates k8s/ (every overlay), docker-compose.yml and the monitoring files:
# schemas, lint, policy scan. Installs the validators it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_deploy_validators
log "validating deployment files"
CHECKOV="$(checkov_bin)" PROMTOOL="$(promtool_bin)" python3 scripts/validate_deploy.py
