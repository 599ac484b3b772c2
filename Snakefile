# The sp workflow: gen-masks (sharded) -> merge -> pretrain -> finetune -> evaluate -> results table.
#   snakemake --cores 2 demo          # the whole pipeline on the built-in demo data
#   snakemake --cores N pretrain      # pseudo masks, then pre-training
#   snakemake --cores N all           # + fine-tuning, evaluation and the results table
#   snakemake --cores 2 all --configfile experiments/low_data.yaml   # the low-data experiment (experiments/)
# Every rule only calls `sp` commands; README.md shows each of them by hand.
import hashlib
import json
import os

configfile: os.path.join(workflow.basedir, "config", "config.yaml")  # also with --directory elsewhere


def config_bases(files, chain=()):
    """The config files that `files` extend (a config's `extends`: a path or a list of paths, relative to the
    working directory or else to this repository), each after the files it extends itself, so that every file
    overrides its bases."""
    import yaml

    out = []
    for name in [files] if isinstance(files, str) else files or []:
        path = name if os.path.exists(name) else os.path.join(workflow.basedir, name)
        if path in chain:
            raise ValueError(f"config extends: {' -> '.join([*chain, path])} is a cycle")
        if not os.path.exists(path):
            raise ValueError(f"config extends {name}, which is neither in {os.getcwd()} nor in {workflow.basedir}")
        with open(path) as f:
            own = yaml.safe_load(f) or {}
        out += [p for p in config_bases(own.get("extends"), (*chain, path)) if p not in out] + [path]
    return out


# A config file may build on others (`extends`): config.yaml, then its bases in order, then the file itself and
# --config on top (Snakemake lays the command line over each file it reads), so several experiments share one
# definition of their stores and pre-training runs instead of copies that drift apart.
for base in config_bases(config.get("extends")):
    workflow.configfile(base)

# A stage setting the config leaves out is the stage's default, read where `sp` reads it (the stages' settings
# dataclasses, docs/defaults.md): leaving a key out and spelling out its default name the same stores and runs.
# config/config.yaml sets only what the demo deliberately sets otherwise.
from pipeline.workflow_defaults import workflow_defaults
from stages.settings import MASKRCNN_DEFAULTS

STAGE_DEFAULTS = workflow_defaults()
UNKNOWN_GEN_KEYS = sorted(set(config.get("gen_masks", {})) - set(STAGE_DEFAULTS["gen_masks"]))
if UNKNOWN_GEN_KEYS:
    raise ValueError(f"config gen_masks: unknown keys {UNKNOWN_GEN_KEYS}; the settings are "
                     f"{sorted(STAGE_DEFAULTS['gen_masks'])}")
config["gen_masks"] = dict(STAGE_DEFAULTS["gen_masks"], **config.get("gen_masks", {}))
for key, value in STAGE_DEFAULTS.items():
    config.setdefault(key, value)

RES = config["results"]
# stores and pre-trainings are named by their settings: under a `cache` folder shared by several experiments'
# configs, an experiment reuses those another one already made (default: inside its own results folder)
CACHE = config.get("cache") or RES
THREADS = int(config["threads"])
NSHARDS = int(config["shards"])
SEEDS = [int(s) for s in config["seeds"]]
# pre-training runs once per seed of pretrain_seeds (default: seeds); fine-tuning seed s starts from the
# pre-training of seed s where there is one, else of pretrain_seeds[0]
PRETRAIN_SEEDS = [int(s) for s in config.get("pretrain_seeds") or SEEDS]
DEMO = config["demo_data"]["dir"]
GPUS = 0 if config["device"] == "cpu" else int(config["nproc_per_node"])  # per training job
PRETRAIN_KEYS = ["small_models", "pretrain_epochs", "pretrain_batch_size", "pretrain_lr_steps",
                 "pretrain_warmup_steps", "pretrain_image_size", "pretrain_max_size", "prompt", "kernel_loss_weight"]


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def truthy(value):  # `--config small_models=false` arrives as a string
    return str(value).lower() in ("true", "1", "yes")


