#!/usr/bin/env bash
# Coverage-guided fuzzing of lazypull's parsers (fuzz/, cargo-fuzz and
# libFuzzer; fuzz/README.md says what each target covers):
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]   (default: 60 s, every target)
#   bash scripts/fuzz.sh --setup                 (only install cargo-fuzz)
#
# Installs cargo-fuzz when it is missing, builds every target once (release,
# debug assertions and overflow checks on, AddressSanitizer), then runs each
# for SECONDS from its seed corpus (fuzz/corpus/<target>), copied to a
# scratch directory outside the clone so that runs never write into the
# repository; FUZZ_JOBS targets at a time (default: the number of cores).
# Prints one line per target with its executions (stderr), then a JSON
# summary and an "N passed, N failed" line (stdout). Exits non-zero, naming the target and the crash file, if any
# target crashes (panic, overflow, timeout of a single input, out of memory);
# the scratch directory is then kept, and the crash file is the input to
# replay with the target's binary.
#
# Stable Rust: cargo-fuzz passes -Zsanitizer=address and friends, which
# RUSTC_BOOTSTRAP=1 unlocks on a stable toolchain; nothing else needs nightly.
# Build outputs go to $CARGO_TARGET_DIR (default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
log() { echo "fuzz: $*" >&2; }
die() {
	log "$*"
	exit 1
}

ensure_cargo_fuzz() {
	if cargo fuzz --version >/dev/null 2>&1; then
		return
	fi
	log "cargo-fuzz is missing: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
	cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" >&2 ||
		die "installing cargo-fuzz failed (it is needed to build the fuzz targets)"
	cargo fuzz --version >/dev/null 2>&1 ||
		die "cargo-fuzz was installed but 'cargo fuzz' does not run (is ~/.cargo/bin on PATH?)"
}

if [ "${1:-}" = "--setup" ]; then
	ensure_cargo_fuzz
	exit 0
fi

secs=${1:-60}
[[ "$secs" =~ ^[0-9]+$ ]] && [ "$secs" -gt 0 ] || die "SECONDS must be a positive integer, not '$secs'"
shift || true
all=()
for f in fuzz/fuzz_targets/*.rs; do
	all+=("$(basename "$f" .rs)")
done
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
	[ -f "fuzz/fuzz_targets/$t.rs" ] || die "no fuzz target '$t' (there are: ${all[*]})"
	[ -d "fuzz/corpus/$t" ] || die "fuzz target '$t' has no seed corpus fuzz/corpus/$t"
done
jobs=${FUZZ_JOBS:-$(nproc)}
command -v python3 >/dev/null || die "python3 is needed for the summary"

ensure_cargo_fuzz
export RUSTC_BOOTSTRAP=1
target_dir=${CARGO_TARGET_DIR:-$PWD/fuzz/target}
triple=$(rustc -vV | sed -n 's/^host: //p')
log "building ${#targets[@]} targets (release, debug assertions, ASan) into $target_dir"
t0=$(date +%s)
build=(cargo fuzz build --release --debug-assertions --target "$triple" --target-dir "$target_dir")
if [ ${#targets[@]} -eq ${#all[@]} ]; then
	"${build[@]}" >&2 || die "building the fuzz targets failed"
else
	for t in "${targets[@]}"; do
		"${build[@]}" "$t" >&2 || die "building fuzz target $t failed"
	done
fi
build_secs=$(($(date +%s) - t0))
log "built in ${build_secs}s"
bin_dir="$target_dir/$triple/release"

# Scratch space outside the clone: on tmpfs where there is one (the
# targets' own files, e.g. extracted tar layers, go there too, via TMPDIR).
base=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
scratch=$(mktemp -d "$base/lazypull-fuzz.XXXXXX")
keep=0
trap '[ "$keep" = 1 ] || rm -rf "$scratch"' EXIT

run_one() {
	local t=$1 dir="$scratch/$1"
	mkdir -p "$dir/corpus" "$dir/artifacts" "$dir/tmp"
	cp -r "fuzz/corpus/$t/." "$dir/corpus/"
	local start rc=0
	start=$(date +%s)
	# -rss_limit_mb: a target that needs more than 2 GiB for some input is a
	# bug (the parsers bound what they allocate by the input's size);
	# -timeout: one input taking 10 s is a hang.
	TMPDIR="$dir/tmp" "$bin_dir/$t" \
		-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$dir/artifacts/" \
		"$dir/corpus" >"$dir/log" 2>&1 || rc=$?
	echo "$rc $(($(date +%s) - start))" >"$dir/result"
}

log "running each target for ${secs}s, $jobs at a time; scratch $scratch"
running=0
for t in "${targets[@]}"; do
	if [ "$running" -ge "$jobs" ]; then
		wait -n || true
		running=$((running - 1))
	fi
	run_one "$t" &
	running=$((running + 1))
done
wait

failed=()
rows=()
for t in "${targets[@]}"; do
	dir="$scratch/$t"
	read -r rc took <"$dir/result"
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
	crash=$(find "$dir/artifacts" -type f | head -1)
	status=ok
	if [ "$rc" != 0 ] || [ -n "$crash" ] || [ -z "$execs" ]; then
		status=failed
		failed+=("$t")
	fi
	printf 'fuzz: %-20s %-6s %12s executions in %ss\n' "$t" "$status" "${execs:-?}" "$took" >&2
	rows+=("$t|$status|${execs:-0}|$took|$rc|$crash|$dir/log")
done

python3 - "$secs" "$build_secs" "$jobs" "${rows[@]}" <<'PY'
import json
import sys

secs, build, jobs, rows = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
targets = []
for r in rows:
    name, status, execs, took, rc, crash, log = r.split("|")
    t = {"target": name, "status": status, "executions": int(execs), "seconds": int(took)}
    if status != "ok":
        t.update({"exit_code": int(rc), "crash_file": crash or None, "log": log})
    targets.append(t)
print(json.dumps({"seconds_per_target": secs, "build_seconds": build, "jobs": jobs, "targets": targets}, indent=2))
PY
# The plain closing line CI reads: one "test" per target.
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"

if [ ${#failed[@]} -gt 0 ]; then
	keep=1
	for t in "${failed[@]}"; do
		dir="$scratch/$t"
		crash=$(find "$dir/artifacts" -type f | head -1)
		log "FAILED: target $t, crash file ${crash:-none (see the log)}, log $dir/log:"
		grep -E -m1 -A12 "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY" "$dir/log" >&2 || tail -20 "$dir/log" >&2
		log "replay: RUSTC_BOOTSTRAP=1 cargo fuzz run $t ${crash:-}   (or: $bin_dir/$t ${crash:-})"
	done
	exit 1
fi
