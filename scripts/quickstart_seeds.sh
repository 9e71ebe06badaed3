#!/usr/bin/env bash
# Run the quickstart for several seeds and print the tables of their reports: the multi-turn
# domains' episode stats (turns, tool calls, invalid calls, success; mean over seeds), then the
# accuracies (mean and min of every column, and the targets each seed misses). A seed's stages are
# cached in DIR/seed_S, so a re-run only runs what is missing.
#   bash scripts/quickstart_seeds.sh                              # seeds 0-4 into runs/quickstart_seeds
#   SEEDS="0 1" OUT=runs/qs bash scripts/quickstart_seeds.sh trainer.lr=1e-3
#   TARGET=0.85 OUT=runs/qs_sampled bash scripts/quickstart_seeds.sh objective.kind=sampled ...
# Extra key=value arguments go to every seed's `mopd quickstart`. Exit status 1 if a seed misses
# a target (TARGET: the normalised-score target, default 0.90).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2 3 4"}
OUT=${OUT:-runs/quickstart_seeds}
MOPD=${MOPD:-.venv/bin/mopd}
PY=${PY:-.venv/bin/python}
for s in $SEEDS; do
  echo "=== seed $s -> $OUT/seed_$s"
  start=$(date +%s)
  "$MOPD" quickstart --output-dir "$OUT/seed_$s" "seed=$s" "run.seed=$s" "$@"
  echo "=== seed $s: $(( $(date +%s) - start )) s"
done
"$PY" -m mopd.app.quickstart "$OUT" $SEEDS  # the multi-turn domains' episodes: turns, tool calls, ...
"$PY" -m mopd.app.report "$OUT" $SEEDS --normalized "${TARGET:-0.90}"
