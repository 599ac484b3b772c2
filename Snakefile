# The sp workflow: gen-masks (sharded) -> merge -> pretrain -> finetune -> evaluate -> results table.
#   snakemake --cores 2 demo          # the whole pipeline on the built-in demo data
#   snakemake --cores N pretrain      # pseudo masks, then pre-training
#   snakemake --cores N all           # + fine-tuning, evaluation and the results table
# Every rule only calls `sp` commands; README.md shows each of them by hand.
import hashlib
import json

configfile: "config/config.yaml"

RES = config["results"]
THREADS = int(config["threads"])
NSHARDS = int(config["shards"])


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# The store is named by its generation settings (and input folder): experiments that differ only in
# training settings share it, and any change of a generation setting makes a new one.
GEN = dict(config["gen_masks"], images=config["unlabeled_images"])
STORE = f"{RES}/stores/{settings_hash(GEN)}.zarr"
PRETRAIN_KEYS = ["small_models", "pretrain_epochs", "pretrain_batch_size", "pretrain_lr_steps",
                 "pretrain_warmup_steps", "pretrain_image_size", "pretrain_max_size", "prompt", "kernel_loss_weight"]
PRETRAIN = f"{RES}/pretrain/{settings_hash(GEN)}-{settings_hash({k: config[k] for k in PRETRAIN_KEYS})}"
RUNS = list(config["finetune_runs"])
GPUS = 0 if config["device"] == "cpu" else int(config["nproc_per_node"])  # per training job


def sp(nproc=1):
    """`sp`, or `torchrun ... -m pipeline.cli` for multi-process training."""
    return f"torchrun --standalone --nproc_per_node {nproc} -m pipeline.cli" if nproc > 1 else "sp"


def gen_flags():
    g = config["gen_masks"]
    flags = (f"--method {g['method']} --backbone {g['backbone']} --image-size {g['image_size']} "
             f"--max-size {g['max_size']} --min-score {g['min_score']} --max-masks {g['max_masks']} --nms {g['nms']}")
    return flags + (f" --backbone-weights {g['backbone_weights']}" if g["backbone_weights"] else "")


# CPU-sized models (ResNet-18) or the paper's; `--config small_models=false` arrives as a string
SMALL = "--small" if str(config["small_models"]).lower() in ("true", "1", "yes") else ""
WEIGHTS = f"--backbone-weights {config['gen_masks']['backbone_weights']}" if config["gen_masks"]["backbone_weights"] else ""
# Shell commands ({threads}, {input}, {params.x} and {config[x]} are filled in by Snakemake).
GEN_MASKS_CMD = (
    f"OMP_NUM_THREADS={{threads}} sp gen-masks {{config[unlabeled_images]}} --store {STORE} "
    f"--shard {{wildcards.i}}/{NSHARDS} --batch-size {{config[gen_batch_size]}} --workers {{threads}} "
    f"--device {{config[device]}} {gen_flags()}")
PRETRAIN_CMD = (
    f"OMP_NUM_THREADS={{threads}} {{params.sp}} pretrain --store {STORE} --images {{config[unlabeled_images]}} "
    f"--out {PRETRAIN} {SMALL} --epochs {{config[pretrain_epochs]}} "
    f"--batch-size {{config[pretrain_batch_size]}} {{params.lr_steps}} --warmup-steps {{config[pretrain_warmup_steps]}} "
    f"--image-size {{config[pretrain_image_size]}} --max-size {{config[pretrain_max_size]}} --prompt {{config[prompt]}} "
    f"--kernel-loss-weight {{config[kernel_loss_weight]}} --workers 0 --device {{config[device]}} --resume {WEIGHTS}")
