#!/usr/bin/env bash
# Builds promtool (github.com/prometheus/prometheus/cmd/promtool, from the Go module proxy) into
# a cache outside the repo and prints the directory that holds it. For the test that runs
# `promtool test rules` over the chart's PrometheusRule. Reuses an earlier build.
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sum="$(cat "$here/go.mod" "$here/go.sum" "$here/tools.go" "$0" | sha256sum | cut -c1-12)"
cache_root="${SEINODE_TLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seinode-tls}"
out="$cache_root/promtool/$sum"
if [[ -x "$out/promtool" ]]; then
  echo "$out"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is needed to build promtool from the Go module proxy" >&2
  exit 1
fi
mkdir -p "$cache_root/promtool"
exec 9>"$cache_root/promtool/.lock"
flock 9
if [[ -x "$out/promtool" ]]; then
  echo "$out"
  exit 0
fi
echo "building promtool into ${out} (a few minutes the first time)" >&2
tmp="$(mktemp -d "$cache_root/promtool/.build-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
cd "$here"
# remove_all_sd leaves out the cloud service-discovery plugins (and their SDKs): rule tests
# need none of them, and the build takes a fraction of the time.
CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath" \
  go build -tags remove_all_sd -ldflags "-s -w" -o "$tmp/promtool" github.com/prometheus/prometheus/cmd/promtool
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
