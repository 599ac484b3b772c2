#!/bin/bash
# The committed tables and charts of the coco_subset experiment, from its finished runs (the workflow's
# results/coco_subset/): the full table (coco_results.md/.json, as `snakemake ... all` wrote it) and one chart of
# learning curves per group of rows, so that no chart carries all 19 lines. Arguments are passed to `sp table`
# (e.g. --allow-mixed: a row whose seeds ran different code versions is refused otherwise).
set -euo pipefail
TABLE_FLAGS=("$@")
cd "$(dirname "$0")/.."  # the repository root; needs `sp` on PATH (the project venv)
RES=results/coco_subset
cp $RES/results.md experiments/coco_results.md
cp $RES/results.json experiments/coco_results.json

CONFIG="import yaml; config = yaml.safe_load(open('experiments/coco_subset.yaml'))"
SEEDS=$(python -c "$CONFIG; print(*config['seeds'])")
curves() {  # curves OUT ROW...: the learning curves of these rows (every seed) -> experiments/OUT.png
  local out=$1 E="" N="" M="" r s; shift
  for r in "$@"; do for s in $SEEDS; do
    E="$E $RES/finetune/$r/seed$s/eval.json"; N="$N,$r"; M="$M --metrics $RES/finetune/$r/seed$s/metrics.jsonl"
  done; done
  sp table $E --names ${N#,} $M --decimals 2 --out $RES/$out "${TABLE_FLAGS[@]}" > /dev/null
  cp $RES/${out}_curves.png experiments/$out.png
}
# the class-agnostic rows on all 310 labeled photos (no `percent`)
MAIN=$(python -c "$CONFIG; print(*(r['name'] for r in config['finetune_runs'] if r.get('class_agnostic') and not r.get('percent')))")
curves coco_curves $MAIN
curves coco_curves_budget knet_scratch knet_sp_cosine maskrcnn knet_scratch_30pct knet_sp_cosine_30pct maskrcnn_30pct