def named(section, allowed):
    """{name: overrides} of a config list of named entries; unknown keys and repeated names are errors."""
    entries = {}
    for entry in config[section]:
        name = entry.get("name")
        unknown = set(entry) - {"name", *allowed}
        if not name or name in entries or unknown:
            raise ValueError(f"config {section}: each entry needs a unique name and only the keys "
                             f"{sorted(allowed)}; got {entry}")
        entries[name] = {k: v for k, v in entry.items() if k != "name"}
    return entries


# A store is named by its generation settings (and input folder), a pre-training run by its store and its
# settings: experiments that differ only in later settings share them, and any change makes a new one.
# A store may read other images than the config's unlabeled_images / unlabeled_list (with their own ground
# truth, unlabeled_gt, or none: ""). `method: import` with `import_ann: FILE` makes a store of the masks of a COCO
# JSON of those images (`sp store import-coco`: another tool's pseudo labels, or ground truth as an upper bound).
STORE_DATA_KEYS = ["unlabeled_images", "unlabeled_list", "unlabeled_gt"]
STORE_OF = {}  # store name -> hash
STORE_SETTINGS = {}  # hash -> generation settings
STORE_DATA = {}  # hash -> {unlabeled_images, unlabeled_list, unlabeled_gt}
# keys added after stores were made: at these values (refine "none", the paper's generator; the default
# random_boxes) they stay out of the hash, so those stores keep the names they had before the keys existed
NAMED_ONLY_IF_SET = {"refine": "none", "random_boxes": STAGE_DEFAULTS["gen_masks"]["random_boxes"]}
for name, over in named("stores", [*config["gen_masks"], *STORE_DATA_KEYS, "import_ann"]).items():
    data = {k: over.pop(k, config[k]) for k in STORE_DATA_KEYS}
    data["import_ann"] = over.pop("import_ann", "")
    settings = dict(config["gen_masks"], **over)
    if (settings["method"] == "import") != bool(data["import_ann"]):
        raise ValueError(f"config stores: {name}: `method: import` and `import_ann: FILE` go together")
    images = {"images": data["unlabeled_images"]}
    if data["unlabeled_list"]:  # which images of the folder, by content
        images["image_list"] = hashlib.sha256(open(data["unlabeled_list"], "rb").read()).hexdigest()
    if data["import_ann"]:  # which masks, by content
        images["import_ann"] = hashlib.sha256(open(data["import_ann"], "rb").read()).hexdigest()
    if settings["method"] != "random" and settings["random_boxes"] != STAGE_DEFAULTS["gen_masks"]["random_boxes"]:
        raise ValueError(f"config stores: {name}: random_boxes is the count of `method: random` stores; "
                         f"this store's method is {settings['method']}")
    named_by = {k: v for k, v in settings.items() if k not in NAMED_ONLY_IF_SET or v != NAMED_ONLY_IF_SET[k]}
    STORE_OF[name] = settings_hash(dict(named_by, **images))
    STORE_SETTINGS[STORE_OF[name]] = settings
    STORE_DATA[STORE_OF[name]] = data

