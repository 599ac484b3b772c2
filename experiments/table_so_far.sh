#!/bin/bash
# The fine-tuning table of the coco_subset runs that have finished (eval.json present), in the config's row
# order: experiments/coco_results.json, coco_curves.png and the tables of experiments/README.md come from it.
# The workflow's own results/coco_subset/results.md appears once every row has run.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root; needs `sp` on PATH (the project venv)
R=results/coco_subset/finetune; E=""; N=""; M=""
for r in knet_scratch knet_pseudo_masks knet_sp_cosine knet_sp_sequential knet_sp_random knet_sp_no_kernel_loss knet_sp_random_proposals knet_pseudo_masks_random_proposals maskrcnn mask2former_scratch mask2former_sp_cosine queryinst_scratch queryinst_sp_cosine knet_scratch_30pct knet_sp_cosine_30pct maskrcnn_30pct knet_scratch_80cls knet_sp_cosine_80cls maskrcnn_80cls; do
  for s in 0 1 2; do f=$R/$r/seed$s/eval.json; [ -f $f ] || continue; E="$E $f"; N="$N,$r"; M="$M --metrics $R/$r/seed$s/metrics.jsonl"; done
done
sp table $E --names ${N#,} $M --early-epochs 1 --early-epochs 2 --early-epochs 4 --decimals 2 --out results/coco_subset/results_so_far \
  --pseudo-masks saliency=results/coco_subset/stores/923865665858.quality.json --pseudo-masks random_proposals=results/coco_subset/stores/9560965e062c.quality.json
