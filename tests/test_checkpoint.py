"""Resumable checkpoints without a model: which folders are written, kept and removed, what a checkpoint holds and
reads back, which run starts fresh or resumes from which step, and the refusals on the way."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file
from stylora.trainer import checkpoint as ckpt
from stylora.trainer.checkpoint import (
    MARKER,
    STATE_FILE,
    WEIGHTS_FILE,
    DamagedCheckpoint,
    RunCheckpoints,
    RunStart,
    check_finite,
    check_output_path,
    check_resumable,
    checkpoint_root,
    complete_checkpoints,
    load_checkpoint,
    non_finite,
    save_checkpoint,
    start_or_resume,
)
from stylora.trainer.config import LoraTrainConfig

STATE = {"optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3}}


def _steps(root) -> list[int]:
    return [s for s, _ in complete_checkpoints(root)]


def _save(root, step, keep=3, replace_all=False, value=1.0):
    return save_checkpoint(root, step, {"w": torch.full((2,), value)}, STATE, {"note": "x"}, keep=keep,
                           replace_all=replace_all)


# --- what a checkpoint holds ----------------------------------------------------------------------------------

def test_a_checkpoint_folder_holds_weights_state_info_and_the_marker_and_reads_back(tmp_path):
    folder = _save(tmp_path / "c", 7, value=2.5)
    assert folder == tmp_path / "c" / "step-00000007"
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, STATE_FILE, "info.json", MARKER])
    assert (folder / MARKER).read_text() == "7\n"
    assert json.loads((folder / "info.json").read_text()) == {"step": 7, "note": "x"}
    weights, state, info = load_checkpoint(folder)
    assert torch.equal(weights["w"], torch.tensor([2.5, 2.5]))
    assert state == STATE and info == {"step": 7, "note": "x"}
    assert not list((tmp_path / "c").glob(".step-*"))  # the temporary folder was renamed, not copied


def test_every_file_is_fsynced_before_the_marker_and_the_folders_after(tmp_path, monkeypatch):
    """Crash safety: the files' data reach the disk before COMPLETE is written, the checkpoint folder before it is
    renamed into place, and the parent folder (the rename itself) before the function returns."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    root = tmp_path / "c"
    _save(root, 3)
    names = [os.path.basename(p) for p in synced]
    assert sorted(names[:3]) == sorted([WEIGHTS_FILE, STATE_FILE, "info.json"])
    assert names[3].startswith(".step-00000003.tmp-")  # the folder, before its rename
    assert synced[4] == str(root) and len(synced) == 5


def test_old_file_names_are_read_and_the_new_ones_preferred(tmp_path):
    folder = _save(tmp_path / "c", 1)
    (folder / WEIGHTS_FILE).rename(folder / "trainable.safetensors")
    (folder / STATE_FILE).rename(folder / "state.pt")
    weights, state, _ = load_checkpoint(folder)
    assert torch.equal(weights["w"], torch.ones(2)) and state == STATE
    save_file({"w": torch.zeros(2)}, str(folder / WEIGHTS_FILE))  # both names there: the new one is read
    assert torch.equal(load_checkpoint(folder)[0]["w"], torch.zeros(2))


def test_non_finite_names_the_nan_and_inf_tensors_and_check_finite_refuses_them(tmp_path):
    weights = {"ok": torch.ones(2), "nan": torch.tensor([0.0, float("nan")]), "inf": torch.tensor([float("inf")]),
               "ints": torch.tensor([1, 2])}
    assert non_finite(weights) == ["nan", "inf"]
    check_finite({"ok": torch.ones(2)}, "fine")
    with pytest.raises(FloatingPointError, match=r"^ckpt: 2 trained tensor\(s\) hold NaN or inf \(e.g. nan\)"):
        check_finite(weights, "ckpt")
    with pytest.raises(FloatingPointError):
        save_checkpoint(tmp_path / "c", 1, weights, STATE, {})
    assert not (tmp_path / "c" / "step-00000001").exists()


# --- which folders are kept -----------------------------------------------------------------------------------

def test_keep_prunes_to_the_newest_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path / "one", step, keep=1)
        _save(tmp_path / "three", step, keep=3)
        _save(tmp_path / "all", step, keep=0)
    assert _steps(tmp_path / "one") == [4]
    assert _steps(tmp_path / "three") == [2, 3, 4]
    assert _steps(tmp_path / "all") == [1, 2, 3, 4]


