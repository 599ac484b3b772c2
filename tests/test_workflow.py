"""The Snakemake workflow: DAGs of every target, store reuse by settings hash, and a complete demo run."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.workflow_defaults import layered_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")


def snakemake(workdir: Path, *args, config: dict | None = None, dry: bool = True, defaults: bool = True):
    """Run the workflow in `workdir` with `config` laid over config/config.yaml (defaults=False: `config` alone
    as the --configfile, so that the Snakefile itself lays it over config.yaml and the files it extends)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text()) if defaults else {}
    cfg.update(config or {})
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", "2", *(["-n"] if dry else []), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


PATH_KEYS = ("unlabeled_images", "unlabeled_list", "unlabeled_gt", "import_ann", "train_ann", "train_images", "val_ann",
             "val_images")


def experiment(name: str) -> dict:
    """experiments/NAME.yaml with the files it extends laid under it and its data paths made absolute, for a
    workflow run in another folder (paths under results/ stay relative: an earlier command of the experiment
    makes them there, e.g. the held-apart split of a *_select.yaml)."""
    config = layered_config(REPO / "experiments" / f"{name}.yaml")

    def absolute(entry: dict) -> dict:
        return {k: str((REPO / v).resolve()) if k in PATH_KEYS and v and not v.startswith("results/") else v
                for k, v in entry.items()}

    return {**absolute(config), "stores": [absolute(store) for store in config.get("stores", [])]}


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of snakemake's output as {rule: count}."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


STAGE1 = {"demo_data": 1, "gen_masks_shard": 2, "merge_store": 1}  # stage 1 reads no labels
TRAINING = {**STAGE1, "check_labels": 1, "pretrain_run": 1, "finetune_run": 2}
BOTH_STORES = {"gen_masks_shard": 4, "merge_store": 2, "store_quality": 2}  # + the random backbone's, only scored


@pytest.mark.parametrize("target, expected", [
    ("gen_masks", {**STAGE1, **BOTH_STORES, "store_quality": 0}),
    ("pretrain", {**STAGE1, "pretrain_run": 1}),
    ("finetune", TRAINING),
    ("evaluate", TRAINING),  # a fine-tuning run evaluates its last epoch itself (eval.json)
    ("all", {**TRAINING, **BOTH_STORES, "results_table": 1}),
    ("demo", {**TRAINING, **BOTH_STORES, "results_table": 1}),
])
def test_dry_run_builds_the_expected_dag(tmp_path, target, expected):
    counts = job_counts(snakemake(tmp_path, target))
    counts.pop(target, None)  # the target rule itself
    assert counts == {rule: n for rule, n in expected.items() if n}


def test_the_low_data_experiment_has_every_row_and_seed(tmp_path):
    """Two stores, six pre-training runs and eight fine-tuning rows, each for both seeds."""
    experiment = yaml.safe_load((REPO / "experiments" / "low_data.yaml").read_text())
    counts = job_counts(snakemake(tmp_path, "all", config=experiment))
    assert counts == {"demo_data": 1, "check_labels": 1, "gen_masks_shard": 4, "merge_store": 2, "store_quality": 2, "pretrain_run": 12,
                      "finetune_run": 16, "results_table": 1, "all": 1}


def test_the_real_data_experiment_has_every_table_and_figure(tmp_path, coco_subset):
    """experiments/coco_subset.yaml: 19 rows x 3 seeds from one pre-training per setting, Table 6 of every
    pre-trained K-Net, the 30 % split, and the figures."""
    counts = job_counts(snakemake(tmp_path, "all", config=experiment("coco_subset")))
    assert counts == {"check_labels": 1, "gen_masks_shard": 4, "merge_store": 2, "store_quality": 2, "pretrain_run": 9,
                      "split_labels": 1, "finetune_run": 57, "results_table": 1, "evaluate_pretrain": 9,
                      "pretrained_table": 1, "kernel_maps": 1, "compare": 1, "pretrain_losses": 1, "all": 1}


