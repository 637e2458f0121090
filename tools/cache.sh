# Sourced by the scripts that build or fetch a tool from the Go module proxy into a cache outside
# the repository (promtool/build.sh, kstatus/build.sh, cert-manager/crds.sh).
#
#   SEINODE_TLS_CACHE_DIR   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/seinode-tls)

# cached NAME KEY FILE WHAT: prints the directory $cache_root/NAME/KEY once it holds FILE. If it
# does not yet, runs the caller's `produce DIR` in a subshell (its `cd` and `exit` stay there)
# under a lock (concurrent callers wait and reuse its result) into a fresh directory, checks that
# FILE is there, moves the directory into place and prints it. WHAT completes "the Go toolchain
# is needed to ..." when there is no Go. Call it as a script's last command: the lock is held
# until the script exits.
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
  mkdir -p "$cache_root/$name" || return 1
  # Absolute, so that nothing below depends on the working directory.
  cache_root="$(cd "$cache_root" && pwd)" || return 1
  out="$cache_root/$name/$key"
  exec 9>"$cache_root/$name/.lock"
  flock 9
  if [[ -e "$out/$file" ]]; then
    echo "$out"
    return 0
  fi
  # Global, not local: the EXIT trap reads it after this function has returned.
  _cache_tmp="$(mktemp -d "$cache_root/$name/.build-XXXXXX")" || return 1
  trap 'rm -rf "$_cache_tmp"' EXIT
  chmod 755 "$_cache_tmp"
  if ! (produce "$_cache_tmp"); then
    echo "error: could not $what" >&2
    return 1
  fi
  if [[ ! -e "$_cache_tmp/$file" ]]; then
    echo "error: $name: what was built has no $file" >&2
    return 1
  fi
  rm -rf "$out"
  mv "$_cache_tmp" "$out"
  trap - EXIT
  echo "$out"
}

# go_build DIR ARGS...: `go build ARGS` in the module DIR, for a binary that runs anywhere and
# is built alike everywhere: no cgo, the module's go.sum as it is, no local paths, stripped.
go_build() {
  local dir=$1
  shift
  (cd "$dir" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath" \
    go build -ldflags "-s -w" "$@")
}

# cache_key FILE...: a short digest of the files and of the caller's `produce` with the build
# above (its recipe: a changed flag or tag is a new build).
cache_key() {
  { cat "$@"; declare -f produce go_build; } | sha256sum | cut -c1-12
}