def test_replace_all_removes_every_other_step_folder_complete_or_not_but_nothing_else(tmp_path):
    root = tmp_path / "c"
    for step in (5, 9):
        _save(root, step)
    (root / "step-00000007").mkdir()  # incomplete
    (root / "notes").mkdir()
    (root / "step-00000008").write_text("a file, not a checkpoint")
    final = _save(root, 2, replace_all=True)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-00000002", "step-00000008"]
    assert (final / MARKER).is_file()


def test_stale_temporary_folders_are_removed_and_a_rewritten_step_replaced(tmp_path):
    root = tmp_path / "c"
    _save(root, 4, value=1.0)
    (root / ".step-00000006.tmp-99999").mkdir()
    _save(root, 4, value=3.0)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]
    assert torch.equal(load_checkpoint(root / "step-00000004")[0]["w"], torch.full((2,), 3.0))


def test_complete_checkpoints_lists_step_folders_with_the_marker_oldest_first(tmp_path, caplog):
    root = tmp_path / "c"
    assert complete_checkpoints(root) == []  # no folder yet
    for step in (12, 3):
        _save(root, step, keep=0)
    (root / "step-00000005").mkdir()  # no marker: skipped with a warning
    (root / "step-00000006").write_text("")  # a file with a step's name
    (root / "step-7").mkdir()  # not eight digits
    (root / "step-7" / MARKER).write_text("7\n")
    (root / "other").mkdir()
    (root / "other" / MARKER).write_text("")
    with caplog.at_level(logging.WARNING):
        found = complete_checkpoints(root)
    assert found == [(3, root / "step-00000003"), (12, root / "step-00000012")]
    assert [r.getMessage() for r in caplog.records] == \
        [f"skipping incomplete checkpoint {root / 'step-00000005'} (no COMPLETE marker)"]


# --- damaged checkpoints --------------------------------------------------------------------------------------

def _damage(folder, what):
    if what == "marker":
        (folder / MARKER).unlink()
    elif what == "weights":
        (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:20])
    elif what == "nan":
        save_file({"w": torch.tensor([float("nan")])}, str(folder / WEIGHTS_FILE))
    elif what == "state":
        torch.save({"optimizer": {}}, folder / STATE_FILE)
    elif what == "state-list":
        torch.save([1, 2], folder / STATE_FILE)
    elif what == "info":
        (folder / "info.json").write_text(json.dumps({"step": "7"}))
    elif what == "info-list":
        (folder / "info.json").write_text("[7]")
    elif what == "info-json":
        (folder / "info.json").write_text("{")


@pytest.mark.parametrize(("what", "names"), [
    ("marker", "incomplete checkpoint"), ("weights", WEIGHTS_FILE), ("nan", WEIGHTS_FILE), ("state", STATE_FILE),
    ("state-list", STATE_FILE), ("info", "info.json"), ("info-list", "info.json"), ("info-json", "info.json")])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, what, names):
    folder = _save(tmp_path / "c", 7)
    _damage(folder, what)
    with pytest.raises(DamagedCheckpoint, match=names):
        load_checkpoint(folder)


# --- the output path and how a run starts ---------------------------------------------------------------------

def test_check_output_path_refuses_folders_files_as_parents_and_unwritable_places(tmp_path, monkeypatch):
    check_output_path(tmp_path / "new" / "deeper" / "o.safetensors")  # created later, under a writable folder
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output_path(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_output_path(tmp_path / "f" / "o.safetensors")

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode):  # root may write anywhere: the permission bits are played here
        return False if str(path).startswith(str(locked)) and mode & os.W_OK else real_access(path, mode)

    monkeypatch.setattr(ckpt.os, "access", access)
    with pytest.raises(PermissionError, match="the folder .*locked is not writable"):
        check_output_path(locked / "sub" / "o.safetensors", flag="--out")
    # An existing output in a writable folder may be replaced even when the file itself is read-only.
    (tmp_path / "ro.safetensors").write_text("")
    locked_file = tmp_path / "ro.safetensors"
    monkeypatch.setattr(ckpt.os, "access", lambda p, m: p != locked_file and real_access(p, m))
    check_output_path(locked_file)
    # Neither the file nor its folder writable: refused (the folder passes the earlier X_OK|W_OK test only).
    monkeypatch.setattr(ckpt.os, "access",
                        lambda p, m: m == os.W_OK | os.X_OK if p in (locked_file, tmp_path) else real_access(p, m))
    with pytest.raises(PermissionError, match=r"ro.safetensors is not writable"):
        check_output_path(locked_file)