@pytest.mark.parametrize("name, expected", [
    # Table 2 on Penn-Fudan: 19 rows (5 or 3 seeds: 79 runs) from 7 of the shared catalog's pre-training runs
    ("pennfudan", {"check_labels": 1, "gen_masks_shard": 8, "merge_store": 4, "store_quality": 3, "pretrain_run": 7,
                   "split_labels": 10, "finetune_run": 79, "results_table": 1, "compare": 1, "pretrain_losses": 1,
                   "all": 1}),
    # the pre-training scale study: 17 rows x 3 seeds at 20 labels, 17 pre-training runs on 11 stores
    ("pretrain_scale", {"check_labels": 1, "gen_masks_shard": 22, "merge_store": 11, "store_quality": 8,
                        "pretrain_run": 17, "split_labels": 3, "finetune_run": 51, "results_table": 1,
                        "pretrain_losses": 1, "all": 1}),
    # K-Net SP's pre-training chosen on held-apart train photos: 4 rows x 3 seeds, 3 pre-trainings on 3 stores
    ("knet_sp_select", {"check_labels": 1, "gen_masks_shard": 6, "merge_store": 3, "store_quality": 3,
                        "pretrain_run": 3, "split_labels": 3, "finetune_run": 12, "results_table": 1,
                        "pretrain_losses": 1, "all": 1}),
])
def test_experiments_share_one_catalog_and_make_only_what_their_rows_use(tmp_path, coco_subset, name, expected):
    if not (coco_subset.parent / "pennfudan" / "val" / "annotations.json").is_file():
        pytest.skip(f"no Penn-Fudan data at {coco_subset.parent / 'pennfudan'}")
    config = experiment(name)
    for key in ("train_ann", "val_ann"):  # a held-apart split (`sp split`): its files need only exist for a dry run
        if not Path(config[key]).is_absolute():
            (tmp_path / config[key]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / config[key]).write_text("{}")
    assert job_counts(snakemake(tmp_path, "all", config=config)) == expected


def test_a_config_extends_others_in_layers(tmp_path):
    """config.yaml < the files a config extends (each over its own bases) < the config itself < --config."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"pretrain_epochs": 3, "finetune_epochs": 5,
                                                        "finetune_lr_steps": [4]}))
    (tmp_path / "middle.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "finetune_epochs": 6}))
    config = {"extends": ["middle.yaml"], "finetune_lr_steps": [2]}
    out = snakemake(tmp_path, "finetune", "-p", config=config, defaults=False)
    assert "pretrain --store" in out and "--epochs 3 " in out.split("pretrain --store")[1]  # base over config.yaml
    finetune = [line for line in out.splitlines() if "sp finetune" in line]
    assert finetune and all("--epochs 6 " in line and "--lr-steps 2 " in line for line in finetune)
    out = snakemake(tmp_path, "finetune", "-p", "--config", "finetune_epochs=7", config=config, defaults=False)
    assert all("--epochs 7 " in line for line in out.splitlines() if "sp finetune" in line)  # the command line wins
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"extends": "middle.yaml"}))
    with pytest.raises(AssertionError, match="is a cycle"):
        snakemake(tmp_path, "finetune", config=config, defaults=False)
    with pytest.raises(AssertionError, match="config extends nowhere.yaml, which is neither in"):
        snakemake(tmp_path, "finetune", config={"extends": "nowhere.yaml"}, defaults=False)


def test_a_store_may_import_a_coco_json(tmp_path):
    """`method: import` makes a store of a JSON's masks (ground truth as an upper bound, another tool's pseudo
    labels) with `sp store import-coco`, sharded like stage 1 and named by the JSON's content."""
    (tmp_path / "gt.json").write_text("{}")
    store = {"name": "gt", "method": "import", "import_ann": "gt.json", "unlabeled_images": "photos",
             "unlabeled_list": "", "unlabeled_gt": ""}
    config = {"stores": [store], "pretrain_runs": [{"name": "p", "store": "gt"}],
              "finetune_runs": [{"name": "r", "model": "knet", "init": "p"}]}
    out = snakemake(tmp_path, "all", "-p", config=config)
    assert out.count("sp store import-coco gt.json --images photos --store results/stores/") == 2
    assert "--shard 0/2" in out and "--shard 1/2" in out and "sp gen-masks" not in out
    first = re.search(r"results/stores/([0-9a-f]{12})\.zarr", out).group(1)
    (tmp_path / "gt.json").write_text('{"images": []}')  # other masks: another store
    assert first not in snakemake(tmp_path, "all", "-p", config=config)
    with pytest.raises(AssertionError, match="`method: import` and `import_ann: FILE` go together"):
        snakemake(tmp_path, "all", config={**config, "stores": [{**store, "import_ann": ""}]})


