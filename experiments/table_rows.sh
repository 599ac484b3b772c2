# Sourced by the experiments' *_tables.sh with CONFIG (an experiments/*.yaml) and RECORD (its committed
# results JSON) set: defines `table OUT ROW...`, which writes `sp table` of the ROWs whose every seed finished
# under the config's results folder or is recorded in RECORD to $RES/OUT.md/.json (and OUT_curves.png). A seed whose
# run is not on this machine keeps what RECORD recorded of it (`sp table --include`), so a session on a fresh
# machine that runs some rows or seeds does not drop the others; rows with a seed missing are named on stderr and
# left out (PARTIAL=1: kept with the seeds they have). TABLE_FLAGS (an array) is passed to every `sp table` (e.g. --allow-mixed).
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root; needs `sp` on PATH (the project venv)
RECORDED=$(mktemp --suffix .json)  # the committed record, read before the calling script rewrites it
cp $RECORD $RECORDED

# the config with the files it extends laid under it (as the Snakefile lays them)
CONFIG_JSON=$(python -c "import json, sys; from pipeline.workflow_defaults import layered_config
print(json.dumps(layered_config(sys.argv[1])))" $CONFIG)
RES=$(python -c "import json, sys; print(json.loads(sys.argv[1])['results'])" "$CONFIG_JSON")
# "ROW SEED..." for every fine-tuning run of the config, in its order
RUNS=$(python -c "
import json, sys; config = json.loads(sys.argv[1])
for run in config['finetune_runs']:
    print(run['name'], *run.get('seeds', config['seeds']))" "$CONFIG_JSON")
EARLY=$(python -c "import json, sys; print(*json.loads(sys.argv[1])['early_epochs'])" "$CONFIG_JSON")

recorded() {  # recorded ROW FILE: true when the committed record has ROW's seed evaluated in FILE
  python -c "import json, os, sys; sys.exit(os.path.normpath(sys.argv[3]) not in [os.path.normpath(r['file']) for r in
             json.load(open(sys.argv[1]))['runs'].get(sys.argv[2], []) if 'file' in r])" $RECORDED $1 $2
}
recorded_seeds() {  # recorded_seeds ROW: the number of ROW's seeds in the committed record, empty for none
  python -c "import json, sys; n = len(json.load(open(sys.argv[1]))['runs'].get(sys.argv[2], [])); print(n or '')" \
    $RECORDED $1
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
    if [ -n "$missing" ] && [ -n "${PARTIAL:-}" ] && [ -n "$e$(recorded_seeds $r)" ]; then
      echo "$r: without seeds$missing (PARTIAL)" >&2
    elif [ -n "$missing" ]; then echo "left out (seeds neither finished nor recorded:$missing): $r" >&2; continue; fi
    E="$E$e"; N="$N$n"; M="$M$m"; R="$R,$r"
  done
  [ -n "$R" ] || { echo "no finished row for $out" >&2; return 0; }
  mkdir -p $RES
  sp table $E ${N:+--names "${N#,}"} $M $(printf -- "--early-epochs %s " $EARLY) --decimals 1 --include $RECORDED \
    --rows ${R#,} --out $RES/$out "${TABLE_FLAGS[@]}" > /dev/null
}
