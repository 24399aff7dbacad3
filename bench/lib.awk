# Helpers the bench scripts share (awk -f bench/lib.awk -f <program>).
# wrk's latencies ("850.00us", "1.20ms", "2.00s") in milliseconds.
function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
# Splits space-separated numbers into arr, in ascending order; returns how many there are.
function sorted(list, arr,   n, i, j, t) {
  n = split(list, arr, " ")
  for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (arr[j] + 0 < arr[i] + 0) { t = arr[i]; arr[i] = arr[j]; arr[j] = t }
  return n
}
# The median of space-separated numbers.
function median(list,   n, arr) {
  n = sorted(list, arr)
  return (n % 2) ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
}
# The q-quantile (0..1) of space-separated numbers, by the nearest rank.
function quantile(list, q,   n, arr, k) {
  n = sorted(list, arr)
  k = int(q * n + 0.5); if (k < 1) k = 1; if (k > n) k = n
  return arr[k]
}
# A target's outcome, as the summaries print it.
function verdict(holds) { return holds ? "holds" : "does not hold" }
# One row of the table BENCHMARKS.md opens with (bench/run.sh prints it last), appended to the
# file `head` names: scenario, what is measured, nestling, yardstick (name: figure), ratio, target,
# outcome.
function head_row(scenario, measure, ours, yardstick, ratio, target, holds) {
  printf "| %s | %s | %s | %s | %s | %s | %s |\n", scenario, measure, ours, yardstick, ratio, target, holds >> head
}