def test_runs_with_equal_settings_share_their_jobs(tmp_path):
    config = {"stores": [{"name": "a"}, {"name": "b", "max_masks": 20}],  # b's override is the default: same store
              "pretrain_runs": [{"name": "p", "store": "a"}, {"name": "q", "store": "b", "prompt": "cosine"}],
              "finetune_runs": [{"name": "from_p", "model": "knet", "init": "p"},
                                {"name": "from_q", "model": "knet", "init": "q"}],
              "seeds": [0, 1]}
    counts = job_counts(snakemake(tmp_path, "finetune", config=config))
    assert counts["merge_store"] == 1 and counts["pretrain_run"] == 2 and counts["finetune_run"] == 4


def test_pretraining_runs_take_a_model(tmp_path):
    """model: knet is the default (and keeps the K-Net runs' paths); another model is another run, pre-trained
    and fine-tuned with --model."""
    config = {"pretrain_runs": [{"name": "k", "store": "saliency"},
                                {"name": "k2", "store": "saliency", "model": "knet"},
                                {"name": "m", "store": "saliency", "model": "mask2former"}],
              "finetune_runs": [{"name": "knet_sp", "model": "knet", "init": "k2"},
                                {"name": "m2f_sp", "model": "mask2former", "init": "m"},
                                {"name": "m2f_scratch", "model": "mask2former"}]}
    out = snakemake(tmp_path, "finetune", "-p", config=config)
    counts = job_counts(out)
    assert counts["pretrain_run"] == 2 and counts["finetune_run"] == 3
    assert out.count("pretrain --store") == 2 and "--model mask2former --small" in out
    assert out.count("--model mask2former") == 3  # one pre-training, two fine-tuning runs


def test_mask_rcnn_pretraining_runs_take_droploss_and_no_prompts(tmp_path):
    """model: maskrcnn pre-trains without prompts (--prompt none --kernel-loss-weight 0) and with DropLoss off (the
    default: the run without the key is the run with drop_loss false), on, or on at its own IoU; a query model's
    prompt, a DropLoss key on K-Net or an IoU with DropLoss off is an error naming the run."""
    runs = {"default": {}, "plain": {"drop_loss": False}, "drop": {"drop_loss": True},
            "iou": {"drop_loss": True, "drop_loss_iou": 0.1}}
    config = {"pretrain_runs": [dict(name=name, store="saliency", model="maskrcnn", **keys) for name, keys in runs.items()],
              "finetune_runs": [{"name": f"m_{p}", "model": "maskrcnn", "init": p} for p in runs]}
    commands = [line for line in snakemake(tmp_path, "finetune", "-p", config=config).splitlines()
                if " pretrain --store" in line]
    assert len(commands) == 3 and all("--model maskrcnn" in c and "--prompt none --kernel-loss-weight 0" in c
                                      for c in commands)
    assert sum("--no-drop-loss" in c for c in commands) == 1 and sum("--drop-loss-iou 0.1" in c for c in commands) == 1
    assert sum(" --drop-loss " in c and "--drop-loss-iou" not in c for c in commands) == 1
    for entry, message in [({"name": "p", "model": "maskrcnn", "prompt": "cosine"}, "takes no prompt"),
                           ({"name": "p", "drop_loss": False}, "are Mask R-CNN's settings"),
                           ({"name": "p", "model": "maskrcnn", "drop_loss_iou": 0.1}, "p: drop_loss_iou is DropLoss's")]:
        with pytest.raises(AssertionError, match=message):
            snakemake(tmp_path, "all", config={"pretrain_runs": [entry], "finetune_runs": []})


