"""The run record tells the truth (issue 14), on the demo model: results of an earlier checkpoint are never
shown as the current one's, every command ends a SIGTERM with its stage `interrupted` and none of its
processes alive and then completes when run again, and a failed or killed rebuild leaves the earlier build
the run's current one. Extra builds are RTN (`--iters 0`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from .conftest import DEMO_RECIPE, REAP, copy_run, free_port, manifest, reap_cli

pytestmark = pytest.mark.integration
CALIBRATION = "evals/demo/data/calibration.jsonl"


def started(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([*REAP, *args], stdout=out, stderr=subprocess.STDOUT)


def terminated_midway(args: list[str], log: Path, ready, timeout: float = 600) -> list[str]:
    """Start `reap ARGS`, SIGTERM it once `ready()` holds, check that it exited like an interrupted command
    (130, no traceback) and that no process it had started is left; returns their command lines."""
    proc = started(args, log)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not ready after {timeout} s: {log.read_text()[-2000:]}"
        time.sleep(0.3)
    children, cmdlines = psutil.Process(proc.pid).children(recursive=True), []
    for p in children:
        try:
            cmdlines.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "interrupted" in text and "Traceback" not in text, text[-3000:]
    time.sleep(1)
    assert [p.pid for p in children if alive(p)] == [], cmdlines
    return cmdlines


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def attempt(record: dict) -> dict:
    """The latest attempt of a stage: beside an earlier done record, or the record itself."""
    return record.get("last_attempt", record)


def test_rebuild_killed_failed_then_done_on_an_evaluated_run(servable_build, demo_source, demo_server, tmp_path):
    """`reap build --overwrite` on an evaluated run: killed mid-way (SIGTERM) and failing on a broken source, it
    leaves the earlier build current (card, eval, run work on it); done, it makes the evaluation stale (not in
    the card) until the run is evaluated again."""
    run = copy_run(servable_build, tmp_path / "run")
    evaluate = ["eval", str(run), "--endpoint", demo_server.base_url, "--limit", "5"]
    reap_cli(*evaluate)
    card = (run / "model" / "README.md").read_text()
    assert "## Evaluation" in card and "model-index:" in card
    before = manifest(run)
    recipe = (run / "recipe.yaml").read_text()
    weights = {p.name: p.read_bytes() for p in (run / "model").glob("*.safetensors")}
    build_log = run / "logs" / "build.log"
    size = build_log.stat().st_size
    rebuild = ["build", str(run / "recipe.yaml"), "--out", str(run), "--overwrite", "--iters", "0"]

    # 1. Killed mid-way (SIGTERM once AutoRound has started logging).
    terminated_midway(rebuild, tmp_path / "killed.log", lambda: build_log.stat().st_size > size)
    assert manifest(run)["stages"]["build"]["last_attempt"]["status"] == "interrupted"
    # 2. Failing on a broken source: a shard cut short.
    broken = tmp_path / "broken-source"
    shutil.copytree(demo_source, broken)
    shard = max(broken.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-4096])
    r = reap_cli(*rebuild, "--model", str(broken), check=False)
    assert r.returncode == 1 and "is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]

    after = manifest(run)
    assert after["stages"]["build"]["last_attempt"]["status"] == "interrupted"  # the damaged source: refused first
    assert {k: v for k, v in after["stages"]["build"].items() if k != "last_attempt"} == before["stages"]["build"]
    assert after["recipe"] == before["recipe"] and after["name"] == before["name"]
    assert (run / "recipe.yaml").read_text() == recipe
    assert {p.name: p.read_bytes() for p in (run / "model").glob("*.safetensors")} == weights
    assert not (run / "model.partial").exists()
    # card, eval and run work on it
    reap_cli("card", str(run))
    reap_cli(*evaluate)
    assert "## Evaluation" in (run / "model" / "README.md").read_text()
    reap_cli("run", str(run / "recipe.yaml"), "--out", str(run), "--dry-run")  # not refused as another recipe's

    # 3. The killed command, again, under umask 022: a new checkpoint (RTN); the evaluation is stale.
    r = subprocess.run([*REAP, *rebuild], capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr[-3000:]
    new = manifest(run)
    assert new["stages"]["build"]["model_id"] != before["stages"]["build"]["model_id"]
    assert "last_attempt" not in new["stages"]["build"]
    assert new["stages"]["eval"]["model_id"] == before["stages"]["build"]["model_id"]
    assert "stale" in new["stages"]["eval"] and "left out of the card" in r.stderr
    card = (run / "model" / "README.md").read_text()
    assert "## Evaluation" not in card and "model-index" not in card and "demo_larger" not in card
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [run / "manifest.json", *(run / "model").iterdir()]}
    assert set(modes.values()) == {0o644}, modes

    # 4. Evaluated again: the results describe the current checkpoint and are shown. (The shared server
    # serves the earlier checkpoint: this checks the record, not the scores.)
    reap_cli(*evaluate)
    again = manifest(run)["stages"]["eval"]
    assert again["model_id"] == new["stages"]["build"]["model_id"] and "stale" not in again
    card = (run / "model" / "README.md").read_text()
    assert "## Evaluation" in card and "model-index:" in card


def test_sigterm_during_a_parallel_build(demo_source, tmp_path):
    run = tmp_path / "run"
    args = ["build", DEMO_RECIPE, "--model", str(demo_source), "--out", str(run), "--iters", "0"]
    args += ["--set", "quantize.parallel=2"]
    part0 = run / ".parallel" / "part-0"

    def worker_running() -> bool:
        return (part0 / "manifest.json").is_file() and manifest(part0)["stages"]["worker"]["status"] == "running"

    cmdlines = terminated_midway(args, tmp_path / "killed.log", worker_running)
    assert any("reap.parallel" in c for c in cmdlines), cmdlines
    m = manifest(run)
    assert m["stages"]["build"]["status"] == "interrupted" and m["stages"]["build"]["ended"]
    assert manifest(part0)["stages"]["worker"]["status"] == "interrupted"  # stopped by the build, and recorded so
    assert not (run / "model").exists() and not (run / "model.partial").exists()
    reap_cli(*args)
    assert manifest(run)["stages"]["build"]["status"] == "done" and (run / "model" / "README.md").is_file()


def test_sigterm_during_prune(demo_source, tmp_path):
    out = tmp_path / "pruned"
    args = ["prune", str(demo_source), "--out", str(out), "--ratio", "0.5", "--calibration", CALIBRATION]
    args += ["--nsamples", "16", "--seqlen", "64"]
    log = tmp_path / "killed.log"
    terminated_midway(args, log, lambda: "observing" in log.read_text())
    rec = manifest(out)["stages"]["prune"]
    assert rec["status"] == "interrupted" and not (out / "model").exists() and not (out / "model.partial").exists()
    reap_cli(*args)
    assert manifest(out)["stages"]["prune"]["status"] == "done" and (out / "model" / "config.json").is_file()


def test_sigterm_during_eval(servable_build, tmp_path):
    run = copy_run(servable_build, tmp_path / "run")
    args = ["eval", str(run), "--limit", "5", "--port", str(free_port())]
    log = run / "logs" / "serve-quantized.log"  # opened just before vLLM starts; written once it runs
    log.unlink(missing_ok=True)  # the copy carries the log of the shared build's earlier evaluation
    cmdlines = terminated_midway(args, tmp_path / "killed.log", lambda: log.is_file() and log.stat().st_size > 0)
    assert any("vllm" in c for c in cmdlines), cmdlines
    assert attempt(manifest(run)["stages"]["eval"])["status"] == "interrupted"
    reap_cli(*args)
    rec = manifest(run)["stages"]["eval"]
    assert rec["status"] == "done" and "last_attempt" not in rec and rec["results"]


def test_run_with_prune_resumes_skips_when_done_and_rerenders_only_the_card(demo_source, tmp_path):
    run = tmp_path / "run"
    args = ["run", DEMO_RECIPE, "--out", str(run), "--set", f"model.path={demo_source}"]
    args += ["--set", "prune.method=random", "--set", "prune.ratio=0.5", "--set", "quantize.iters=0"]
    args += ["--set", "eval.enabled=false"]
    build_log = run / "logs" / "build.log"

    # 1. SIGTERM during the build: prune stays done, its checkpoint intact; the build is interrupted.
    terminated_midway(args, tmp_path / "killed.log", lambda: build_log.is_file() and build_log.stat().st_size > 0)
    m = manifest(run)
    assert m["pipeline"]["stages"]["prune"]["status"] == "done"
    assert (
        m["pipeline"]["stages"]["build"]["status"] == "interrupted" and m["stages"]["build"]["status"] == "interrupted"
    )
    assert (run / "pruned" / "model" / "config.json").is_file() and not (run / "model").exists()

    # 2. The same command completes without pruning again; the recipe saved with the model is the one given.
    r = reap_cli(*args)
    assert "skip prune" in r.stderr and "RUN  build    resumes (was interrupted)" in r.stderr, r.stderr[-2000:]
    saved = (run / "model" / "reap_recipe.yaml").read_text()  # published: local paths hidden (issue 15)
    assert "prune:" in saved and "method: random" in saved and "pruned/model" not in saved
    assert f"path: {demo_source}\n" in (run / "recipe.yaml").read_text()
    assert json.loads((run / "model" / "reap_prune.json").read_text())["method"] == "random"

    # 3. Again: every stage is skipped.
    r = reap_cli(*args)
    assert all(line.startswith("skip") for line in r.stderr.splitlines() if line[:4] in ("RUN ", "skip")), r.stderr
    # 4. New card tags: only the card re-renders, from them.
    built = manifest(run)["stages"]["build"]["ended"]
    r = reap_cli(*args, "--set", "card.tags=[reap, mine]")
    runs = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("RUN ")]
    assert runs == ["card"], r.stderr[-2000:]
    assert "- mine" in (run / "model" / "README.md").read_text()
    assert manifest(run)["stages"]["build"]["ended"] == built
