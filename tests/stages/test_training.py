"""The run folder policy shared by pre-training and fine-tuning: a folder holding another run is refused,
continued only when it matches, replaced only on request, and nothing but the run's own files is deleted."""
from pathlib import Path

import pytest

from stages.training import LoopConfig, MetricsLog, prepare_run_folder, read_checkpoint, save_checkpoint

SETTINGS = {"out": "run", "lr": 0.1, "batch_size": 2, "epochs": 4, "workers": 2}


def run_folder(tmp_path: Path, epoch: int = 2, kind: str = "sp-finetune", **args) -> Path:
    out = tmp_path / "run"
    out.mkdir(parents=True)
    save_checkpoint(out / "last.pth", {"kind": kind, "epoch": epoch, "args": {**SETTINGS, **args}})
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "epoch_001.pth").write_text("x")
    (out / "tb").mkdir()
    (out / "tb" / "events").write_text("x")
    (out / "mine.txt").write_text("not a run file")
    return out


def loop(out, **flags) -> LoopConfig:
    return LoopConfig(out=out, epochs=4, **flags)


def test_a_new_or_empty_folder_is_used_as_it_is(tmp_path):
    prepare_run_folder(loop(tmp_path / "new"), "sp-finetune", SETTINGS)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    prepare_run_folder(loop(tmp_path / "empty"), "sp-finetune", SETTINGS)


def test_a_file_as_out_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prepare_run_folder(loop(tmp_path / "run"), "sp-finetune", SETTINGS)


@pytest.mark.parametrize("flags, settings, message", [
    ({}, SETTINGS, "holds a run already (epoch_001.pth, last.pth, metrics.jsonl, tb); pass --resume"),
    ({"resume": True}, {**SETTINGS, "lr": 0.2}, "other settings (lr: run=0.1 now=0.2)"),
    ({"resume": True}, {**SETTINGS, "seed": 3}, "other settings (seed: run=None now=3)"),
])
def test_a_run_that_cannot_be_continued_is_refused_and_kept(tmp_path, flags, settings, message):
    out = run_folder(tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_run_folder(loop(out, **flags), "sp-finetune", settings)
    assert (out / "last.pth").exists() and (out / "tb" / "events").exists()


def test_resume_continues_the_same_settings_and_may_run_longer_not_shorter(tmp_path):
    out = run_folder(tmp_path, epoch=3)
    prepare_run_folder(loop(out, resume=True), "sp-finetune", {**SETTINGS, "workers": 0, "epochs": 9})
    with pytest.raises(ValueError, match="at epoch 3, past --epochs 2"):
        prepare_run_folder(LoopConfig(out=out, epochs=2, resume=True), "sp-finetune", SETTINGS)
    with pytest.raises(ValueError, match="holds a sp-pretrain run, not a sp-finetune one"):
        prepare_run_folder(loop(run_folder(tmp_path / "p", kind="sp-pretrain"), resume=True), "sp-finetune",
                           SETTINGS)


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path):
    out = run_folder(tmp_path)
    (out / "last.pth").unlink()
    prepare_run_folder(loop(out, resume=True), "sp-finetune", {**SETTINGS, "lr": 5})


def test_overwrite_deletes_the_run_files_only(tmp_path):
    out = run_folder(tmp_path)
    prepare_run_folder(loop(out, overwrite=True), "sp-finetune", SETTINGS)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_only_sp_checkpoints_are_read(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="--init .*a.pth is not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "a.pth", "--init")
    save_checkpoint(tmp_path / "b.pth", {"conv.weight": 1})
    with pytest.raises(ValueError, match="b.pth is not a checkpoint of `sp pretrain` or `sp finetune`"):
        read_checkpoint(tmp_path / "b.pth", "--init")


def test_the_log_tells_whether_an_epochs_end_was_recorded(tmp_path):
    """What a resumed run reads to decide whether to end (evaluate) the epoch of its checkpoint again: the record
    of epoch 2's end (step 20) is neither the last training record of epoch 2 (which carries epoch 1, the epoch
    trained) nor the resume record written at that step."""
    log = MetricsLog(tmp_path, enabled=True)
    log.write({"step": 0, "epoch": 0, "event": "start"})
    log.write({"step": 10, "epoch": 0, "loss": 1.0})
    log.write({"step": 10, "epoch": 1, "segm_AP": 3.0})
    log.write({"step": 20, "epoch": 1, "loss": 0.5})
    log.write({"step": 20, "epoch": 2, "event": "resume"})
    assert log.has_epoch_end(1, 10) and not log.has_epoch_end(2, 20)
    log.write({"step": 20, "epoch": 2, "segm_AP": 4.0})
    assert log.has_epoch_end(2, 20)
    assert not MetricsLog(tmp_path, enabled=False).has_epoch_end(2, 20)  # a process that keeps no log


def test_a_run_saved_before_a_setting_existed_resumes_with_that_settings_default(tmp_path):
    """A checkpoint written before `min_mask_area` existed trained on every mask: it resumes at 0 (the default),
    and is refused, naming the setting, when the resumed run asks for another value."""
    out = run_folder(tmp_path)
    prepare_run_folder(loop(out, resume=True), "sp-finetune", {**SETTINGS, "min_mask_area": 0.0, "init_reset": ()})
    with pytest.raises(ValueError, match=r"other settings \(min_mask_area: run=0.0 now=0.01\)"):
        prepare_run_folder(loop(out, resume=True), "sp-finetune", {**SETTINGS, "min_mask_area": 0.01})