PRETRAIN_OF = {}  # pre-training run name -> "<store hash>-<settings hash>"
PRETRAIN_SETTINGS = {}
PRETRAIN_MODEL = {}  # pre-training run name -> model (knet by default)
# Mask R-CNN (model: maskrcnn) has no queries: no prompts and no kernel supervision; its runs may set DropLoss
# (`sp pretrain --drop-loss/--no-drop-loss --drop-loss-iou`). drop_loss absent is `sp pretrain`'s default, named
# in the run's hash so that leaving it out and spelling it out name the same run, and a change of the default a new
# one (it was on until DropLoss was chosen on held-apart photos: experiments/maskrcnn_sp_select.yaml)
MASKRCNN_PRETRAIN_KEYS = ["drop_loss", "drop_loss_iou"]
for name, over in named("pretrain_runs", ["store", "model", "min_mask_area", *PRETRAIN_KEYS,
                                          *MASKRCNN_PRETRAIN_KEYS]).items():
    store = STORE_OF[over.pop("store", next(iter(STORE_OF)))]
    settings = {k: over.get(k, config[k]) for k in PRETRAIN_KEYS}
    PRETRAIN_MODEL[name] = over.get("model", "knet")
    if PRETRAIN_MODEL[name] == "maskrcnn":
        if over.get("prompt", "none") != "none" or float(over.get("kernel_loss_weight", 0)) != 0:
            raise ValueError(f"config pretrain_runs: {name}: Mask R-CNN takes no prompt nor kernel_loss_weight")
        over["drop_loss"] = truthy(over.get("drop_loss", MASKRCNN_DEFAULTS["drop_loss"]))
        if "drop_loss_iou" in over and not over["drop_loss"]:
            raise ValueError(f"config pretrain_runs: {name}: drop_loss_iou is DropLoss's threshold, and drop_loss "
                             "is false (or left out: off by default); set drop_loss: true with it")
        settings.update(prompt="none", kernel_loss_weight=0,
                        **{k: over[k] for k in MASKRCNN_PRETRAIN_KEYS if k in over})
    elif set(MASKRCNN_PRETRAIN_KEYS) & set(over):
        raise ValueError(f"config pretrain_runs: {name}: {MASKRCNN_PRETRAIN_KEYS} are Mask R-CNN's settings")
    if PRETRAIN_MODEL[name] != "knet":  # K-Net runs keep the hashes (and finished runs) they had before `model`
        settings["model"] = PRETRAIN_MODEL[name]
    if float(over.get("min_mask_area", 0)):  # `sp pretrain --min-mask-area`; 0 (all masks) keeps the old hashes
        settings["min_mask_area"] = float(over["min_mask_area"])
    PRETRAIN_OF[name] = f"{store}-{settings_hash(settings)}"
    PRETRAIN_SETTINGS[PRETRAIN_OF[name]] = dict(settings, store=store, model=PRETRAIN_MODEL[name])

RUNS = named("finetune_runs", ["model", "init", "init_reset", "percent", "class_agnostic", "lr", "frozen_stages",
                                "repeat", "seeds", "epochs", "lr_steps"])
RUN_SEEDS = {name: [int(s) for s in run.get("seeds", SEEDS)] for name, run in RUNS.items()}  # a run's own seeds
for name, run in RUNS.items():
    if run.get("init") and run["init"] not in PRETRAIN_OF:
        raise ValueError(f"config finetune_runs: {name} starts from unknown pre-training run {run['init']}")
    if run.get("init") and PRETRAIN_MODEL[run["init"]] != run.get("model"):
        raise ValueError(f"config finetune_runs: {name} fine-tunes {run.get('model')} from {run['init']}, "
                         f"a {PRETRAIN_MODEL[run['init']]} pre-training run")

FIGURES = config["figures"]  # kernel_maps: [fine-tuning runs], kernel_maps_pretrain: [pre-training runs], compare: [...]
# What the rows use: the pre-training runs they start from (and those drawn in figures) and those runs' stores,
# plus the stores no pre-training run reads (defined to be scored, e.g. the demo's random backbone). A config may
# define more (a shared catalog of stores and runs, see `extends`): `all` makes only what its rows use, the
# targets `gen_masks` and `pretrain` make everything defined.
USED_PRETRAIN = [name for name in PRETRAIN_OF
                 if name in {run.get("init") for run in RUNS.values()} | set(FIGURES.get("kernel_maps_pretrain", []))]
STORES_OF = lambda names: {PRETRAIN_SETTINGS[PRETRAIN_OF[name]]["store"] for name in names}
USED_STORES = [h for h in STORE_DATA if h in STORES_OF(USED_PRETRAIN) or h not in STORES_OF(PRETRAIN_OF)]


def sp(nproc=1):
    """`sp`, or `torchrun ... -m pipeline.cli` for multi-process training."""
    return f"torchrun --standalone --nproc_per_node {nproc} -m pipeline.cli" if nproc > 1 else "sp"


