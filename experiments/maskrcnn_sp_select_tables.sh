#!/bin/bash
# The committed table of the DropLoss choice on held-apart training photos (experiments/maskrcnn_sp_select.yaml),
# from the runs of results/maskrcnn_sp_select/ that have finished or are recorded (experiments/table_rows.sh):
# maskrcnn_sp_select_results.md/.json. PARTIAL=1 keeps rows with seeds still missing. Arguments are passed to
# every `sp table` (e.g. --allow-mixed).
set -euo pipefail
TABLE_FLAGS=("$@")
CONFIG=experiments/maskrcnn_sp_select.yaml RECORD=experiments/maskrcnn_sp_select_results.json
[ -f $RECORD ] || echo '{"runs": {}, "pseudo_masks": {}}' > $RECORD
source "$(dirname "$0")/table_rows.sh"   # table(), RES, RUNS; cd to the repository root
table results $(cut -d' ' -f1 <<< "$RUNS")
cp $RES/results.md experiments/maskrcnn_sp_select_results.md
cp $RES/results.json experiments/maskrcnn_sp_select_results.json