def test_min_mask_area_is_a_run_of_its_own_and_zero_is_the_run_without_it(tmp_path):
    """min_mask_area reaches `sp pretrain --min-mask-area` as a pre-training of its own; 0 (every mask) is the run
    without the key, so finished runs keep their folders."""
    config = {"pretrain_runs": [{"name": "all", "store": "saliency"},
                                {"name": "zero", "store": "saliency", "min_mask_area": 0},
                                {"name": "large", "store": "saliency", "min_mask_area": 0.01}],
              "finetune_runs": [{"name": f"k_{p}", "model": "knet", "init": p} for p in ("all", "zero", "large")]}
    commands = [line for line in snakemake(tmp_path, "finetune", "-p", config=config).splitlines()
                if " pretrain --store" in line]
    assert len(commands) == 2 and sum("--min-mask-area 0.01" in c for c in commands) == 1
    assert sum("--min-mask-area" in c for c in commands) == 1


def test_random_boxes_is_a_store_of_its_own_and_the_default_keeps_the_name(tmp_path):
    """random_boxes reaches `sp gen-masks --random-boxes` for a random store, as a store of its own; spelling out
    the default 20 names the same store as leaving it out (stores made before the key existed keep their names);
    on a saliency store it is refused, naming the store."""
    config = {"stores": [{"name": "boxes", "method": "random"},
                         {"name": "boxes_20", "method": "random", "random_boxes": 20},
                         {"name": "boxes_3", "method": "random", "random_boxes": 3}],
              "pretrain_runs": [{"name": f"sp_{s}", "store": s} for s in ("boxes", "boxes_20", "boxes_3")],
              "finetune_runs": [{"name": f"k_{s}", "model": "knet", "init": f"sp_{s}"}
                                for s in ("boxes", "boxes_20", "boxes_3")]}
    commands = [line for line in snakemake(tmp_path, "finetune", "-p", config=config).splitlines()
                if "sp gen-masks" in line and "--shard 0/" in line]
    assert len(commands) == 2 and all("--method random" in c for c in commands)
    assert sorted(c.split("--random-boxes ")[1].split()[0] for c in commands) == ["20", "3"]
    config["stores"].append({"name": "saliency_3", "random_boxes": 3})
    with pytest.raises(AssertionError, match="saliency_3: random_boxes is the count of `method: random` stores"):
        snakemake(tmp_path, "finetune", "-p", config=config)


def test_a_shared_cache_per_store_images_repeat_and_a_split_per_seed(tmp_path):
    """cache: stores and pre-trainings live there (another experiment naming it reuses them); a store may read its
    own images without ground truth; `repeat` reaches sp finetune; with split_per_seed each fine-tuning seed
    trains on its own split."""
    (tmp_path / "more.txt").write_text("train/a.jpg\n")
    config = {"cache": "shared", "stores": [{"name": "saliency"},
                                           {"name": "more", "unlabeled_images": "elsewhere",
                                            "unlabeled_list": "more.txt", "unlabeled_gt": ""}],
              "pretrain_runs": [{"name": "sp", "store": "saliency"}, {"name": "sp_more", "store": "more"}],
              "finetune_runs": [{"name": "r", "model": "knet", "init": "sp_more", "percent": 25, "repeat": 4},
                                {"name": "r0", "model": "knet", "init": "sp"}],
              "seeds": [0, 1], "pretrain_seeds": [0], "split_per_seed": True, "finetune_rotate": 9}
    out = snakemake(tmp_path, "all", "-p", config=config)
    counts = job_counts(out)
    assert counts["merge_store"] == 2 and counts["store_quality"] == 1  # only the store with a ground truth
    assert counts["split_labels"] == 2 and counts["finetune_run"] == 4
    assert "sp gen-masks elsewhere --store shared/stores/" in out and "--image-list more.txt" in out
    assert "--images elsewhere --out shared/pretrain/" in out  # pre-training reads the store's images
    assert "train.1@25_labeled.json" in out and "train.2@25_labeled.json" in out  # seeds 0, 1: splits 1, 2
    assert out.count("--repeat 4") == 2 and out.count("--rotate 9") == 4
    assert "results/stores" not in out and "results/pretrain" not in out