def flags(**options):
    """Command-line flags: lists repeat the flag, booleans are bare flags, empty values are left out."""
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            out += [f"{flag} {v}" for v in value]
        elif value not in ("", None):
            out.append(f"{flag} {value}")
    return " ".join(out)


# the same backbone and weights for the pseudo masks and every model of every run
BACKBONE, WEIGHTS = config["gen_masks"]["backbone"], config["gen_masks"]["backbone_weights"]
COMMON = dict(workers=0, device=config["device"])
SKIP_BAD = truthy(config["skip_bad"])  # leave out bad labeled images/annotations (listed per run) instead of stopping
# Every labeled file is checked (with its images) first: what fine-tuning, evaluation and eval-masks would
# otherwise find hours later. The check has no inputs from other jobs, so it runs at once; stage 1 does not wait
# for it (a failed check stops the workflow all the same). ([file, image folder, use] each)
LABEL_CHECKS = [[config["train_ann"], config["train_images"], "train"],
                [config["val_ann"], config["val_images"], "eval"]]
LABEL_CHECKS += [[gt, "", "mask-gt"] for gt in dict.fromkeys(d["unlabeled_gt"] for d in STORE_DATA.values()) if gt]
LABELS_CHECKED = f"{RES}/labels.{settings_hash(LABEL_CHECKS)}.checked"  # one marker per set of checked files


def gen_masks_cmd(w):
    g, data = STORE_SETTINGS[w.store], STORE_DATA[w.store]
    if g["method"] == "import":
        return (f"sp store import-coco {data['import_ann']} --images {data['unlabeled_images']} "
                f"--store {CACHE}/stores/{w.store}.zarr --shard {w.i}/{NSHARDS} "
                + flags(batch_size=config["gen_batch_size"], workers=THREADS, device=config["device"],
                        backbone=g["backbone"], backbone_weights=g["backbone_weights"], image_size=g["image_size"],
                        max_size=g["max_size"], skip_bad=SKIP_BAD))
    return (f"sp gen-masks {data['unlabeled_images']} --store {CACHE}/stores/{w.store}.zarr --shard {w.i}/{NSHARDS} "
            + flags(image_list=data["unlabeled_list"], batch_size=config["gen_batch_size"], workers=THREADS,
                    device=config["device"], method=g["method"],
                    backbone=g["backbone"], backbone_weights=g["backbone_weights"], image_size=g["image_size"],
                    max_size=g["max_size"], min_score=g["min_score"], max_masks=g["max_masks"], nms=g["nms"],
                    refine=g["refine"], random_boxes=g["random_boxes"] if g["method"] == "random" else None))


def pretrain_cmd(w):
    p = PRETRAIN_SETTINGS[w.key]
    drop_loss = p.get("drop_loss")  # Mask R-CNN runs: set, or sp pretrain's default
    return (f"pretrain --store {CACHE}/stores/{p['store']}.zarr --images {STORE_DATA[p['store']]['unlabeled_images']} "
            f"--out {CACHE}/pretrain/{w.key}/seed{w.seed} --resume "
            + flags(model=p["model"], small=truthy(p["small_models"]), epochs=p["pretrain_epochs"],
                    batch_size=p["pretrain_batch_size"],
                    lr_steps=p["pretrain_lr_steps"], warmup_steps=p["pretrain_warmup_steps"],
                    image_size=p["pretrain_image_size"], max_size=p["pretrain_max_size"], prompt=p["prompt"],
                    kernel_loss_weight=p["kernel_loss_weight"], drop_loss=drop_loss is True,
                    no_drop_loss=drop_loss is False, drop_loss_iou=p.get("drop_loss_iou"),
                    min_mask_area=p.get("min_mask_area"), seed=w.seed,
                    backbone=BACKBONE, backbone_weights=WEIGHTS, **COMMON))


def train_ann(run, seed):
    """The run's labeled file: train_ann, or its `percent` % split (sp split, seed split_seed; with
    split_per_seed, fine-tuning seed s trains on the split of seed split_seed + s)."""
    if not RUNS[run].get("percent"):
        return config["train_ann"]
    stem = os.path.splitext(os.path.basename(config["train_ann"]))[0]
    split = int(config["split_seed"]) + (int(seed) if truthy(config.get("split_per_seed", False)) else 0)
    return f"{RES}/splits/{stem}.{split}@{RUNS[run]['percent']:g}_labeled.json"


