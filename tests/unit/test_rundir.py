from __future__ import annotations

import json
import os

import pytest

from reap.errors import DiskSpaceError, InputError, OutputExistsError
from reap.rundir import RunDir, atomic_write_text, check_free_disk, existing_run, open_run


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write_text(path, '{"old": true}')

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"new": true}')
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_update_stage_merges(tmp_path):
    run = RunDir(tmp_path)
    run.update_stage("build", {"status": "running", "argv": ["reap"]}, name="demo")
    run.update_stage("build", {"status": "done"})
    m = run.read_manifest()
    assert m["name"] == "demo" and m["stages"]["build"] == {"status": "done", "argv": ["reap"]}


def test_existing_build_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        open_run(tmp_path / "run")
    assert open_run(tmp_path / "run", overwrite=True).logs_dir.is_dir()


def test_not_a_run_folder_and_corrupt_manifest(tmp_path):
    with pytest.raises(InputError, match="not a reap run folder"):
        existing_run(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        existing_run(tmp_path).read_manifest()


def test_disk_space_check(tmp_path):
    check_free_disk(tmp_path / "a" / "b", 1)
    with pytest.raises(DiskSpaceError, match="GB needed"):
        check_free_disk(tmp_path, 10**18)
