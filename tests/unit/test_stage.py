"""The life of a stage record (RunDir.stage): done, failed, interrupted (Ctrl-C and SIGTERM, child process
groups stopped), an earlier done record kept, records of another checkpoint stale, file modes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from reap import procs
from reap.errors import InputError
from reap.rundir import RunDir, atomic_write_text, checkpoint_id, current

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_done_record_has_times_memory_and_fingerprint(tmp_path):
    run = RunDir(tmp_path)
    with run.stage("build", inputs={"a": 1}, checkpoint="m1", argv=["reap"]) as rec:
        assert run.read_manifest()["stages"]["build"]["status"] == "running"
        rec["result"] = 42
        rec.top["name"] = "demo"
    m = run.read_manifest()
    b = m["stages"]["build"]
    assert b["status"] == "done" and b["result"] == 42 and b["model_id"] == "m1" and b["argv"] == ["reap"]
    assert b["wall_s"] >= 0 and b["peak_rss_gb"] > 0 and b["fingerprint"] and b["ended"]
    assert m["name"] == "demo"


@pytest.mark.parametrize(
    ("exc", "status", "error"),
    [
        (InputError("no such file; pass --model"), "failed", "no such file; pass --model"),
        (RuntimeError("CUDA out of memory\nmore lines"), "failed", "RuntimeError: CUDA out of memory"),
        (KeyboardInterrupt(), "interrupted", None),
    ],
)
def test_an_attempt_that_does_not_finish_never_replaces_a_done_record(tmp_path, exc, status, error):
    run = RunDir(tmp_path)
    with run.stage("build", checkpoint="m1") as rec:
        rec.top["name"] = "old"
    with pytest.raises(type(exc)), run.stage("build", checkpoint="m2") as rec:
        rec.top["name"] = "new"
        raise exc
    m = run.read_manifest()
    b = m["stages"]["build"]
    assert b["status"] == "done" and b["model_id"] == "m1" and m["name"] == "old"
    assert b["last_attempt"]["status"] == status and b["last_attempt"].get("error") == error
    with pytest.raises(type(exc)), run.stage("eval", keep_done=False):  # no earlier record: it is the record
        raise exc
    assert run.read_manifest()["stages"]["eval"]["status"] == status
    with run.stage("build", checkpoint="m3"):
        pass
    assert "last_attempt" not in run.read_manifest()["stages"]["build"]  # a done attempt replaces all


STAGE_SCRIPT = """
import sys, time
from pathlib import Path
from reap import procs
from reap.rundir import RunDir
run = RunDir(Path(sys.argv[1]))
with run.stage("work") as rec:
    child = procs.start_group([sys.executable, "-c", "import time; time.sleep(600)"])
    rec["child"] = child.pid
    rec.save()
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_marks_the_stage_interrupted_and_stops_its_children(tmp_path, sig):
    run = RunDir(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGE_SCRIPT, str(run.root)],
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "child" not in run.read_manifest().get("stages", {}).get("work", {}):
        time.sleep(0.1)
    child = run.read_manifest()["stages"]["work"]["child"]
    assert psutil.pid_exists(child)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    rec = run.read_manifest()["stages"]["work"]
    assert rec["status"] == "interrupted" and rec["ended"]
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


FINALIZER_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from reap.rundir import RunDir

class Slow:
    def __del__(self):  # the SIGTERM arrives while the garbage collector runs this
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10**6))

with RunDir(Path(sys.argv[1])).stage("work"):
    Slow()
    for _ in range(100):
        time.sleep(0.1)
"""


def test_a_sigterm_taken_inside_a_finalizer_still_interrupts_the_stage(tmp_path):
    """Python ignores an exception raised in __del__; the SIGTERM is delivered again just after."""
    run = RunDir(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-c", FINALIZER_SCRIPT, str(run.root)],
        env=dict(os.environ, PYTHONPATH=SRC),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert run.read_manifest()["stages"]["work"]["status"] == "interrupted"


def test_records_of_another_checkpoint_are_stale(tmp_path):
    run = RunDir(tmp_path)
    with run.stage("build", checkpoint="m1"):
        pass
    with run.stage("eval", checkpoint="m1") as rec:
        rec["results"] = {"t": 1}
    assert current(run.read_manifest(), "eval")["results"] == {"t": 1}
    with run.stage("build", checkpoint="m2"):
        pass
    assert run.mark_stale("m2") == ["eval"]
    m = run.read_manifest()
    assert current(m, "eval") is None and "m1" in m["stages"]["eval"]["stale"]
    with run.stage("eval", checkpoint="m2") as rec:
        rec["results"] = {"t": 2}
    m = run.read_manifest()
    assert current(m, "eval")["results"] == {"t": 2} and "stale" not in m["stages"]["eval"]


def test_checkpoint_id_changes_with_config_index_or_shard_size(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = checkpoint_id(tmp_path)
    assert checkpoint_id(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    second = checkpoint_id(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert len({first, second, checkpoint_id(tmp_path)}) == 3


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_usual_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "sub" / "manifest.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "manifest.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o777 & ~umask


def test_procs_identity_tells_a_reused_pid(tmp_path):
    proc = procs.start_group([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ident = procs.identity(proc.pid)
        assert procs.is_alive(ident)
        assert not procs.is_alive(dict(ident, create_time=ident["create_time"] - 5))  # same pid, another start
        assert not procs.is_alive(dict(ident, cmdline=["vllm"]))
        assert not procs.is_alive({"pid": "garbage"})
    finally:
        procs.stop(proc, grace=5)
    assert not procs.is_alive(ident) and proc.pid not in procs.started()
    assert json.dumps(ident)  # what the pid file holds


def test_usual_modes_undo_a_copied_0600(tmp_path):
    from reap.rundir import usual_modes

    (tmp_path / "model" / "sub").mkdir(parents=True)
    shard = tmp_path / "model" / "model.safetensors"
    shard.write_bytes(b"x")
    shard.chmod(0o600)  # as copy2 of a source written 0600 leaves it
    (tmp_path / "model" / "sub").chmod(0o700)
    old = os.umask(0o022)
    try:
        usual_modes(tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE(shard.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model" / "sub").stat().st_mode) == 0o755
