#!/usr/bin/env bash
# Benchmarks the policy filesystem against the native filesystem in the same run.
#
#   crates/fs/bench/fs.sh [WORKDIR]        (root, /dev/fuse; builds the `mount` example)
#
# Each workload runs on a warm cache, 3 times, and the median wall time is reported for:
# native (pinned to CPU 0), FUSE unpinned (daemon and client free to run on any CPU), and
# FUSE pinned (daemon and client both on CPU 0 with taskset: a cross-CPU wake-up costs ~70 us
# on these machines). Rules: full-access and read-only (git cannot refresh its index there, so
# `git status` re-reads every file).
# Mounts use a 1 s TTL (what a mount without invalidation would need) and the default 60 s
# (changes made through the server are invalidated explicitly).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
WORK=${1:-$(mktemp -d /tmp/agentfense-bench.XXXXXX)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fs}
cargo build -q --release -p agentfense-fs --example mount --manifest-path "$ROOT/Cargo.toml"
BIN=$CARGO_TARGET_DIR/release/examples/mount

mkdir -p "$WORK/lower/output" "$WORK/mnt"
L=$WORK/lower
if [ ! -f "$L/big" ]; then
  echo "creating test data in $WORK" >&2
  head -c 1G /dev/urandom > "$L/big"
  python3 - "$L" <<'PY'
import os, sys
root = sys.argv[1]
for i in range(50000):
    d = os.path.join(root, "many", "d%03d" % (i // 500))
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "f%05d" % i), "w").write("x")
for i in range(10000):
    d = os.path.join(root, "repo", "src", "m%02d" % (i // 200))
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "file%05d.rs" % i), "w").write(("fn f%d() { let needle = 0; }\n" % i) * 20)
PY
  git -C "$L/repo" init -q && git -C "$L/repo" add -A \
    && git -C "$L/repo" -c user.name=b -c user.email=b@b commit -qm init
fi

median() { sort -n | sed -n 2p; }
t() { # t DIR CPUS CMD: median of 3 runs of CMD in DIR on CPUS (after one warm-up run)
  local dir=$1 cpus=$2 cmd=$3
  (cd "$dir" && taskset -c "$cpus" sh -c "$cmd" >/dev/null 2>&1) || true
  for _ in 1 2 3; do
    local s e
    s=$(date +%s.%N)
    (cd "$dir" && taskset -c "$cpus" sh -c "$cmd" >/dev/null 2>&1) || true
    e=$(date +%s.%N)
    echo "$e - $s" | bc
  done | median
}

WORKLOADS=(
  "read 1 GiB|cat big"
  "find+stat 50k|find many -printf '%s %m\n'"
  "grep -r 10k|grep -r needle repo/src"
  "git status 10k|git -C repo status --porcelain"
  "write 1 GiB|dd if=/dev/zero of=output/big.out bs=1M count=1024 && rm -f output/big.out"
)

run_mounted() { # run_mounted LABEL TTL CPUS PRESET
  local label=$1 ttl=$2 cpus=$3 preset=$4
  rm -rf "$WORK/delta"
  coproc MNT { taskset -c "$cpus" "$BIN" "$L" "$WORK/delta" "$WORK/mnt" "$preset" "$ttl"; }
  read -r _ <&"${MNT[0]}"
  for w in "${WORKLOADS[@]}"; do
    local name=${w%%|*} cmd=${w#*|}
    if [ "$preset" = read-only ] && [[ $name == write* ]]; then continue; fi
    printf '%-16s %-28s %8.3f s\n' "$name" "$label" "$(t "$WORK/mnt" "$cpus" "$cmd")"
  done
  exec {MNT[1]}>&-
  wait "$MNT_PID" || true
}

echo "kernel $(uname -r), $(nproc) CPUs; median of 3 warm runs"
for w in "${WORKLOADS[@]}"; do
  name=${w%%|*} cmd=${w#*|}
  printf '%-16s %-28s %8.3f s\n' "$name" "native (cpu 0)" "$(t "$L" 0 "$cmd")"
done
ALL=0-$(($(nproc) - 1))
run_mounted "fuse ttl=1s unpinned" 1 "$ALL" full-access
run_mounted "fuse ttl=60s unpinned" 60 "$ALL" full-access
run_mounted "fuse ttl=60s pinned cpu0" 60 0 full-access
run_mounted "fuse ro ttl=60s unpinned" 60 "$ALL" read-only
run_mounted "fuse ro ttl=60s pinned cpu0" 60 0 read-only
