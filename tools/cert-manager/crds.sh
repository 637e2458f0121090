#!/usr/bin/env bash
# Fetches cert-manager's CRDs (deploy/crds/ of the module github.com/cert-manager/cert-manager,
# which the Go module proxy serves; its controllers' cmd/ modules it does not) into a cache
# outside the repo and prints the directory that holds them. For tests that check what the
# project emits for cert-manager (the chart's Issuer and Certificate, `contract -o certificate`)
# against the real schema. Reuses an earlier fetch.
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)
set -euo pipefail
version=v1.21.2
module=github.com/cert-manager/cert-manager
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../cache.sh
source "$here/../cache.sh"

produce() {
  echo "fetching cert-manager ${version}'s CRDs from the Go module proxy" >&2
  local dir
  dir="$(cd /tmp && go mod download -json "${module}@${version}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  if [[ -z "$dir" || ! -d "$dir/deploy/crds" ]]; then
    echo "error: ${module}@${version} has no deploy/crds/ (go mod download gave '${dir}')" >&2
    return 1
  fi
  cp "$dir"/deploy/crds/*.yaml "$1/"
  chmod 644 "$1"/*.yaml
}

cached cert-manager "$version" cert-manager.io_certificates.yaml "fetch cert-manager's CRDs"