def test_start_or_resume_fresh_overwrite_and_refusals(tmp_path):
    out = tmp_path / "o.safetensors"
    assert start_or_resume(out, resume=False, overwrite=False) == RunStart([], False)
    assert start_or_resume(out, resume=False, overwrite=True) == RunStart([], False)  # nothing to replace
    out.write_text("")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite to replace it"):
        start_or_resume(out, resume=False, overwrite=False)
    assert start_or_resume(out, resume=False, overwrite=True) == RunStart([], False)
    out.unlink()
    _save(checkpoint_root(out), 2)
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run"):
        start_or_resume(out, resume=False, overwrite=False)
    assert start_or_resume(out, resume=False, overwrite=True) == RunStart([], True)


def test_start_or_resume_lists_the_checkpoints_newest_first(tmp_path, caplog):
    out = tmp_path / "o.safetensors"
    root = checkpoint_root(out)
    assert root == tmp_path / "o.checkpoints"
    with caplog.at_level(logging.WARNING):
        assert start_or_resume(out, resume=True, overwrite=False) == RunStart([], False)
    assert "no complete checkpoint" in caplog.text
    for step in (2, 4, 6):
        _save(root, step)
    start = start_or_resume(out, resume=True, overwrite=False, steps=10)
    assert start == RunStart([(6, root / "step-00000006"), (4, root / "step-00000004"),
                              (2, root / "step-00000002")], False)


def test_resume_refuses_a_finished_output_and_asks_before_replacing_an_unfinished_one(tmp_path):
    out = tmp_path / "o.safetensors"
    root = checkpoint_root(out)
    out.write_text("")
    with pytest.raises(FileExistsError, match="already finished"):  # an output and no checkpoint
        start_or_resume(out, resume=True, overwrite=True)
    _save(root, 4)
    with pytest.raises(FileExistsError, match="already finished"):  # the last checkpoint is the last step
        start_or_resume(out, resume=True, overwrite=True, steps=4)
    # Checkpoints below `steps`: an unfinished run, resumed only when replacing its output is allowed.
    with pytest.raises(FileExistsError, match="pass --resume --overwrite"):
        start_or_resume(out, resume=True, overwrite=False, steps=5)
    assert start_or_resume(out, resume=True, overwrite=True, steps=5).candidates == [(4, root / "step-00000004")]
    assert start_or_resume(out, resume=True, overwrite=True).candidates == [(4, root / "step-00000004")]
    out.unlink()
    assert start_or_resume(out, resume=True, overwrite=False, steps=4).candidates == [(4, root / "step-00000004")]


def test_a_file_where_the_checkpoints_go_is_refused(tmp_path):
    out = tmp_path / "o.safetensors"
    checkpoint_root(out).write_text("")
    for resume in (False, True):
        with pytest.raises(NotADirectoryError, match=r"o.checkpoints \(where --output's checkpoints go\) is a file"):
            start_or_resume(out, resume=resume, overwrite=True)


def _cfg(tmp_path, **changes):
    return LoraTrainConfig(data=str(tmp_path / "style"), output=str(tmp_path / "o.safetensors"), **changes)


def test_check_resumable_refuses_changed_invariants_and_changed_images(tmp_path):
    cfg = _cfg(tmp_path, rank=4, steps=10)
    info = {"config": cfg.to_dict(), "dataset_fingerprint": "abc"}
    check_resumable(_cfg(tmp_path, rank=4, steps=10, log_every=3), info, "abc", tmp_path, ("rank", "steps"))
    with pytest.raises(ValueError, match=r"settings differ from the run in .* \(rank: 4 -> 8, steps: 10 -> 9\)"):
        check_resumable(_cfg(tmp_path, rank=8, steps=9), info, "abc", tmp_path, ("rank", "steps", "seed"))
    with pytest.raises(ValueError, match="the images in .* changed since"):
        check_resumable(cfg, info, "abd", tmp_path, ("rank",))


# --- a run's checkpoints --------------------------------------------------------------------------------------

class Barrier:
    """An accelerator's process role and barrier, counted."""

    def __init__(self, main=True):
        self.is_main_process, self.waits = main, 0

    def wait_for_everyone(self):
        self.waits += 1


def _run_checkpoints(tmp_path, main=True, keep=3, weight=1.0):
    p = torch.nn.Parameter(torch.full((2,), weight))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    info = {"config": _cfg(tmp_path).to_dict(), "dataset_fingerprint": "fp"}
    return RunCheckpoints(Barrier(main), tmp_path / "o.safetensors", lambda: {"w": p.detach().clone()}, opt, sched,
                          info, keep), p, opt, sched


def test_run_checkpoints_save_on_the_main_process_and_every_process_waits(tmp_path):
    run, *_ = _run_checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        run.save(step)
    assert run.accelerator.waits == 3 and run.last_saved == run.root / "step-00000003"
    assert _steps(run.root) == [2, 3]
    other, *_ = _run_checkpoints(tmp_path / "rank1", main=False)
    other.save(1)
    assert other.accelerator.waits == 1 and other.last_saved is None and not other.root.exists()


