"""`reap run` end to end on the demo model: killed during quantization, restarted, resumed, then a changed
eval section re-runs eval and card only. Real AutoRound, vLLM (CPU build) and lm-eval."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import DEMO_RECIPE, REAP, env_for, free_port, manifest, reap_cli

pytestmark = pytest.mark.integration


def tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def plan_lines(stderr: str) -> dict[str, str]:
    """The plan `reap run` prints first: `RUN  build    why` / `skip eval     why`."""
    out = {}
    for line in stderr.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[0] in ("RUN", "skip") and parts[1] not in out:
            out[parts[1]] = f"{parts[0]} {parts[2]}"
    return out


def test_run_resumes_after_a_kill_and_reruns_only_what_changed(demo_source, servable_build, hub, tmp_path):
    run = tmp_path / "run"
    args = [
        "run",
        DEMO_RECIPE,
        "--out",
        str(run),
        "--set",
        f"model.path={demo_source}",
        "--set",
        "eval.baseline=false",
        "--set",
        "bench.baseline=false",  # the demo recipe's bench stage, on the W4A16 build only (test_bench: baseline)
        "--set",
        f"bench.port={free_port()}",
        "--set",
        "eval.limit=20",
        "--set",
        f"eval.port={free_port()}",
    ]

    # 1. Killed (SIGKILL, no chance to clean up) once AutoRound has finished its first block.
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([*REAP, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    build_log = run / "logs" / "build.log"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if build_log.is_file() and "layers in the block" in build_log.read_text():
            break
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = manifest(run)
    assert first["pipeline"]["stages"]["build"]["status"] == "running"
    assert "fingerprint" not in first["pipeline"]["stages"]["build"]
    assert not (run / "model").exists(), "a half-done build must not look like a checkpoint"

    # 2. Restarted: the plan says the build resumes; the run ends with every stage done.
    res = reap_cli(*args)
    plan = plan_lines(res.stderr)
    assert plan["build"] == "RUN resumes (the last attempt was killed)", res.stderr[-2000:]
    done = manifest(run)
    assert {s: r["status"] for s, r in done["pipeline"]["stages"].items()} == dict.fromkeys(
        ("build", "verify", "eval", "bench", "card"), "done"
    )
    assert done["stages"]["verify"]["passed"] is True
    results = done["stages"]["eval"]["results"]
    assert set(results) == {"demo_larger", "demo_reverse"} and all(r["limit"] == 20 for r in results.values())
    card = (run / "model" / "README.md").read_text()
    assert "demo_larger" in card and "card" in res.stdout
    bench = done["stages"]["bench"]  # the demo recipe's CPU-sized bench stage
    assert bench["model_id"] == done["stages"]["build"]["model_id"] and bench["server"]["startup_s"] > 0
    assert [r["concurrency"] for r in bench["results"]] == [1, 4]
    assert all(r["output_throughput"] > 0 and r["tpot_ms"]["mean"] > 0 and r["failed"] == 0 for r in bench["results"])
    assert "## Serving performance" in card and "| 4 | 8/8 |" in card
    for chart in ("serving_throughput.png", "build_blocks.png"):
        assert f"]({chart})" in card and (run / "model" / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done["stages"]["eval"]["server"]["kernels"]["moe_backend"]  # eval's server records its kernels
    assert not (run / "model.partial").exists() and not list(run.glob(".autoround*"))

    # Identical in content to an uninterrupted build of the same recipe and source.
    a, b = tensors(run / "model"), tensors(servable_build / "model")
    assert a.keys() == b.keys()
    assert [k for k in a if not (a[k].dtype == b[k].dtype and a[k].equal(b[k]))] == []

    # 3. A changed eval section: eval and card re-run, build and verify are skipped as done.
    built = done["stages"]["build"]["ended"]
    res = reap_cli(*args[:-4], "--set", "eval.limit=10", "--set", f"eval.port={free_port()}")
    plan = plan_lines(res.stderr)
    assert plan["build"].startswith("skip done") and plan["verify"].startswith("skip done"), plan
    assert plan["eval"] == "RUN inputs changed" and plan["card"] == "RUN upstream re-ran"
    after = manifest(run)
    assert after["stages"]["build"]["ended"] == built
    assert all(r["limit"] == 10 for r in after["stages"]["eval"]["results"].values())

    # 4. Nothing changed: nothing runs.
    res = reap_cli(*args[:-4], "--set", "eval.limit=10", "--set", f"eval.port={free_port()}")
    assert all(v.startswith("skip") for v in plan_lines(res.stderr).values()), res.stderr

    # 5. --publish: only the publish stage runs, against the Hub stand-in; a second time it is done.
    publish = [*REAP, *args[:-4], "--set", "eval.limit=10", "--publish", "--set", "publish.repo=alice/demo-run"]
    env = env_for(hub, tmp_path / "hf-home")
    res = subprocess.run(publish, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = plan_lines(res.stderr)
    assert plan["publish"] == "RUN not done yet" and plan["eval"].startswith("skip done")
    record = manifest(run)["stages"]["publish"]
    assert record["status"] == "done" and record["committed"] and record["repo"] == "alice/demo-run"
    res = subprocess.run(publish, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and plan_lines(res.stderr)["publish"].startswith("skip done"), res.stderr[-2000:]


def test_run_refuses_contradictions_in_one_line(demo_source, tmp_path):
    res = reap_cli(
        "run",
        DEMO_RECIPE,
        "--out",
        str(tmp_path / "r"),
        "--set",
        f"model.path={demo_source}",
        "--only",
        "prune",
        check=False,
    )
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "the prune stage is not asked for by the recipe; add a prune: section" in res.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "someone-else", "recipe": {"model": {"path": "x"}}, "stages": {}}')
    res = reap_cli("run", DEMO_RECIPE, "--out", str(other), "--set", f"model.path={demo_source}", check=False)
    assert res.returncode == 1 and "made by another recipe" in res.stderr and "Traceback" not in res.stderr
