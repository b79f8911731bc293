"""Publishing a checkpoint is safe at every point a kill can strike: resume finds the new checkpoint or, where
the new one never finished, the one it was replacing; never neither."""

from __future__ import annotations

import os
import shutil

import pytest

import ftloop.fsdp.checkpoint as checkpoint
from ftloop.atomic import publish
from ftloop.fsdp.checkpoint import COMPLETE_MARKER, latest_checkpoint, recover_interrupted_saves


def write_checkpoint(path, content: str, complete: bool = True) -> None:
    os.makedirs(path)
    (path / "weights").write_text(content)
    if complete:
        (path / COMPLETE_MARKER).write_text("6\n")


class Killed(Exception):
    pass


def killed_after(calls: int, monkeypatch) -> None:
    """os.rename and shutil.rmtree work `calls` times, then the process "dies" (the call raises, undone)."""
    done = [0]
    for owner, name in ((os, "rename"), (shutil, "rmtree")):
        real = getattr(owner, name)

        def dying(*args, real=real, **kwargs):
            if done[0] == calls:
                raise Killed
            done[0] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, dying)


def publish_killed_after(calls: int, path, monkeypatch) -> None:
    """Publish `<path>.tmp` at `path`, the process "dying" after `calls` renames and removals."""
    with monkeypatch.context() as patch:
        killed_after(calls, patch)
        try:
            publish(f"{path}.tmp", str(path))
        except Killed:
            pass


@pytest.mark.parametrize("calls", range(5))  # publish makes at most 4 such calls; 4 means it finished
def test_a_kill_between_any_two_steps_of_replacing_a_checkpoint_keeps_the_new_one(tmp_path, monkeypatch, calls):
    """An older run's checkpoint-6 is being replaced by this run's, complete in checkpoint-6.tmp. Before,
    a kill between moving the old one aside and renaming the new one lost both (the cleanup deleted `.old`
    and `.tmp` alike)."""
    write_checkpoint(tmp_path / "checkpoint-4", "step 4")
    write_checkpoint(tmp_path / "checkpoint-6", "an older run's step 6")
    write_checkpoint(tmp_path / "checkpoint-6.tmp", "this run's step 6")
    publish_killed_after(calls, tmp_path / "checkpoint-6", monkeypatch)
    said = recover_interrupted_saves(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"], said
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")
    assert (tmp_path / "checkpoint-6" / "weights").read_text() == "this run's step 6"
    assert (calls == 4) == (said == [])  # nothing to recover only when publishing finished


def test_leftovers_of_saves_that_never_finished_are_removed_or_put_back(tmp_path):
    write_checkpoint(tmp_path / "checkpoint-2", "step 2")
    write_checkpoint(tmp_path / "checkpoint-4.tmp", "half written", complete=False)
    write_checkpoint(tmp_path / "checkpoint-6.old", "step 6")  # moved aside for a save that then failed
    write_checkpoint(tmp_path / "checkpoint-8", "no marker", complete=False)
    said = recover_interrupted_saves(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6"]
    assert (tmp_path / "checkpoint-6" / "weights").read_text() == "step 6"
    assert said == [f"removed {tmp_path}/checkpoint-4.tmp: its save never finished",
                    f"restored {tmp_path}/checkpoint-6: a save that was replacing it never finished",
                    f"removed {tmp_path}/checkpoint-8: its save never finished"]
    assert checkpoint.recover_interrupted_saves(str(tmp_path)) == []  # idempotent


@pytest.mark.parametrize("calls", range(5))
def test_an_export_interrupted_anywhere_leaves_the_previous_one_or_the_new_one(tmp_path, monkeypatch, calls):
    """`best` and `final` go through the same publish; a `.tmp` of an export is never known to be whole (it is
    not resumed from), so where the new one is not in place yet, the previous one comes back."""
    write_checkpoint(tmp_path / "best", "step 2's weights", complete=False)  # exports carry no marker
    write_checkpoint(tmp_path / "best.tmp", "step 4's weights", complete=False)
    publish_killed_after(calls, tmp_path / "best", monkeypatch)
    said = recover_interrupted_saves(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["best"], said
    moved = calls >= 3  # the third call renames the new export into place
    assert (tmp_path / "best" / "weights").read_text() == ("step 4's weights" if moved else "step 2's weights")
