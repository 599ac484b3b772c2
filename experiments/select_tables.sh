#!/bin/bash
# The committed table of a choice made on held-apart training photos (experiments/*_select.yaml: the DropLoss of
# maskrcnn_sp_select.yaml, the pre-training of knet_sp_select.yaml), from the runs under the config's results folder
# that have finished or are recorded (experiments/table_rows.sh): experiments/NAME_results.md/.json for
# experiments/NAME.yaml. PARTIAL=1 keeps rows with seeds still missing. Further arguments are passed to every
# `sp table` (e.g. --allow-mixed).
#   bash experiments/select_tables.sh experiments/knet_sp_select.yaml
set -euo pipefail
CONFIG=$1; shift
TABLE_FLAGS=("$@")
RECORD=${CONFIG%.yaml}_results.json
[ -f $RECORD ] || echo '{"runs": {}, "pseudo_masks": {}}' > $RECORD
source "$(dirname "$0")/table_rows.sh"   # table(), RES, RUNS; cd to the repository root
table results $(cut -d' ' -f1 <<< "$RUNS")
cp $RES/results.md ${RECORD%.json}.md
cp $RES/results.json $RECORD
