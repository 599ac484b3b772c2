#!/bin/bash
# The fine-tuning table of the coco_subset runs that have finished (eval.json present), in the config's row
# order: experiments/coco_results.json, coco_curves.png and the tables of experiments/README.md come from it.
# The workflow's own results/coco_subset/results.md appears once every row has run.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root; needs `sp` on PATH (the project venv)
R=results/coco_subset/finetune; E=""; N=""; M=""
ROWS=$(python -c "import yaml; print(*(r['name'] for r in yaml.safe_load(open('experiments/coco_subset.yaml'))['finetune_runs']))")
for r in $ROWS; do
  for s in 0 1 2; do f=$R/$r/seed$s/eval.json; [ -f $f ] || continue; E="$E $f"; N="$N,$r"; M="$M --metrics $R/$r/seed$s/metrics.jsonl"; done
done
# the two stores' settings hashes (results/coco_subset/stores/), as the workflow names them
sp table $E --names ${N#,} $M --early-epochs 1 --early-epochs 2 --early-epochs 4 --decimals 2 --out results/coco_subset/results_so_far \
  --pseudo-masks saliency=results/coco_subset/stores/923865665858.quality.json --pseudo-masks random_proposals=results/coco_subset/stores/9560965e062c.quality.json