def test_a_fresh_run_replaces_nothing_and_an_overwriting_one_replaces_the_earlier_runs_checkpoints(tmp_path):
    run, *_ = _run_checkpoints(tmp_path)
    assert run.replace_earlier is False
    _save(run.root, 8)
    run.save(1)  # a run that did not say --overwrite keeps what is there (start_or_resume refused otherwise)
    assert _steps(run.root) == [1, 8]

    assert run.resume(RunStart([], replace_earlier=True), _cfg(tmp_path), (), lambda w: None, show=False) == 0
    run.save(2)  # the first checkpoint replaces the earlier run's; the next ones prune as usual
    assert _steps(run.root) == [2]
    _save(run.root, 9)
    run.save(3)
    assert _steps(run.root) == [2, 3, 9]


def test_drop_earlier_removes_the_replaced_runs_checkpoints_only_when_asked_on_the_main_process(tmp_path):
    run, *_ = _run_checkpoints(tmp_path)
    _save(run.root, 8)
    run.drop_earlier()  # not replacing anything
    assert _steps(run.root) == [8]
    other, *_ = _run_checkpoints(tmp_path, main=False)
    other.replace_earlier = True
    other.drop_earlier()
    assert _steps(run.root) == [8] and other.replace_earlier is False
    run.replace_earlier = True
    run.drop_earlier()
    assert not run.root.exists() and run.replace_earlier is False
    run.replace_earlier = True
    run.drop_earlier()  # nothing left to drop: no error


def test_resume_restores_the_newest_intact_checkpoint_and_skips_damaged_ones(tmp_path, capsys, caplog):
    run, p, opt, sched = _run_checkpoints(tmp_path)
    cfg = _cfg(tmp_path)
    for step, value in ((2, 2.0), (4, 4.0), (6, 6.0)):
        p.data.fill_(value)
        opt.step()  # no gradients: changes nothing, keeps the optimizer-then-schedule order
        sched.step()  # lr 0.5 -> 0.25 -> 0.125 -> 0.0625
        run.save(step)
    _damage(run.root / "step-00000006", "weights")
    p.data.fill_(0.0)
    for _ in range(3):
        sched.step()
    loaded = {}
    start = start_or_resume(tmp_path / "o.safetensors", resume=True, overwrite=False, steps=10)
    with caplog.at_level(logging.WARNING):
        step = run.resume(start, cfg, ("rank",), loaded.update, show=True)
    assert step == 4 and torch.equal(loaded["w"], torch.full((2,), 4.0))
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == 0.125  # the schedule as it was at step 4
    assert "skipping checkpoint step 6" in caplog.text and WEIGHTS_FILE in caplog.text
    assert capsys.readouterr().out == f"Resuming from step 4 of {cfg.steps} ({run.root / 'step-00000004'})\n"
    run.resume(start, cfg, ("rank",), loaded.update, show=False)
    assert capsys.readouterr().out == ""


def test_resume_skips_weights_that_do_not_fit_and_starts_from_zero_when_none_does(tmp_path, caplog):
    run, *_ = _run_checkpoints(tmp_path)
    for step in (1, 2):
        run.save(step)
    start = start_or_resume(tmp_path / "o.safetensors", resume=True, overwrite=False, steps=10)
    tried = []

    def refuse(weights):
        tried.append(weights)
        raise RuntimeError("size mismatch")

    with caplog.at_level(logging.WARNING):
        assert run.resume(start, _cfg(tmp_path), (), refuse, show=False) == 0
    assert len(tried) == 2 and "do not fit the model" in caplog.text and "no intact checkpoint" in caplog.text


def test_resume_refuses_a_checkpoint_of_other_settings_or_a_state_that_does_not_fit(tmp_path):
    run, *_ = _run_checkpoints(tmp_path)
    run.save(1)
    start = start_or_resume(tmp_path / "o.safetensors", resume=True, overwrite=False, steps=10)
    with pytest.raises(ValueError, match="rank: 4 -> 8"):
        run.resume(start, _cfg(tmp_path, rank=8), ("rank",), lambda w: None, show=False)
    two = torch.nn.Parameter(torch.zeros(3))
    run.optimizer = torch.optim.SGD([two, torch.nn.Parameter(torch.zeros(1))], lr=0.5)  # another parameter count
    with pytest.raises(DamagedCheckpoint, match="optimizer state does not fit"):
        run.restore(run.root / "step-00000001", _cfg(tmp_path), ())
