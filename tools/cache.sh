# Sourced by the scripts that build or fetch a tool from the Go module proxy into a cache outside
# the repository (promtool/build.sh, kstatus/build.sh, cert-manager/crds.sh).
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)

# cached NAME KEY FILE WHAT: prints the directory $cache_root/NAME/KEY once it holds FILE. If it
# does not yet, runs the caller's `produce DIR` under a lock (concurrent callers wait and reuse
# its result) into a fresh directory, moves that into place and prints it. WHAT completes "the Go
# toolchain is needed to ..." when there is no Go.
cached() {
  local name=$1 key=$2 file=$3 what=$4
  local cache_root="${SEINODE_TLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seinode-tls}"
  local out="$cache_root/$name/$key"
  if [[ -e "$out/$file" ]]; then
    echo "$out"
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "error: the Go toolchain is needed to $what from the Go module proxy" >&2
    return 1
  fi
  mkdir -p "$cache_root/$name"
  exec 9>"$cache_root/$name/.lock"
  flock 9
  if [[ -e "$out/$file" ]]; then
    echo "$out"
    return 0
  fi
  tmp="$(mktemp -d "$cache_root/$name/.build-XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  chmod 755 "$tmp"
  produce "$tmp"
  rm -rf "$out"
  mv "$tmp" "$out"
  trap - EXIT
  echo "$out"
}