def test_a_run_may_have_its_own_schedule(tmp_path):
    """epochs / lr_steps of a fine-tuning run override finetune_epochs / finetune_lr_steps for that run only."""
    config = {"finetune_runs": [{"name": "short", "model": "knet"},
                                {"name": "long", "model": "knet", "epochs": 16, "lr_steps": [12, 15]}],
              "finetune_epochs": 8, "finetune_lr_steps": [6, 7]}
    commands = [line for line in snakemake(tmp_path, "finetune", "-p", config=config).splitlines()
                if "sp finetune" in line]
    schedule = {}  # run name -> its "--epochs ... --lr-steps ..." flags
    for command in commands:
        run = re.search(r"finetune/(\w+)/seed", command).group(1)
        schedule[run] = re.search(r"--epochs \d+ .*--lr-steps \d+ --lr-steps \d+", command).group(0)
    assert schedule["short"].startswith("--epochs 8 ") and schedule["short"].endswith("--lr-steps 6 --lr-steps 7")
    assert schedule["long"].startswith("--epochs 16 ") and schedule["long"].endswith("--lr-steps 12 --lr-steps 15")


@pytest.mark.parametrize("section, entry, message", [
    ("pretrain_runs", {"name": "p", "promt": "cosine"}, "only the keys"),
    ("finetune_runs", {"name": "r", "model": "knet", "init": "nowhere"}, "unknown pre-training run nowhere"),
    ("finetune_runs", {"name": "r", "model": "mask2former", "init": "sp"}, "r fine-tunes mask2former from sp, a knet"),
    ("stores", {"method": "random"}, "unique name"),
])
def test_config_errors_name_the_bad_entry(tmp_path, section, entry, message):
    with pytest.raises(AssertionError, match=message):
        snakemake(tmp_path, "all", config={section: [entry]})


def test_shards_follow_the_config(tmp_path):
    counts = job_counts(snakemake(tmp_path, "gen_masks", config={"shards": 5}))
    assert counts["gen_masks_shard"] == 10 and counts["merge_store"] == 2  # the demo's two stores, 5 parts each


TINY = {"demo_data": {"dir": "demo", "num_train": 8, "num_val": 4},
        "gen_masks": {"method": "saliency", "backbone": "efficientnet_lite0", "backbone_weights": "imagenet",
                      "image_size": 128, "max_size": 192, "min_score": 0.5, "max_masks": 10, "nms": "matrix"},
        "threads": 1, "pretrain_epochs": 1, "pretrain_batch_size": 8, "pretrain_image_size": 128,
        "pretrain_max_size": 192, "pretrain_warmup_steps": 2, "finetune_epochs": 1, "finetune_batch_size": 8,
        "finetune_image_size": 128, "finetune_max_size": 192, "finetune_warmup_steps": 2, "device": "cpu"}


