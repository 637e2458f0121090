#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd (this module),
# kube-rbac-proxy (../kube-rbac-proxy) and helm (../helm, for the chart tests) from Go modules
# into a cache outside the repo and prints the directory that holds them. Reuses a complete
# earlier build. The first build compiles Kubernetes and Helm from source: see
# docs/control-plane.md for how long it takes on two cores.
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes \(v[^ ]*\).*/\1/p' "$here/go.mod")"
helm_dir="$(cd "$here/../helm" && pwd)"
proxy_dir="$(cd "$here/../kube-rbac-proxy" && pwd)"
sum="$(cat "$here/go.mod" "$here/go.sum" "$here/etcd/main.go" "$helm_dir/go.mod" "$helm_dir/go.sum" \
  "$proxy_dir/go.mod" "$proxy_dir/go.sum" "$0" | sha256sum | cut -c1-12)"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kube-rbac-proxy helm)
cache_root="${SEINODE_TLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seinode-tls}"
out="$cache_root/control-plane/${version}-${sum}"

reuse_if_built() {
  local b
  for b in "${binaries[@]}"; do
    [[ -x "$out/$b" ]] || return 0
  done
  echo "$out"
  exit 0
}
reuse_if_built

# One build at a time per cache (parallel test binaries may all ask for the binaries at once).
mkdir -p "$cache_root/control-plane"
exec 9>"$cache_root/control-plane/.lock"
flock 9
reuse_if_built

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is needed to build the control plane from Go modules (none on PATH)" >&2
  exit 1
fi

echo "building ${binaries[*]} (Kubernetes ${version}) into ${out}" >&2
echo "(first build compiles Kubernetes from source; this takes many minutes)" >&2
tmp="$(mktemp -d "${cache_root}/control-plane/.build-XXXXXX")"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT

minor="${version#v1.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
ldflags="-s -w -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=${version}"

cd "$here"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath"
start=$SECONDS
for target in k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl ./etcd; do
  name="$(basename "$target")"
  echo "  go build ${name} ..." >&2
  go build -ldflags "$ldflags" -o "$tmp/$name" "$target"
  echo "  built ${name} ($((SECONDS - start))s so far)" >&2
done
echo "  go build kube-rbac-proxy ..." >&2
(cd "$proxy_dir" && go build -ldflags "-s -w" -o "$tmp/kube-rbac-proxy" github.com/brancz/kube-rbac-proxy/cmd/kube-rbac-proxy)
echo "  built kube-rbac-proxy ($((SECONDS - start))s so far)" >&2
echo "  go build helm ..." >&2
(cd "$helm_dir" && go build -ldflags "-s -w" -o "$tmp/helm" helm.sh/helm/v4/cmd/helm)
echo "  built helm ($((SECONDS - start))s so far)" >&2
mkdir -p "$(dirname "$out")"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "done in $((SECONDS - start))s" >&2
echo "$out"