def finetune_cmd(w, input):
    run = RUNS[w.run]
    return (f"finetune --train-ann {input.ann} --train-images {config['train_images']} "
            f"--val-ann {config['val_ann']} --val-images {config['val_images']} "
            f"--out {RES}/finetune/{w.run}/seed{w.seed} --resume --overwrite "
            + flags(model=run["model"], class_agnostic=truthy(run.get("class_agnostic", False)), lr=run.get("lr"),
                    frozen_stages=run.get("frozen_stages", config["finetune_frozen_stages"]),
                    repeat=run.get("repeat", ""), eval_at=config["finetune_eval_at"], small=truthy(config["small_models"]), init=input.init or "",
                    init_reset=run.get("init_reset", []),
                    backbone=BACKBONE, backbone_weights=WEIGHTS, epochs=run.get("epochs", config["finetune_epochs"]),
                    batch_size=config["finetune_batch_size"],
                    lr_steps=run.get("lr_steps", config["finetune_lr_steps"]), warmup_steps=config["finetune_warmup_steps"],
                    image_size=config["finetune_image_size"], max_size=config["finetune_max_size"],
                    rotate=config["finetune_rotate"], seed=w.seed,
                    skip_bad=SKIP_BAD, **COMMON))


def table_cmd(w, input):
    names = ",".join(run for run in RUNS for _ in RUN_SEEDS[run])
    metrics = [f"{RES}/finetune/{run}/seed{seed}/metrics.jsonl" for run in RUNS for seed in RUN_SEEDS[run]]
    quality = [f"{name}={CACHE}/stores/{h}.quality.json" for name, h in STORE_OF.items()
               if h in USED_STORES and STORE_DATA[h]["unlabeled_gt"]]
    return (f"sp table {' '.join(input.evals)} --names {names} --out {RES}/results "
            + flags(metrics=metrics, early_epochs=config["early_epochs"], pseudo_masks=quality,
                    decimals=config["table_decimals"], allow_mixed=truthy(config.get("allow_mixed_versions", False))))


def check_labels_cmd(w):
    return " && ".join(f"sp check-labels {ann} " + flags(images=images, use=use, skip_bad=SKIP_BAD)
                       for ann, images, use in LABEL_CHECKS)


def demo_input(path):
    """The demo annotations when `path` lies in the demo folder, so that the demo data is made first."""
    return f"{DEMO}/annotations/train.json" if str(path).startswith(DEMO.rstrip("/") + "/") else []


# The pre-trained models themselves, class-agnostic on the evaluation set (the paper's Table 6), and figures:
# kernel maps (Figure 6), side-by-side predictions and pre-training loss curves, of seed SEEDS[0].
PRETRAIN_EVALS = ([f"{RES}/eval_pretrain/{name}/seed{PRETRAIN_SEEDS[0]}.json" for name in USED_PRETRAIN]
                  if truthy(config["pretrain_evals"]) else [])
FIGURE_FILES = ([f"{RES}/figures/kernel_maps.png"] if FIGURES.get("kernel_maps") or FIGURES.get("kernel_maps_pretrain")
                else []) + ([f"{RES}/figures/compare.png"] if FIGURES.get("compare") else []) + \
               ([f"{RES}/figures/pretrain_losses.png"] if USED_PRETRAIN and FIGURES else [])


def finetuned(run, seed=None):
    seed = RUN_SEEDS.get(run, SEEDS)[0] if seed is None else seed
    return f"{RES}/finetune/{run}/seed{seed}/final.pth"


def pretrained(name, seed=PRETRAIN_SEEDS[0]):
    seed = seed if seed in PRETRAIN_SEEDS else PRETRAIN_SEEDS[0]
    return f"{CACHE}/pretrain/{PRETRAIN_OF[name]}/seed{seed}/final.pth"


