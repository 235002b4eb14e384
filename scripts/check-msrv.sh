#!/usr/bin/env bash
# Checks the declared minimum Rust version (`rust-version` in the workspace
# Cargo.toml) against what the build really needs, without a second toolchain:
#   - every workspace member declares it (`rust-version.workspace = true`), so
#     that clippy's `incompatible_msrv` lint (run by scripts/test.sh with
#     -D warnings) checks every crate's use of the standard library against it;
#   - no package in Cargo.lock declares a newer `rust-version` than ours;
#   - the toolchain at hand is not older than it.
# Fails with the offenders listed. Run from anywhere; needs cargo and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

meta=$(mktemp)
trap 'rm -f "$meta"' EXIT
cargo metadata --format-version 1 --locked >"$meta"
python3 - "$meta" "$(rustc --version)" <<'PY'
import json
import sys
import tomllib


def ver(s):
    parts = [int(p) for p in s.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


meta_path, rustc = sys.argv[1], sys.argv[2]
with open("Cargo.toml", "rb") as f:
    ours = tomllib.load(f)["workspace"]["package"].get("rust-version")
if not ours:
    sys.exit("check-msrv: the workspace Cargo.toml declares no rust-version")
with open(meta_path) as f:
    meta = json.load(f)
members = set(meta["workspace_members"])
problems = []
for p in sorted(meta["packages"], key=lambda p: (p["name"], p["version"])):
    name, version, rv = p["name"], p["version"], p.get("rust_version")
    if p["id"] in members:
        if rv is None or ver(rv) != ver(ours):
            problems.append(
                f"workspace member {name} declares rust-version {rv}, not the workspace's "
                f"{ours}: add `rust-version.workspace = true` to its Cargo.toml"
            )
    elif rv is not None and ver(rv) > ver(ours):
        problems.append(f"{name} {version} (in Cargo.lock) needs Rust {rv}")
have = rustc.split()[1].split("-")[0]
if ver(have) < ver(ours):
    problems.append(f"this toolchain ({rustc}) is older than rust-version {ours}")
if problems:
    print(f"check-msrv: rust-version {ours} does not hold:", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    sys.exit(1)
deps = [p for p in meta["packages"] if p["id"] not in members and p.get("rust_version")]
top = max(deps, key=lambda p: ver(p["rust_version"]))
print(
    f"check-msrv: rust-version {ours} holds: all {len(members)} workspace members declare it; "
    f"the most demanding locked dependency ({top['name']} {top['version']}) needs {top['rust_version']}",
    file=sys.stderr,
)
PY
