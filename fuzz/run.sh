#!/usr/bin/env bash
# Builds the fuzz targets, then runs each for SECONDS (default 60), one after the other, and
# prints per target: executions, time, exec/s, coverage and whether it found a crash. Exits 1
# when any target found one (its reproducer is in fuzz/artifacts/<target>/), 2 when the build
# fails.
#
#     fuzz/run.sh [SECONDS]          FUZZ_TARGETS="manifest_reader" fuzz/run.sh 300
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). The
# committed seeds in fuzz/corpus/<target>/ are only read; what a run adds goes to
# fuzz/work/<target>/ (ignored by git, kept between runs), with the full libFuzzer log in
# fuzz/work/<target>.log. Honours CARGO_TARGET_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
read -r -a targets <<<"${FUZZ_TARGETS:-admission_review secret_inspection manifest_reader}"

echo "building ${targets[*]}" >&2
if ! cargo +nightly fuzz build >&2; then
  echo "the fuzz build failed" >&2
  exit 2
fi

found=0
printf '%-18s %12s %7s %9s %8s %8s %7s  %s\n' target runs time exec/s cov features corpus result
for target in "${targets[@]}"; do
  work="fuzz/work/$target"
  log="fuzz/work/$target.log"
  mkdir -p "$work" "fuzz/artifacts/$target"
  dict=()
  [[ -f "fuzz/dict/$target.dict" ]] && dict=("-dict=fuzz/dict/$target.dict")
  started=$SECONDS
  # A hang over 10 s or over 2 GiB of memory is a finding too.
  cargo +nightly fuzz run "$target" "$work" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${dict[@]}" >"$log" 2>&1
  status=$?
  elapsed=$((SECONDS - started))

  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
  # The last status line: "#123 DONE cov: 4567 ft: 8910 corp: 120/30Kb ...".
  last="$(grep -E '^#[0-9]+' "$log" | tail -1)"
  cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
  features="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
  corpus="$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")"
  if [[ $status -eq 0 ]]; then
    result="no crash"
  else
    found=1
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
    result="CRASH (exit $status) ${artifact:-see $log}"
  fi
  printf '%-18s %12s %6ss %9s %8s %8s %7s  %s\n' "$target" "${runs:-?}" "$elapsed" \
    "${rate:-?}" "${cov:-?}" "${features:-?}" "${corpus:-?}" "$result"
done
exit "$found"
