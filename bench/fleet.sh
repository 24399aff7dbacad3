#!/usr/bin/env bash
# The two-instance topology next to one instance, in the same run (not part of `cargo test`):
# release build, its own redis-server, two instances with Redis on, and bench/load.sh (wrk) on
# loopback, its connections split between the instances. Scenarios, each for the cached GET and
# the 90 % read / 10 % write mix:
#   one instance            all connections on instance A
#   two instances           half on A, half on B
#   two, rollback mid-run   as above; halfway through, one fleet-wide switch to memory-synced
#                           (POST /admin/cache/mode {"redis":false,"scope":"fleet"}), then back on
#   two, memory-synced      after the rollback: L1 only, invalidations through Redis
# Every scenario runs once per round, the rounds are interleaved, and medians are reported.
#
# Usage: bench/fleet.sh [seconds per run, default 10] [connections, default 64] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNECTIONS=${2:-64}
ROUNDS=${3:-3}

source bench/lib.sh
need redis-server redis-server
need curl curl

cargo build --release --quiet --bin nestling
BIN=target/release/nestling
WORK=$(mktemp -d)
REDIS_PORT=$(free_port)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --logfile "$WORK/redis.log" &
PIDS+=("$!")
"$BIN" seed >/dev/null 2>&1 || RUST_LOG=info "$BIN" seed

ADMIN_TOKEN=bench-admin
# Every load.sh run logs in once: the login limits are raised, as the API's is, not measured here.
start_instance() { # port
  env APP_PORT="$1" RUST_LOG=error REDIS_ENABLED=true REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
    ADMIN_TOKEN="$ADMIN_TOKEN" APP_INSTANCES=2 RATE_LIMIT_API=1000000000/1h \
    RATE_LIMIT_AUTH_EMAIL=1000000/1h RATE_LIMIT_AUTH_IP=1000000/1h "$BIN" >"$WORK/app-$1.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$1/health/live" >/dev/null && return; sleep 0.05; done
  echo "an instance did not start:" >&2; cat "$WORK/app-$1.log" >&2; exit 1
}
A=http://127.0.0.1:$(free_port | tee "$WORK/a")
start_instance "$(cat "$WORK/a")"
B=http://127.0.0.1:$(free_port | tee "$WORK/b")
start_instance "$(cat "$WORK/b")"

switch() { # base body
  curl -sf -X POST "$1/admin/cache/mode" -H "authorization: Bearer $ADMIN_TOKEN" \
    -H 'content-type: application/json' -d "$2" >/dev/null
}
RESULTS="$WORK/results.tsv"
# One scenario of bench/load.sh on the bases, its rows labelled and kept.
load() { # label bases scenario
  LOAD_SCENARIOS=$3 bench/load.sh "$2" "$DURATION" "$CONNECTIONS" |
    awk -F'\t' -v label="$1" -v round="$ROUND" 'NR > 2 && NF == 6 { print round "\t" label ", " $1 "\t" $2 "\t" $3 "\t" $4 "\t" $6 }' |
    tee -a "$RESULTS"
}
measure() { # label bases
  local scenario
  for scenario in get mix; do load "$1" "$2" "$scenario"; done
}
rollback_midway() {
  local scenario switcher
  for scenario in get mix; do
    switch "$A" '{"redis":true,"scope":"fleet"}'
    { sleep "$((DURATION / 2))"; switch "$A" '{"redis":false,"scope":"fleet"}'; } &
    switcher=$!
    load "two, rollback mid-run" "$A,$B" "$scenario"
    wait "$switcher"
  done
}

printf 'round\tscenario\treq/s\tp50\tp99\tfailed\n'
for ROUND in $(seq "$ROUNDS"); do
  switch "$A" '{"redis":true,"scope":"fleet"}'
  measure "one instance" "$A"
  measure "two instances" "$A,$B"
  rollback_midway
  measure "two, memory-synced" "$A,$B"
done

echo
echo "Medians over $ROUNDS rounds; $CONNECTIONS connections (split between the instances), ${DURATION}s per run; $(nproc) cores"
awk -F'\t' -f bench/lib.awk -f <(echo '
  !($2 in seen) { seen[$2] = 1; order[++count] = $2 }
  { rps[$2] = rps[$2] " " $3; p50[$2] = p50[$2] " " $4; p99[$2] = p99[$2] " " $5; failed[$2] += $6 }
  END {
    printf "| scenario | req/s | p50 (ms) | p99 (ms) | failed |\n| --- | ---: | ---: | ---: | ---: |\n"
    for (i = 1; i <= count; i++) {
      s = order[i]
      printf "| %s | %.0f | %.2f | %.2f | %d |\n", s, median(rps[s]), median(p50[s]), median(p99[s]), failed[s]
    }
  }') "$RESULTS"