def test_demo_runs_to_completion_then_does_nothing_and_reuses_the_store(tmp_path):
    out = snakemake(tmp_path, "demo", config=TINY, dry=False)
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| knet_sp | 1 |" in table and "| knet_scratch | 1 |" in table and "| saliency |" in table
    assert "| random_backbone |" in table  # the pseudo masks of random weights, scored beside the real ones
    assert "knet_sp" in out  # the table is printed at the end of the run
    assert job_counts(snakemake(tmp_path, "demo", config=TINY)) == {}  # a second run has nothing to do
    stores = sorted(p.name for p in (tmp_path / "results" / "stores").glob("*.zarr"))
    assert len(stores) == 2
    # a training setting changes: pre-training and what follows rerun, the masks do not
    counts = job_counts(snakemake(tmp_path, "demo", config={**TINY, "pretrain_epochs": 2}))
    assert "gen_masks_shard" not in counts and "merge_store" not in counts and counts["pretrain_run"] == 1
    assert counts["finetune_run"] == 1  # only the run initialised from pre-training
    # a generation setting changes: a new store
    counts = job_counts(snakemake(tmp_path, "demo", config={**TINY, "gen_masks": {**TINY["gen_masks"], "image_size": 160}}))
    assert counts["gen_masks_shard"] == 4 and counts["merge_store"] == 2  # both stores


def user_config_commands(tmp_path, name: str) -> list[str]:
    """The shell commands of `snakemake -n -p all --configfile config/NAME.yaml`, as a user runs it (the file over
    config/config.yaml), with empty placeholder files at the label paths it names."""
    config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    for key in ("train_ann", "val_ann"):
        (tmp_path / config[key]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / config[key]).write_text("{}")
    out = snakemake(tmp_path, "all", "-p", config=config, defaults=False)
    return [line.removeprefix("Shell command: ") for line in out.splitlines() if line.startswith("Shell command:")]


def test_the_paper_config_runs_the_papers_pipeline_and_nothing_of_the_demo(tmp_path):
    commands = user_config_commands(tmp_path, "paper_coco")
    assert not [c for c in commands if "demo" in c or "superpixel" in c or "--small" in c or "class-agnostic" in c]
    gen = [c for c in commands if "sp gen-masks" in c]
    assert len(gen) == 32 and all(
        "sp gen-masks data/coco/unlabeled2017 " in c and "--backbone resnet50 --backbone-weights "
        "data/weights/densecl_r50_imagenet_200ep.pth --image-size 800 --max-size 1333" in c and "--refine none" in c
        and "--device cuda" in c for c in gen)
    assert not [c for c in commands if "eval-masks" in c]  # unlabeled2017 has no labels to score the masks with
    pretrain = [c for c in commands if " pretrain --store" in c]
    assert len(pretrain) == 1 and "torchrun --standalone --nproc_per_node 8 -m pipeline.cli pretrain" in pretrain[0]
    assert ("--epochs 12 --batch-size 12 --lr-steps 8 --lr-steps 11 --warmup-steps 1000 --image-size 800 "
            "--max-size 1333 --prompt cosine --kernel-loss-weight 1.0" in pretrain[0])
    finetune = [c for c in commands if " finetune --train-ann" in c]
    assert len(finetune) == 6 and all("--epochs 48 " in c and "--lr-steps 36 --lr-steps 44" in c and
                                      "--eval-at 12 --eval-at 24 --eval-at 36" in c and "--rotate 9" in c and
                                      "--val-ann data/coco/annotations/instances_val2017.json" in c for c in finetune)
    splits = [c for c in commands if c.startswith("sp split")]
    assert sorted(c.split("--percent ")[1].split()[0] for c in splits) == ["10", "5"]
    assert sum("--init results/paper_coco/pretrain/" in c for c in finetune) == 2
    assert sum("--model maskrcnn" in c and "--lr 0.02" in c for c in finetune) == 2


def test_the_own_data_template_reads_only_the_users_paths(tmp_path):
    commands = user_config_commands(tmp_path, "own_data")
    assert commands and not [c for c in commands if "demo" in c]
    assert [c for c in commands if "sp gen-masks data/unlabeled " in c and "--refine none" in c]
    assert [c for c in commands if "sp check-labels data/labeled.json --images data/labeled" in c]
    finetune = [c for c in commands if c.startswith("OMP_NUM_THREADS=1 sp finetune")]
    assert len(finetune) == 9 and all("--train-ann data/labeled.json --train-images data/labeled --val-ann "
                                      "data/val.json --val-images data/val" in c for c in finetune)