STORES = [f"{CACHE}/stores/{h}.zarr.done" for h in STORE_SETTINGS]
QUALITY = [f"{CACHE}/stores/{h}.quality.json" for h in USED_STORES if STORE_DATA[h]["unlabeled_gt"]]
PRETRAINS = [f"{CACHE}/pretrain/{key}/seed{seed}/final.pth" for key in PRETRAIN_SETTINGS for seed in PRETRAIN_SEEDS]
FINETUNES = [f"{RES}/finetune/{run}/seed{seed}/final.pth" for run in RUNS for seed in RUN_SEEDS[run]]
EVALS = [f"{RES}/finetune/{run}/seed{seed}/eval.json" for run in RUNS for seed in RUN_SEEDS[run]]


wildcard_constraints:
    i=r"\d+",
    seed=r"\d+",
    store=r"[0-9a-f]{12}",
    key=r"[0-9a-f]{12}-[0-9a-f]{12}",
    run="|".join(RUNS),
    prun="|".join(PRETRAIN_OF) or "none",
    percent=r"\d+(\.\d+)?",


rule all:
    input: f"{RES}/results.md", [f"{RES}/results_pretrained.md"] if PRETRAIN_EVALS else [], FIGURE_FILES

rule demo:
    input: f"{RES}/results.md"

rule gen_masks:
    input: STORES

rule pretrain:
    input: PRETRAINS

rule finetune:
    input: FINETUNES

rule evaluate:
    input: EVALS


rule demo_data:
    output: expand(f"{DEMO}/annotations/{{name}}.json", name=["train", "val"])
    params: sizes=flags(**{k: v for k, v in config["demo_data"].items() if k != "dir"})
    shell: "sp demo-data {DEMO} {params.sizes}"


rule check_labels:
    input: [demo_input(ann) or ann for ann, _, _ in LABEL_CHECKS]  # demo files: made by rule demo_data
    output: touch(LABELS_CHECKED)
    params: cmd=check_labels_cmd
    shell: "{params.cmd}"


# Markers (*.done) rather than directory outputs: Snakemake deletes the outputs of a failed job, and the
# part stores must survive a crash so that rerunning resumes them.
rule gen_masks_shard:
    input: lambda w: demo_input(STORE_DATA[w.store]["unlabeled_images"])
    output: touch(f"{CACHE}/stores/{{store}}.part{{i}}.done")
    threads: THREADS
    resources:
        gpu=min(GPUS, 1),
        mem_mb=8000,
    params: cmd=gen_masks_cmd
    shell: "OMP_NUM_THREADS={threads} {params.cmd}"

rule merge_store:
    input: expand(f"{CACHE}/stores/{{{{store}}}}.part{{i}}.done", i=range(NSHARDS))
    output: touch(f"{CACHE}/stores/{{store}}.zarr.done")
    params: store=lambda w: f"{CACHE}/stores/{w.store}.zarr", parts=lambda w: f"{CACHE}/stores/{w.store}.part*-of-*.zarr"
    # rerun after the parts were merged and removed (say, the rule's inputs changed): keep the merged store
    shell:
        "if ls -d {params.parts} >/dev/null 2>&1; then rm -rf {params.store} && sp store merge {params.store} "
        "--remove-parts; else sp store info {params.store} >/dev/null; fi"


# Class-agnostic AP of the pseudo masks (Table 6 of the paper) and an overlay grid, for stores with a ground truth
rule store_quality:
    input: f"{CACHE}/stores/{{store}}.zarr.done", lambda w: demo_input(STORE_DATA[w.store]["unlabeled_gt"]), LABELS_CHECKED
    output: f"{CACHE}/stores/{{store}}.quality.json"
    params:
        store=lambda w: f"{CACHE}/stores/{w.store}.zarr", skip_bad=flags(skip_bad=SKIP_BAD),
        gt=lambda w: STORE_DATA[w.store]["unlabeled_gt"], images=lambda w: STORE_DATA[w.store]["unlabeled_images"]
    shell:
        "sp eval-masks {params.store} --gt {params.gt} --out {output} {params.skip_bad} && "
        "sp viz {params.store} --images {params.images} --out {params.store}.overlays -n 16"

