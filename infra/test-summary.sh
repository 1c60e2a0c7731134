#!/usr/bin/env bash
# Sums cargo test's per-binary results into one closing line: "N passed, N failed".
set -euo pipefail
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s; exit (f > 0 || p == 0) }' "$1"
