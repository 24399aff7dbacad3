#!/usr/bin/env bash
# The job queue's benchmark ([9/11]; not part of `cargo test`), release build, on this machine:
# 1. the drain rate: `JOBS` no-op jobs (default 10,000) enqueued, then drained by the default
#    worker count (bench/jobs.rs), DRAINS times (default 3: single runs vary);
# 2. what the enqueue costs a write: task creates (each enqueues its workspace's coalesced
#    `metrics.rebuild` in its transaction) against the same build with
#    METRICS_REBUILD_ON_WRITE=false, and with the enqueue but no workers (JOBS_WORKERS=0: the
#    queued rebuild never runs, so every enqueue asks Postgres: the insert's worst case, without
#    the rebuilds' work), alternating, ROUNDS rounds (default 5), memory mode.
# Postgres: $DATABASE_URL, or the dev service. The creates go to a workspace of a user the run
# registers, and the workspace is deleted after.
#
# Usage: [JOBS=10000] [DRAINS=3] [ROUNDS=5] bench/jobs.sh [seconds per slot, default 8] [connections, default 16]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-8}
CONNECTIONS=${2:-16}
ROUNDS=${ROUNDS:-5}
DRAINS=${DRAINS:-3}

source bench/lib.sh
need wrk wrk
need curl curl

cargo build --release --quiet --bin nestling --example jobs
BIN=target/release/nestling
WORK=$(mktemp -d)
APP_PID=""
cleanup() {
  [ -z "$APP_PID" ] || kill "$APP_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== drain, $DRAINS runs"
for _ in $(seq "$DRAINS"); do RUST_LOG=warn target/release/examples/jobs "${JOBS:-10000}"; done

PORT=$(free_port)
BASE="http://127.0.0.1:$PORT"
start_app() {
  env APP_PORT="$PORT" RUST_LOG=error REDIS_ENABLED=false REDIS_URL= RATE_LIMIT_API=1000000000/1h \
    "$@" "$BIN" >"$WORK/app.log" 2>&1 &
  APP_PID=$!
  for _ in $(seq 1000); do
    curl -sf "$BASE/health/live" >/dev/null && return
    sleep 0.01
  done
  echo "the app did not start:" >&2; cat "$WORK/app.log" >&2; exit 1
}
stop_app() { kill "$APP_PID"; wait "$APP_PID" 2>/dev/null || true; APP_PID=""; }

# A user of its own with a workspace, a project and a task (bench/load.sh loads its first project).
EMAIL="bench-jobs-$(date +%s%N)@nestling.dev"
PASSWORD=bench-jobs-password
json=(-H 'content-type: application/json')
start_app
curl -sf "$BASE/api/auth/register" "${json[@]}" -d "{\"email\":\"$EMAIL\",\"password\":\"$PASSWORD\",\"name\":\"bench\"}" >/dev/null
TOKEN=$(curl -sf "$BASE/api/auth/login" "${json[@]}" -d "{\"email\":\"$EMAIL\",\"password\":\"$PASSWORD\"}" |
  sed -E 's/.*"token":"([^"]+)".*/\1/')
auth=(-H "authorization: Bearer $TOKEN")
WORKSPACE=$(curl -sf "$BASE/api/workspaces" "${auth[@]}" "${json[@]}" -d '{"name":"bench jobs"}' | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
PROJECT=$(curl -sf "$BASE/api/workspaces/$WORKSPACE/projects" "${auth[@]}" "${json[@]}" -d '{"name":"bench"}' | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
curl -sf "$BASE/api/projects/$PROJECT/tasks" "${auth[@]}" "${json[@]}" -d '{"title":"first"}' >/dev/null
stop_app

echo "== task create, with and without its metrics.rebuild enqueue (${DURATION}s, $CONNECTIONS connections, $ROUNDS rounds)"
# Three sides per round: the default (enqueue; the rebuilds the creates cause run in the slot),
# no enqueue, and the enqueue with no workers (every enqueue a round trip; no rebuilds).
printf 'round\tside\treq/s\tp99 (ms)\tfailed\n'
for round in $(seq "$ROUNDS"); do
  for side in enqueue none enqueue-no-workers; do
    case $side in
      enqueue) vars=(METRICS_REBUILD_ON_WRITE=true) ;;
      none) vars=(METRICS_REBUILD_ON_WRITE=false) ;;
      enqueue-no-workers) vars=(METRICS_REBUILD_ON_WRITE=true JOBS_WORKERS=0) ;;
    esac
    start_app "${vars[@]}"
    LOAD_EMAIL=$EMAIL LOAD_PASSWORD=$PASSWORD LOAD_SCENARIOS=create \
      bench/load.sh "$BASE" "$DURATION" "$CONNECTIONS" >"$WORK/load.txt"
    awk -F'\t' -v round="$round" -v side="$side" \
      '$1 == "task create" { printf "%s\t%s\t%s\t%s\t%s\n", round, side, $2, $4, $6 }' "$WORK/load.txt" |
      tee -a "$WORK/rows.tsv"
    stop_app
  done
done

start_app
curl -sf -X DELETE "$BASE/api/workspaces/$WORKSPACE" "${auth[@]}" >/dev/null || echo "could not delete the bench workspace $WORKSPACE" >&2
stop_app

# Per side: the median req/s and p99, and its req/s against "none" per round.
awk -F'\t' '
  function median(list, n,   copy, i, j, t) {
    for (i = 1; i <= n; i++) copy[i] = list[i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (copy[j] < copy[i]) { t = copy[i]; copy[i] = copy[j]; copy[j] = t }
    return n % 2 ? copy[(n + 1) / 2] : (copy[n / 2] + copy[n / 2 + 1]) / 2
  }
  { n[$2]++; rps[$2, n[$2]] = $3 + 0; p99[$2, n[$2]] = $4 + 0; failed += $5 }
  END {
    split("enqueue none enqueue-no-workers", sides, " ")
    for (s = 1; s <= 3; s++) {
      side = sides[s]
      for (i = 1; i <= n[side]; i++) { r[i] = rps[side, i]; p[i] = p99[side, i]; q[i] = 100 * rps[side, i] / rps["none", i] }
      printf "%-19s median %5.0f req/s, p99 %5.1f ms, %5.1f %% of none (rounds:", side, median(r, n[side]), median(p, n[side]), median(q, n[side])
      for (i = 1; i <= n[side]; i++) printf " %.0f", q[i]
      printf ")\n"
    }
    printf "failed requests: %d\n", failed
  }' "$WORK/rows.tsv"