rule pretrain_run:
    input: lambda w: f"{CACHE}/stores/{PRETRAIN_SETTINGS[w.key]['store']}.zarr.done"
    output: f"{CACHE}/pretrain/{{key}}/seed{{seed}}/final.pth"
    threads: THREADS
    resources:
        gpu=GPUS,
        mem_mb=16000,
    params: sp=sp(int(config["nproc_per_node"])), cmd=pretrain_cmd
    shell: "OMP_NUM_THREADS={threads} {params.sp} {params.cmd}"

rule split_labels:
    input: config["train_ann"], LABELS_CHECKED
    output: f"{RES}/splits/{{stem}}.{{seed}}@{{percent}}_labeled.json"
    params: out=f"{RES}/splits"
    shell: "sp split {input[0]} --out {params.out} --percent {wildcards.percent} --seed {wildcards.seed}"

rule finetune_run:
    input:
        ann=lambda w: train_ann(w.run, w.seed),
        checked=LABELS_CHECKED,
        init=lambda w: pretrained(RUNS[w.run]["init"], int(w.seed)) if RUNS[w.run].get("init") else [],
    output: f"{RES}/finetune/{{run}}/seed{{seed}}/final.pth", f"{RES}/finetune/{{run}}/seed{{seed}}/eval.json"
    threads: THREADS
    resources:
        gpu=GPUS,
        mem_mb=16000,
    params: sp=sp(int(config["nproc_per_node"])), cmd=finetune_cmd
    shell: "OMP_NUM_THREADS={threads} {params.sp} {params.cmd}"

rule results_table:
    input:
        evals=EVALS,
        quality=QUALITY,
    output: f"{RES}/results.md", f"{RES}/results.json"
    params: cmd=table_cmd
    shell: "{params.cmd}"

rule evaluate_pretrain:
    input: lambda w: pretrained(w.prun, int(w.seed))
    output: f"{RES}/eval_pretrain/{{prun}}/seed{{seed}}.json"
    threads: THREADS
    shell:
        "OMP_NUM_THREADS={threads} sp evaluate {input} --ann {config[val_ann]} --images {config[val_images]} "
        "--out {output} --workers 0 --device {config[device]}"

rule pretrained_table:
    input: PRETRAIN_EVALS
    output: f"{RES}/results_pretrained.md"
    params: names=",".join(USED_PRETRAIN)
    shell: "sp table {input} --names {params.names} --out {RES}/results_pretrained --decimals {config[table_decimals]}"

rule kernel_maps:
    input: [finetuned(r) for r in FIGURES.get("kernel_maps", [])] + [pretrained(p) for p in FIGURES.get("kernel_maps_pretrain", [])]
    output: f"{RES}/figures/kernel_maps.png"
    params: names=",".join(FIGURES.get("kernel_maps", []) + [f"pretrain:{p}" for p in FIGURES.get("kernel_maps_pretrain", [])])
    threads: THREADS
    shell: "OMP_NUM_THREADS={threads} sp kernel-maps {input} --images {config[val_images]} --names {params.names} --out {output} --workers 0 --device {config[device]}"

rule compare:
    input: [finetuned(r) for r in FIGURES.get("compare", [])]
    output: f"{RES}/figures/compare.png"
    params: names=",".join(FIGURES.get("compare", [])), files=flags(files=",".join(FIGURES.get("compare_files", [])))
    threads: THREADS
    shell:
        "OMP_NUM_THREADS={threads} sp compare {input} --images {config[val_images]} --ann {config[val_ann]} "
        "--names {params.names} {params.files} --out {output} --workers 0 --device {config[device]}"

rule pretrain_losses:
    input: [pretrained(p) for p in USED_PRETRAIN]
    output: f"{RES}/figures/pretrain_losses.png"
    params: dirs=lambda w, input: " ".join(os.path.dirname(f) for f in input), names=",".join(USED_PRETRAIN)
    shell: "sp plot-losses {params.dirs} --names {params.names} --out {output}"
