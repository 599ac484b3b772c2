#!/bin/bash
# The model check of issue 18 on Penn-Fudan: each model without pre-training, 10 epochs at 320 px (long side 512),
# batch 4, AdamW lr 3e-4 x0.1 after epoch 8, flip + rotation, evaluated on val after epochs 1, 2, 4, 8 and 10;
# seeds 0, 1, 2. Usage, from the repository root with the project venv active:
#   bash experiments/pennfudan_check.sh OUT [MODEL...]          # default models: knet mask2former queryinst
# The "before" K-Net rows of experiments/README.md ran this on the code before issue 18 (commit 0622cc5):
#   git worktree add ../before 0622cc5 && (cd ../before && PYTHONPATH=$PWD bash $OLDPWD/experiments/pennfudan_check.sh OUT knet)
set -euo pipefail
OUT=$1; shift
MODELS=${*:-knet mask2former queryinst}
PF=${PENNFUDAN:-../shared/datasets/pennfudan}
for model in $MODELS; do for seed in 0 1 2; do
  [ -f "$OUT/${model}_seed$seed/eval.json" ] && continue
  OMP_NUM_THREADS=1 python -m pipeline.cli finetune --train-ann $PF/train/annotations.json \
    --train-images $PF/train/images --val-ann $PF/val/annotations.json --val-images $PF/val/images \
    --out "$OUT/${model}_seed$seed" --resume --model $model --small --epochs 10 --batch-size 4 --lr 3e-4 \
    --lr-steps 8 --warmup-steps 50 --rotate 9 --image-size 320 --max-size 512 --eval-at 1 --eval-at 2 \
    --eval-at 4 --eval-at 8 --workers 1 --device cpu --seed $seed
done; done
