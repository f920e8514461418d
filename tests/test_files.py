"""Output files written safely (moempi.io.files): no-replace publishing, inputs protected, stale temporaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moempi.io import files
from moempi.errors import MoempiError


def written(path, text):
    path.write_text(text)
    return path


def test_publish_never_replaces_a_file_that_appeared(tmp_path):
    out = tmp_path / "out.h5"
    with files.temporary(str(out)) as tmp:
        written(tmp_path / os.path.basename(tmp), "new")
        written(out, "another job's")                   # appeared after the start-up check
        with pytest.raises(MoempiError, match="appeared while this job ran"):
            files.publish(tmp, str(out), overwrite=False)
    assert out.read_text() == "another job's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_publish_with_overwrite_replaces(tmp_path):
    out = written(tmp_path / "out.h5", "old")
    with files.temporary(str(out)) as tmp:
        written(tmp_path / os.path.basename(tmp), "new")
        files.publish(tmp, str(out), overwrite=True)
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_the_same_file_by_any_path(tmp_path):
    model = written(tmp_path / "model.h5", "weights")
    (tmp_path / "sub").mkdir()
    os.symlink(model, tmp_path / "link.h5")
    os.link(model, tmp_path / "hard.h5")
    for alias in (tmp_path / "sub" / ".." / "model.h5", tmp_path / "link.h5",
                  tmp_path / "hard.h5"):
        with pytest.raises(MoempiError, match="would destroy the input"):
            files.check_not_input(str(alias), {"model": str(model)})
    files.check_not_input(str(tmp_path / "other.h5"), {"model": str(model)})


def test_stale_temporaries_removed_or_named(tmp_path):
    out = tmp_path / "out.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    mine = os.path.basename(files.partial_name(str(out)))
    host = mine.rsplit("-", 1)[0]                       # .out.h5.partial-HOST
    stale = written(tmp_path / f"{host}-{dead}", "left by a killed job")
    live = written(tmp_path / f"{host}-{os.getppid()}", "being written")
    remote = written(tmp_path / f".out.h5.partial-elsewhere-{dead}", "on another node")
    other = written(tmp_path / f".other.h5.partial-elsewhere-{dead}", "another output's")
    notes = files.sweep(str(out))
    assert not stale.exists() and live.exists() and remote.exists() and other.exists()
    assert len(notes) == 3
    assert any(f"removed {stale}" in n for n in notes)
    assert any(str(live) in n and "may still be writing" in n for n in notes)
    assert any(str(remote) in n and "on elsewhere" in n for n in notes)


def test_signal_removes_registered_files(tmp_path):
    out = tmp_path / "out.h5"
    tmp = files.register(str(out))
    written(tmp_path / os.path.basename(tmp), "half")
    try:
        assert files.remove_all() == [tmp]
        assert not os.path.exists(tmp)
    finally:
        files._registry.closed = False          # this test process goes on
        files._registry.discard(tmp)
