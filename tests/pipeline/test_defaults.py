"""Every stage setting has one default, its settings dataclass's: `sp` with an option left out, the workflow with
a config key left out and config/config.yaml agree with it (docs/defaults.md)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli_common import resolve_device, settings_defaults
from pipeline.workflow_defaults import workflow_defaults
from stages.finetune import FinetuneConfig
from stages.gen_masks import GenerationSettings, RunOptions
from stages.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
runner = CliRunner()

# The stage keys config/config.yaml sets, each with why. The demo's overrides differ from the stage default;
# the written-out keys equal it.
DEMO_OVERRIDES = {
    "gen_masks.image_size": "a small backbone input, for CPU", "gen_masks.max_size": "with image_size",
    "small_models": "CPU-sized heads",
    **{f"pretrain_{key}": "a pre-training of minutes on CPU"
       for key in ("epochs", "batch_size", "lr_steps", "warmup_steps", "image_size", "max_size")},
    **{f"finetune_{key}": "a fine-tuning of minutes on CPU"
       for key in ("epochs", "batch_size", "lr_steps", "warmup_steps", "image_size", "max_size")},
    "finetune_eval_at": "the early_epochs columns of the demo's table",
}
WRITTEN_OUT = {"finetune_rotate": "the experiments' commands have it as `--rotate 0` (their text must not change)"}
# Flags of the workflow's commands that come from its own keys (paths, seeds, devices, the rows), not from stage
# settings: they need not be the option's default.
# `sp pretrain` options whose default (None) is the model's: for K-Net, the workflow's default model, PretrainConfig's.
MODEL_DEFAULTS = {"--prompt": settings_defaults(PretrainConfig).prompt.mode,
                  "--kernel-loss-weight": settings_defaults(PretrainConfig).kernel_loss_weight}
WORKFLOW_FLAGS = {"--store", "--shard", "--image-list", "--images", "--out", "--resume", "--overwrite", "--workers",
                  "--device", "--seed", "--train-ann", "--train-images", "--val-ann", "--val-images", "--init",
                  "--model", "--class-agnostic", "--lr", "--repeat", "--skip-bad"}


class Captured(Exception):
    """Raised by a stand-in for a stage function, with the arguments the command gave it."""


def capture(monkeypatch, module, name):
    def stand_in(*args, **kwargs):
        raise Captured(args, kwargs)
    monkeypatch.setattr(module, name, stand_in)


def invoke(args) -> tuple:
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Captured), result.output
    return result.exception.args


def test_gen_masks_without_options_makes_the_default_store(monkeypatch, tmp_path):
    import stages.gen_masks

    capture(monkeypatch, stages.gen_masks, "generate")
    (_, _, settings, options), kwargs = invoke(["gen-masks", str(tmp_path), "--store", str(tmp_path / "s.zarr")])
    assert settings == GenerationSettings()
    assert settings.refine.method == "none"  # the paper's generator (experiments/README.md, Penn-Fudan)
    assert options == RunOptions(device=resolve_device("auto"))
    assert kwargs["backbone_weights"] is not None  # the default backbone's weights install with the project


def test_import_coco_without_options_uses_the_generation_defaults(monkeypatch, tmp_path):
    import stages.import_coco

    capture(monkeypatch, stages.import_coco, "import_coco")
    (tmp_path / "a.json").write_text("{}")
    _, kwargs = invoke(["store", "import-coco", str(tmp_path / "a.json"), "--images", str(tmp_path), "--store",
                        str(tmp_path / "s.zarr")])
    gen = GenerationSettings()
    assert (kwargs["backbone"], kwargs["image_size"], kwargs["max_size"]) == (gen.backbone, gen.image_size,
                                                                             gen.max_size)
    assert kwargs["options"] == RunOptions(device=resolve_device("auto")) and kwargs["backbone_weights"] is not None


def test_pretrain_without_options_runs_the_default_config(monkeypatch, tmp_path):
    import stages.pretrain

    capture(monkeypatch, stages.pretrain, "pretrain")
    (cfg,), _ = invoke(["pretrain", "--store", str(tmp_path / "s.zarr"), "--images", str(tmp_path), "--out",
                        str(tmp_path / "run")])
    assert cfg.backbone_weights is not None
    assert cfg == PretrainConfig(store=tmp_path / "s.zarr", images=tmp_path, out=tmp_path / "run",
                                 backbone_weights=cfg.backbone_weights, device=resolve_device("auto"))


def test_finetune_without_options_runs_the_default_config(monkeypatch, tmp_path):
    import stages.finetune

    capture(monkeypatch, stages.finetune, "finetune")
    (tmp_path / "a.json").write_text("{}")
    paths = dict(train_ann=tmp_path / "a.json", train_images=tmp_path, val_ann=tmp_path / "a.json",
                 val_images=tmp_path, out=tmp_path / "run")
    (cfg,), _ = invoke(["finetune", *[a for key, path in paths.items() for a in (f"--{key.replace('_', '-')}",
                                                                                 str(path))]])
    assert cfg.backbone_weights is not None
    assert cfg == FinetuneConfig(**paths, backbone_weights=cfg.backbone_weights, device=resolve_device("auto"))


def test_every_model_defaults_to_the_pseudo_masks_backbone():
    """The stored seed features come from the generation backbone, and fine-tuning loads the pre-trained model."""
    backbone = GenerationSettings().backbone
    assert settings_defaults(PretrainConfig).model.backbone == backbone == settings_defaults(FinetuneConfig).backbone


@pytest.mark.parametrize("command", ["gen-masks", "store import-coco", "pretrain", "finetune"])
def test_every_option_is_explained_and_shows_its_default(command):
    group = typer.main.get_command(app)
    for word in command.split():
        group = group.commands[word]
    for param in group.params:
        if param.param_type_name == "option":
            assert param.help and param.show_default is not False, f"sp {command} {param.opts[0]}"


def flat(config: dict) -> dict:
    """{key: value} of a config's stage settings, gen_masks' as gen_masks.KEY."""
    out = {k: v for k, v in config.items() if k != "gen_masks"}
    return {**out, **{f"gen_masks.{k}": v for k, v in config.get("gen_masks", {}).items()}}


def test_config_yaml_sets_only_the_demos_deliberate_overrides():
    defaults = flat(workflow_defaults())
    config = flat(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    stage_keys = {key for key in config if key in defaults}
    assert stage_keys == set(DEMO_OVERRIDES) | set(WRITTEN_OUT), "list a key config.yaml sets here, with why"
    assert not [key for key in DEMO_OVERRIDES if config[key] == defaults[key]], "equal to the default: leave it out"
    assert all(config[key] == defaults[key] for key in WRITTEN_OUT)


def workflow_commands(tmp_path: Path, config: dict) -> list[list[str]]:
    """The `sp` commands of `snakemake -n -p -F all` with `config` as config/config.yaml itself (not laid over
    it, so that it can leave keys out), split into words."""
    (tmp_path / "workflow" / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", tmp_path / "workflow" / "Snakefile")
    (tmp_path / "workflow" / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run([SNAKEMAKE, "--snakefile", str(tmp_path / "workflow" / "Snakefile"), "--directory",
                           str(tmp_path / "work"), "-n", "-p", "-F", "all"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.removeprefix("Shell command: ") for line in done.stdout.splitlines()
             if line.startswith("Shell command: ")]
    return sorted(shlex.split(line.split("OMP_NUM_THREADS=1 ")[-1]) for line in lines)


def flag_values(words: list[str]) -> dict[str, list]:
    """{--flag: [value, ...]} of one command line; a bare flag has the value True."""
    out = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            bare = i + 1 == len(words) or words[i + 1].startswith("--")
            out.setdefault(word, []).append(True if bare else words[i + 1])
    return out


def test_the_workflow_gives_a_left_out_key_the_commands_default(tmp_path):
    """Without stage keys in its config, the workflow passes each stage flag at the command's own default; and a
    config spelling out every default gives the same commands (the same store and run names)."""
    full = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    stage_keys = set(workflow_defaults())
    bare = {k: v for k, v in full.items() if k not in stage_keys}
    bare["stores"] = [store for store in full["stores"] if set(store) == {"name"}]  # not the demo's overridden ones
    commands = workflow_commands(tmp_path / "bare", bare)
    cli = typer.main.get_command(app)
    checked = {}
    for words in commands:
        if words[0] != "sp" or words[1] not in ("gen-masks", "pretrain", "finetune"):
            continue
        command = cli.commands[words[1]]
        ctx = typer.Context(command)
        options = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for flag, values in flag_values(words).items():
            if flag in WORKFLOW_FLAGS:
                continue
            param = options[flag]
            given = values[0] if param.is_flag else param.process_value(ctx, values if param.multiple else values[0])
            default = param.get_default(ctx)
            if default is None and words[1] == "pretrain":
                given, default = getattr(given, "value", given), MODEL_DEFAULTS[flag]
            assert given == default, f"{words[1]} {flag}: {values}, the default is {default}"
            checked.setdefault(words[1], set()).add(flag)
    assert {"--method", "--backbone", "--image-size", "--refine"} <= checked["gen-masks"]
    assert {"--epochs", "--prompt", "--kernel-loss-weight"} <= checked["pretrain"]
    assert {"--epochs", "--lr-steps", "--rotate", "--frozen-stages"} <= checked["finetune"]
    assert workflow_commands(tmp_path / "spelled", {**bare, **workflow_defaults()}) == commands


@pytest.mark.parametrize("command", ["gen-masks", "pretrain", "finetune"])
def test_the_defaults_page_shows_each_commands_defaults(command):
    """docs/defaults.md's table of COMMAND: every default written as a value is the option's."""
    sections = (REPO / "docs" / "defaults.md").read_text().split("\n## ")
    section = next(text for text in sections if f"`sp {command}`" in text.splitlines()[0])
    options = {param.opts[0]: param for param in typer.main.get_command(app).commands[command].params}
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| `--")]
    shown = {row[0].strip("`"): row[2].strip("`") for row in rows if re.fullmatch(r"`[^`]+`", row[2])}
    for option, value in shown.items():
        default = options[option].default
        default = getattr(default, "value", default)
        assert value == (", ".join(map(str, default)) if isinstance(default, list) else str(default)), option
    assert len(shown) >= 10
