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
cache_root="${SEINODE_TLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seinode-tls}"
out="$cache_root/cert-manager/$version"
if [[ -f "$out/cert-manager.io_certificates.yaml" ]]; then
  echo "$out"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is needed to fetch cert-manager's CRDs from the Go module proxy" >&2
  exit 1
fi
mkdir -p "$cache_root/cert-manager"
exec 9>"$cache_root/cert-manager/.lock"
flock 9
if [[ -f "$out/cert-manager.io_certificates.yaml" ]]; then
  echo "$out"
  exit 0
fi
echo "fetching cert-manager ${version}'s CRDs from the Go module proxy" >&2
dir="$(cd /tmp && go mod download -json "${module}@${version}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
if [[ -z "$dir" || ! -d "$dir/deploy/crds" ]]; then
  echo "error: ${module}@${version} has no deploy/crds/ (go mod download gave '${dir}')" >&2
  exit 1
fi
tmp="$(mktemp -d "$cache_root/cert-manager/.fetch-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cp "$dir"/deploy/crds/*.yaml "$tmp/"
chmod 644 "$tmp"/*.yaml
chmod 755 "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
