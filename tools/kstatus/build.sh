#!/usr/bin/env bash
# Builds the kstatus probe (main.go: sigs.k8s.io/cli-utils' kstatus, from the Go module proxy)
# into a cache outside the repo and prints the directory that holds it. For the test that reads
# SeiNodes' status as Flux and Argo CD do. Reuses an earlier build.
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sum="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" "$0" | sha256sum | cut -c1-12)"
cache_root="${SEINODE_TLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seinode-tls}"
out="$cache_root/kstatus/$sum"
if [[ -x "$out/kstatus" ]]; then
  echo "$out"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is needed to build the kstatus probe from the Go module proxy" >&2
  exit 1
fi
mkdir -p "$cache_root/kstatus"
exec 9>"$cache_root/kstatus/.lock"
flock 9
if [[ -x "$out/kstatus" ]]; then
  echo "$out"
  exit 0
fi
echo "building the kstatus probe into ${out} (about a minute the first time)" >&2
tmp="$(mktemp -d "$cache_root/kstatus/.build-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
cd "$here"
CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath" \
  go build -ldflags "-s -w" -o "$tmp/kstatus" .
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
