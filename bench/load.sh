#!/usr/bin/env bash
# Load test for a running nestling anywhere (staging, the compose topology, two local instances):
# logs in, then runs wrk against the cached task list (GET /api/projects/{id}/tasks?limit=20) and
# a 90 % read / 10 % write mix (PATCH of one task's priority), and prints req/s, p50, p99, the
# requests the rate limit refused (429: raise RATE_LIMIT_API to load past it) and the failed
# ones (other 4xx, 5xx, socket errors) per scenario. LOAD_SCENARIOS=create (not run by default:
# it adds rows) loads task creation alone (POST /api/projects/{id}/tasks: the row, its event, the
# invalidations). Several base URLs (comma-separated) are loaded at once, the
# connections split between them: req/s are summed, latencies are the slowest instance's.
#
# Usage: bench/load.sh BASE_URL[,BASE_URL...] [seconds, default 10] [connections, default 16]
# Logs in as LOAD_EMAIL / LOAD_PASSWORD (default: the demo user `nestling seed` creates), and
# loads that user's first project. The mix writes to its first task.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
IFS=, read -r -a BASES <<<"${1:?usage: bench/load.sh BASE_URL[,BASE_URL...] [seconds] [connections]}"
DURATION=${2:-10}
CONNECTIONS=${3:-16}
EMAIL=${LOAD_EMAIL:-demo@nestling.dev}
PASSWORD=${LOAD_PASSWORD:-demo-password}

source "$BENCH/lib.sh"
need curl curl
need wrk wrk

BASE=${BASES[0]}
# Not -f: a refused login (wrong password, 429 from the login limit) is reported, not silent.
LOGIN=$(curl -s -X POST "$BASE/api/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$EMAIL\",\"password\":\"$PASSWORD\"}")
TOKEN=$(sed -nE 's/.*"token":"([^"]+)".*/\1/p' <<<"$LOGIN")
[ -n "$TOKEN" ] || { echo "load test: cannot log in as $EMAIL at $BASE: $LOGIN" >&2; exit 1; }
auth=(-H "authorization: Bearer $TOKEN")
WORKSPACE=$(curl -sf "$BASE/api/workspaces" "${auth[@]}" | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
PROJECT=$(curl -sf "$BASE/api/workspaces/$WORKSPACE/projects" "${auth[@]}" | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
LIST="/api/projects/$PROJECT/tasks?limit=20"
TASK=$(curl -sf "$BASE$LIST" "${auth[@]}" | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
[ -n "$TASK" ] || { echo "load test: $EMAIL has no project with a task to load" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# One script for both scenarios ("-- mix" adds the writes); it counts 429s apart from failures.
cat >"$WORK/load.lua" <<LUA
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) mix = args[1] == "mix"; create = args[1] == "create"; n = 0; limited = 0; failed = 0 end
request = function()
  n = n + 1
  if create then
    return wrk.format("POST", "/api/projects/$PROJECT/tasks", {["Authorization"] = "Bearer $TOKEN", ["Content-Type"] = "application/json"}, string.format('{"title":"load %d"}', n))
  end
  if mix and n % 10 == 0 then
    local body = string.format('{"priority":"%s"}', (n % 20 == 0) and "high" or "low")
    return wrk.format("PATCH", "/api/tasks/$TASK", {["Authorization"] = "Bearer $TOKEN", ["Content-Type"] = "application/json"}, body)
  end
  return wrk.format("GET", "$LIST", {["Authorization"] = "Bearer $TOKEN"})
end
function response(status) if status == 429 then limited = limited + 1 elseif status >= 400 then failed = failed + 1 end end
function done()
  local l, f = 0, 0
  for _, t in ipairs(threads) do l = l + t:get("limited"); f = f + t:get("failed") end
  io.write(string.format("answered: limited %d failed %d\n", l, f))
end
LUA

per_instance=$(( (CONNECTIONS + ${#BASES[@]} - 1) / ${#BASES[@]} ))
threads=$(( per_instance < 2 ? 1 : 2 ))
# One wrk per base URL at the same time: req/s and answers summed, latencies the worst.
measure() { # name [script args...]
  local name=$1; shift
  local i
  for i in "${!BASES[@]}"; do
    wrk -t"$threads" -c"$per_instance" -d"${DURATION}s" --latency -s "$WORK/load.lua" "${BASES[$i]}$LIST" -- "$@" >"$WORK/wrk-$i.txt" &
  done
  wait
  cat "$WORK"/wrk-*.txt | awk -v name="$name" -f "$BENCH/lib.awk" -f <(echo '
    /Requests\/sec/ { rps += $2 }
    $1 == "50%" { if (ms($2) > p50) p50 = ms($2) }
    $1 == "99%" { if (ms($2) > p99) p99 = ms($2) }
    /^answered:/ { limited += $3; failed += $5 }
    /Socket errors/ { failed += $4 + $6 + $8 + $10 }
    END { printf "%s\t%.0f\t%.2f\t%.2f\t%d\t%d\n", name, rps, p50, p99, limited, failed }') | tee -a "$WORK/rows.tsv"
  rm -f "$WORK"/wrk-*.txt
}

for base in "${BASES[@]}"; do
  for _ in 1 2 3; do curl -sf "$base$LIST" "${auth[@]}" >/dev/null; done
done
echo "load: ${BASES[*]}; ${DURATION}s, $CONNECTIONS connections"
printf 'scenario\treq/s\tp50 (ms)\tp99 (ms)\t429\tfailed\n'
# LOAD_SCENARIOS picks some: "get", "mix" (default both), "create".
for scenario in ${LOAD_SCENARIOS:-get mix}; do
  case $scenario in
    get) measure "cached GET" get ;;
    mix) measure "90% read / 10% write" mix ;;
    create) measure "task create" create ;;
    *) echo "load test: unknown scenario $scenario" >&2; exit 1 ;;
  esac
done
echo "failed requests: $(awk -F'\t' '{ failed += $6 } END { print failed + 0 }' "$WORK/rows.tsv")"
