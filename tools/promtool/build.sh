#!/usr/bin/env bash
# Builds promtool (github.com/prometheus/prometheus/cmd/promtool, from the Go module proxy) into
# a cache outside the repo and prints the directory that holds it. For the test that runs
# `promtool test rules` over the chart's PrometheusRule. Reuses an earlier build.
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../cache.sh
source "$here/../cache.sh"

produce() {
  echo "building promtool (a few minutes the first time)" >&2
  # remove_all_sd leaves out the cloud service-discovery plugins (and their SDKs): rule tests
  # need none of them, and the build takes a fraction of the time.
  go_build "$here" -tags remove_all_sd -o "$1/promtool" github.com/prometheus/prometheus/cmd/promtool
}

key="$(cache_key "$here/go.mod" "$here/go.sum" "$here/tools.go")"
cached promtool "$key" promtool "build promtool"
