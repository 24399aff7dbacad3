#!/usr/bin/env bash
# Draws the chart BENCHMARKS.md shows (gnuplot, SVG) from a run of bench/run.sh: per scenario,
# nestling's req/s and CPU per request beside its yardstick's, from a TSV of
# scenario, nestling req/s, yardstick req/s, nestling µs/req, yardstick µs/req.
# Usage: bench/chart.sh DATA.tsv OUT.svg
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need gnuplot gnuplot-nox
DATA=${1:?usage: bench/chart.sh DATA.tsv OUT.svg}
OUT=${2:?usage: bench/chart.sh DATA.tsv OUT.svg}
gnuplot <<GP
set terminal svg size 960,420 dynamic font "sans,12" background "white"
set output "$OUT"
set datafile separator "\t"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key outside bottom center horizontal
set grid ytics
set yrange [0:*]
set xtics noenhanced font ",11"
set multiplot layout 1,2 title "nestling beside its yardsticks: the same-response handler; for the users, the limiter off; for brotli, the uncompressed hit ($(date -u +%Y-%m-%d), $(nproc) cores, bench/run.sh)"
set title "requests per second (higher is better)"
plot "$DATA" using 2:xtic(1) title "nestling" linecolor rgb "#2b6cb0", \
     "" using 3 title "yardstick" linecolor rgb "#a0aec0"
set title "CPU per request, µs (lower is better)"
plot "$DATA" using 4:xtic(1) title "nestling" linecolor rgb "#2b6cb0", \
     "" using 5 title "yardstick" linecolor rgb "#a0aec0"
unset multiplot
GP
echo "chart: $OUT"
