#!/bin/bash
# The committed table and charts of the Penn-Fudan experiment, from the runs of results/pennfudan/ that have
# finished or are recorded (experiments/table_rows.sh): pennfudan_results.md/.json (mask and box AP, AP after the
# early epochs) and one chart of learning curves (mean ± sd over seeds) per label budget (Figure 4's form).
# Arguments are passed to every `sp table`: a row whose seeds ran different code versions (or some from before
# versions were recorded) is refused unless given --allow-mixed.
set -euo pipefail
TABLE_FLAGS=("$@")
CONFIG=experiments/pennfudan.yaml RECORD=experiments/pennfudan_results.json
source "$(dirname "$0")/table_rows.sh"   # table(), RES, RUNS; cd to the repository root
table results $(cut -d' ' -f1 <<< "$RUNS")
cp $RES/results.md experiments/pennfudan_results.md
cp $RES/results.json experiments/pennfudan_results.json
for budget in 10 20 80; do
  table curves_$budget knet_scratch_$budget knet_sp_$budget maskrcnn_$budget
  [ ! -f $RES/curves_${budget}_curves.png ] || cp $RES/curves_${budget}_curves.png experiments/pennfudan_curves_$budget.png
done
table curves_20_others knet_sp_20 knet_pseudo_masks_20 knet_sp_random_proposals_20 knet_sp_coco_pennfudan_20 \
  knet_sp_refined_20 mask2former_scratch_20 mask2former_sp_20 queryinst_scratch_20 queryinst_sp_20
[ ! -f $RES/curves_20_others_curves.png ] || cp $RES/curves_20_others_curves.png experiments/pennfudan_curves_20_others.png
table curves_20_long knet_scratch_20_long knet_sp_20_long maskrcnn_20   # the longer K-Net schedule (800 steps)
[ ! -f $RES/curves_20_long_curves.png ] || cp $RES/curves_20_long_curves.png experiments/pennfudan_curves_20_long.png
# The side-by-side predictions (results/pennfudan/figures/compare.png) show Penn-Fudan photos, which may not be
# reposted (../shared/datasets/pennfudan/SOURCE.md): the workflow draws them, the repository does not carry them.
