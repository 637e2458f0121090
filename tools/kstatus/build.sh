#!/usr/bin/env bash
# Builds the kstatus probe (main.go: sigs.k8s.io/cli-utils' kstatus, from the Go module proxy)
# into a cache outside the repo and prints the directory that holds it. For the test that reads
# SeiNodes' status as Flux and Argo CD do. Reuses an earlier build.
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../cache.sh
source "$here/../cache.sh"

produce() {
  echo "building the kstatus probe (about a minute the first time)" >&2
  go_build "$here" -o "$1/kstatus" .
}

key="$(cache_key "$here/go.mod" "$here/go.sum" "$here/main.go")"
cached kstatus "$key" kstatus "build the kstatus probe"
