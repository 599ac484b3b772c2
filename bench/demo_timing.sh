#!/bin/bash
# README's command 1 on a fresh clone, timed: a clone of this repository's HEAD beside ../shared (as CI has it),
# a new venv, `pip install -e '.[test]'`, then `snakemake --cores 2 demo`. Writes bench/records/demo_timing.json
# (the commit, the date, install / workflow / total seconds, the cores). Run it on a quiet machine:
#   bash bench/demo_timing.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "$(dirname "$REPO")/demo-timing.XXXX")   # beside the repository, so ../shared resolves
trap 'rm -rf "$WORK"' EXIT
git clone -q "$REPO" "$WORK/sp"
cd "$WORK/sp"
start=$(date +%s)
python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[test]'
installed=$(date +%s)
snakemake --cores 2 demo > "$WORK/demo.log" 2>&1 || { tail -30 "$WORK/demo.log"; exit 1; }
end=$(date +%s)
python - "$REPO/bench/records/demo_timing.json" <<PY
import json, os, sys
json.dump({"command": "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && "
                      "snakemake --cores 2 demo",
           "commit": "$(git rev-parse HEAD)", "date": "$(date -Is)", "cores": os.cpu_count(),
           "install_s": $((installed - start)), "workflow_s": $((end - installed)), "total_s": $((end - start))},
          open(sys.argv[1], "w"), indent=1)
PY
cat "$REPO/bench/records/demo_timing.json"
