#!/bin/bash
# The committed table and charts of the Penn-Fudan experiment, from the runs of results/pennfudan/ that have
# finished (every seed of a row evaluated here or recorded, below; rows with a seed missing are named on stderr
# and left out, so a partial run of the workflow still gives a table of what it has): pennfudan_results.md/.json
# (mask and box AP, AP after the early epochs) and one chart of learning curves (mean ± sd over seeds) per label
# budget (Figure 4's form). A seed whose run is not on this machine keeps what the committed
# pennfudan_results.json recorded of it (`sp table --include`), so a session on a fresh machine that runs some
# rows or seeds does not drop the others. Arguments are passed to every `sp table`: a row whose seeds ran different
# code versions (or some from before versions were recorded) is refused unless given --allow-mixed.
set -euo pipefail
TABLE_FLAGS=("$@")
cd "$(dirname "$0")/.."  # the repository root; needs `sp` on PATH (the project venv)
RES=results/pennfudan
RECORDED=$(mktemp --suffix .json)  # the committed record, read before this script rewrites it
cp experiments/pennfudan_results.json $RECORDED

# "ROW SEED..." for every fine-tuning run of the config, in its order
RUNS=$(python -c "
import yaml; config = yaml.safe_load(open('experiments/pennfudan.yaml'))
for run in config['finetune_runs']:
    print(run['name'], *run.get('seeds', config['seeds']))")
EARLY=$(python -c "import yaml; print(*yaml.safe_load(open('experiments/pennfudan.yaml'))['early_epochs'])")

recorded() {  # recorded ROW FILE: true when the committed record has ROW's seed evaluated in FILE
  python -c "import json, os, sys; sys.exit(os.path.normpath(sys.argv[3]) not in [os.path.normpath(r['file']) for r in
             json.load(open(sys.argv[1]))['runs'].get(sys.argv[2], []) if 'file' in r])" $RECORDED $1 $2
}
table() {  # table OUT ROW...: sp table of the ROWs whose every seed finished here or is recorded -> $RES/OUT.*
  local out=$1 E="" N="" M="" R="" r s f missing; shift
  for r in "$@"; do
    local e="" n="" m=""; missing=""
    for s in $(grep "^$r " <<< "$RUNS" | cut -d' ' -f2-); do
      f=$RES/finetune/$r/seed$s/eval.json
      if [ -f $f ]; then e="$e $f"; n="$n,$r"; m="$m --metrics $RES/finetune/$r/seed$s/metrics.jsonl"
      elif ! recorded $r $f; then missing="$missing $s"; fi
    done
    if [ -n "$missing" ]; then echo "left out (seeds neither finished nor recorded:$missing): $r" >&2; continue; fi
    E="$E$e"; N="$N$n"; M="$M$m"; R="$R,$r"
  done
  [ -n "$R" ] || { echo "no finished row for $out" >&2; return 0; }
  sp table $E --names "${N#,}" $M $(printf -- "--early-epochs %s " $EARLY) --decimals 1 --include $RECORDED \
    --rows ${R#,} --out $RES/$out "${TABLE_FLAGS[@]}" > /dev/null
}
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
