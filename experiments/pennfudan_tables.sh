#!/bin/bash
# The committed table and charts of the Penn-Fudan experiment, from the runs of results/pennfudan/ that have
# finished (every seed of a row evaluated; rows with a seed missing are named on stderr and left out, so a partial
# run of the workflow still gives a table of what it has): pennfudan_results.md/.json (mask and box AP, AP after
# the early epochs) and one chart of learning curves (mean ± sd over seeds) per label budget (Figure 4's form).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root; needs `sp` on PATH (the project venv)
RES=results/pennfudan

# "ROW SEED..." for every fine-tuning run of the config, in its order
RUNS=$(python -c "
import yaml; config = yaml.safe_load(open('experiments/pennfudan.yaml'))
for run in config['finetune_runs']:
    print(run['name'], *run.get('seeds', config['seeds']))")
EARLY=$(python -c "import yaml; print(*yaml.safe_load(open('experiments/pennfudan.yaml'))['early_epochs'])")

finished() {  # finished ROW: true when every seed of ROW has its eval.json
  local s
  for s in $(grep "^$1 " <<< "$RUNS" | cut -d' ' -f2-); do [ -f $RES/finetune/$1/seed$s/eval.json ] || return 1; done
}
table() {  # table OUT ROW...: sp table of the finished ROWs -> $RES/OUT.md/.json/_curves.png
  local out=$1 E="" N="" M="" r s; shift
  for r in "$@"; do
    if ! finished $r; then echo "left out (a seed not finished): $r" >&2; continue; fi
    for s in $(grep "^$r " <<< "$RUNS" | cut -d' ' -f2-); do
      E="$E $RES/finetune/$r/seed$s/eval.json"; N="$N,$r"; M="$M --metrics $RES/finetune/$r/seed$s/metrics.jsonl"
    done
  done
  [ -n "$E" ] || { echo "no finished row for $out" >&2; return 0; }
  sp table $E --names ${N#,} $M $(printf -- "--early-epochs %s " $EARLY) --decimals 1 --out $RES/$out > /dev/null
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
# The side-by-side predictions (results/pennfudan/figures/compare.png) show Penn-Fudan photos, which may not be
# reposted (../shared/datasets/pennfudan/SOURCE.md): the workflow draws them, the repository does not carry them.
