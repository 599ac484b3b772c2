#!/bin/bash
# The committed tables and charts of the Penn-Fudan experiment, from its finished runs (the workflow's
# results/pennfudan/): the full table (pennfudan_results.md/.json, as `snakemake ... all` wrote it), one chart of
# learning curves (mean ± sd over seeds) per label budget (Figure 4's form).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root; needs `sp` on PATH (the project venv)
RES=results/pennfudan
cp $RES/results.md experiments/pennfudan_results.md
cp $RES/results.json experiments/pennfudan_results.json

CONFIG="import yaml; config = yaml.safe_load(open('experiments/pennfudan.yaml'))"
curves() {  # curves OUT ROW...: the learning curves of these rows (each with its own seeds) -> experiments/OUT.png
  local out=$1 E="" N="" M="" r s; shift
  for r in "$@"; do
    for s in $(python -c "$CONFIG; run = next(x for x in config['finetune_runs'] if x['name'] == '$r'); print(*run.get('seeds', config['seeds']))"); do
      E="$E $RES/finetune/$r/seed$s/eval.json"; N="$N,$r"; M="$M --metrics $RES/finetune/$r/seed$s/metrics.jsonl"
    done
  done
  sp table $E --names ${N#,} $M --decimals 1 --out $RES/$out > /dev/null
  cp $RES/${out}_curves.png experiments/$out.png
}
for budget in 10 20 80; do
  curves pennfudan_curves_$budget knet_scratch_$budget knet_sp_$budget maskrcnn_$budget
done
curves pennfudan_curves_20_others knet_sp_20 knet_pseudo_masks_20 knet_sp_random_proposals_20 knet_sp_coco_pennfudan_20 \
  knet_sp_refined_20 mask2former_scratch_20 mask2former_sp_20 queryinst_scratch_20 queryinst_sp_20
# The side-by-side predictions (results/pennfudan/figures/compare.png) show Penn-Fudan photos, which may not be
# reposted (../shared/datasets/pennfudan/SOURCE.md): the workflow draws them, the repository does not carry them.
