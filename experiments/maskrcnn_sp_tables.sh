#!/bin/bash
# The committed table and curves of Mask R-CNN pre-trained on the pseudo masks (experiments/maskrcnn_sp.yaml), from
# the runs of results/maskrcnn_sp/ that have finished or are recorded (experiments/table_rows.sh), beside the rows
# from ImageNet weights alone, read from the Penn-Fudan record: maskrcnn_sp_results.md/.json and
# maskrcnn_sp_curves_{10,20,80}.png. PARTIAL=1 keeps rows with seeds still missing (the seeds column says how many).
# Arguments are passed to every `sp table` (e.g. --allow-mixed: the config's rows ran over several sessions).
set -euo pipefail
TABLE_FLAGS=("$@")
CONFIG=experiments/maskrcnn_sp.yaml RECORD=experiments/maskrcnn_sp_results.json
[ -f $RECORD ] || echo '{"runs": {}, "pseudo_masks": {}}' > $RECORD
source "$(dirname "$0")/table_rows.sh"   # table(), RES, RUNS; cd to the repository root
BASELINES="maskrcnn_10 maskrcnn_20 maskrcnn_80"
python -c "
import json, sys
own, pennfudan = json.load(open(sys.argv[1])), json.load(open('experiments/pennfudan_results.json'))
own['runs'].update({row: pennfudan['runs'][row] for row in sys.argv[2:]})
json.dump(own, open(sys.argv[1], 'w'))" $RECORDED $BASELINES
table results maskrcnn_10 $(cut -d' ' -f1 <<< "$RUNS" | grep _10) maskrcnn_20 $(cut -d' ' -f1 <<< "$RUNS" | grep _20) \
  maskrcnn_80 $(cut -d' ' -f1 <<< "$RUNS" | grep _80)
cp $RES/results.md experiments/maskrcnn_sp_results.md
cp $RES/results.json experiments/maskrcnn_sp_results.json
for budget in 10 20 80; do
  table curves_$budget maskrcnn_$budget maskrcnn_saliency_$budget
  [ ! -f $RES/curves_${budget}_curves.png ] || cp $RES/curves_${budget}_curves.png experiments/maskrcnn_sp_curves_$budget.png
done
# the pre-trained detectors themselves, class-agnostic on Penn-Fudan val before any fine-tuning (pretrain_evals:
# results/maskrcnn_sp/eval_pretrain/RUN/seed0.json), the evaluations recorded in the committed file kept
PRETRAINED=experiments/maskrcnn_sp_pretrained.json
E="" N=""
for f in $RES/eval_pretrain/*/seed0.json; do
  [ -f $f ] && E="$E $f" && N="$N,$(basename $(dirname $f))"
done
if [ -n "$E" ]; then
  sp table $E --names ${N#,} --decimals 2 --out $RES/results_pretrained \
    $([ -f $PRETRAINED ] && echo --include $PRETRAINED) "${TABLE_FLAGS[@]}" > /dev/null
  cp $RES/results_pretrained.md experiments/maskrcnn_sp_pretrained.md
  cp $RES/results_pretrained.json $PRETRAINED
fi