FINETUNE_CMD = (
    f"OMP_NUM_THREADS={{threads}} {{params.sp}} finetune --train-ann {{input.ann}} --train-images {{config[train_images]}} "
    f"--val-ann {{config[val_ann]}} --val-images {{config[val_images]}} --out {RES}/finetune/{{wildcards.run}} "
    f"--model {{params.model}} {SMALL} {{params.init}} {WEIGHTS} "
    f"--epochs {{config[finetune_epochs]}} --batch-size {{config[finetune_batch_size]}} {{params.lr_steps}} "
    f"--warmup-steps {{config[finetune_warmup_steps]}} --image-size {{config[finetune_image_size]}} "
    f"--max-size {{config[finetune_max_size]}} --workers 0 --device {{config[device]}} --resume")
EVALUATE_CMD = ("OMP_NUM_THREADS={threads} sp evaluate {input} --ann {config[val_ann]} --images {config[val_images]} "
                "--out {output} --workers 0 --device {config[device]}")


wildcard_constraints:
    i=r"\d+",
    run="|".join(RUNS),


rule all:
    input: f"{RES}/results.md"

rule demo:
    input: f"{RES}/results.md"

rule gen_masks:
    input: f"{STORE}.done"

rule pretrain:
    input: f"{PRETRAIN}/final.pth"

rule finetune:
    input: expand(f"{RES}/finetune/{{run}}/final.pth", run=RUNS)

rule evaluate:
    input: expand(f"{RES}/eval/{{run}}.json", run=RUNS)


rule demo_data:
    output: "demo/annotations/train.json", "demo/annotations/val.json", "demo/annotations/unlabeled_gt.json"
    shell: "sp demo-data demo"


# Markers (*.done) rather than directory outputs: Snakemake deletes the outputs of a failed job, and the
# part stores must survive a crash so that rerunning resumes them.
rule gen_masks_shard:
    input: lambda w: "demo/annotations/train.json" if config["unlabeled_images"].startswith("demo/") else []
    output: touch(f"{STORE.replace('.zarr', '')}.part{{i}}.done")
    threads: THREADS
    resources:
        gpu=min(GPUS, 1),
        mem_mb=8000,
    shell: GEN_MASKS_CMD

rule merge_store:
    input: expand(f"{STORE.replace('.zarr', '')}.part{{i}}.done", i=range(NSHARDS))
    output: touch(f"{STORE}.done")
    shell: "rm -rf " + STORE + " && sp store merge " + STORE + " --remove-parts"

rule pretrain_run:
    input: f"{STORE}.done"
    output: f"{PRETRAIN}/final.pth"
    threads: THREADS
    resources:
        gpu=GPUS,
        mem_mb=16000,
    params: sp=sp(int(config["nproc_per_node"])),
            lr_steps=" ".join(f"--lr-steps {e}" for e in config["pretrain_lr_steps"])
    shell: PRETRAIN_CMD

rule finetune_run:
    input:
        ann=config["train_ann"],
        init=lambda w: f"{PRETRAIN}/final.pth" if config["finetune_runs"][w.run].get("init") == "pretrain" else [],
    output: f"{RES}/finetune/{{run}}/final.pth"
    threads: THREADS
    resources:
        gpu=GPUS,
        mem_mb=16000,
    params: sp=sp(int(config["nproc_per_node"])),
            model=lambda w: config["finetune_runs"][w.run]["model"],
            init=lambda w, input: f"--init {input.init}" if input.init else "",
            lr_steps=" ".join(f"--lr-steps {e}" for e in config["finetune_lr_steps"]),
    shell: FINETUNE_CMD

rule evaluate_run:
    input: f"{RES}/finetune/{{run}}/final.pth"
    output: f"{RES}/eval/{{run}}.json"
    threads: THREADS
    shell: EVALUATE_CMD

rule results_table:
    input: expand(f"{RES}/eval/{{run}}.json", run=RUNS)
    output: f"{RES}/results.md", f"{RES}/results.json"
    params: names=",".join(RUNS)
    shell: "sp table {input} --names {params.names} --out " + RES + "/results"
