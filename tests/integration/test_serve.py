"""reap serve against the real vLLM CPU build: lifecycle, endpoints, refusals, what is recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from .conftest import REAP, free_port, manifest, reap_cli, served_right

pytestmark = pytest.mark.integration


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (vLLM's API server, engine core and workers share one)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def test_python_api_serves_completions_with_prompt_logprobs_and_chat(demo_server):
    from openai import OpenAI

    client = OpenAI(base_url=demo_server.base_url, api_key="unused")
    name = demo_server.target.served_name
    right, answers = served_right(client, name, "reverse")  # the model reverses ~98 % of held-out words
    assert right >= 8, answers
    scored = client.completions.create(
        model=name, prompt="Which is larger: 12 or 85?\nAnswer: 85", max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lps = scored.choices[0].logprobs.token_logprobs
    assert lps[0] is None and all(isinstance(x, float) for x in lps[1:])
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Reverse: abc"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message is not None
    record = demo_server.record()
    assert record["kernels"]["linear_kernel"] == "CPUWNA16LinearKernel"
    assert record["vllm_version"] == "0.32.0" and record["startup_s"] > 0


def test_detach_status_stop_and_manifest(servable_build):
    port = free_port()
    r = reap_cli("serve", str(servable_build), "--detach", "--port", str(port), "--max-model-len", "512")
    assert r.stdout.strip() == f"http://127.0.0.1:{port}/v1"
    status = json.loads(reap_cli("serve", str(servable_build), "--status").stdout)
    assert status["running"] and status["healthy"]
    rec = manifest(servable_build)["stages"]["serve"]
    assert len(group_members(rec["pid"])) >= 2  # API server + engine core
    assert rec["status"] == "done" and rec["server"] == "running" and rec["served_name"] == "demo"
    assert (
        rec["base_url"].endswith(f":{port}/v1")
        and rec["model_id"] == manifest(servable_build)["stages"]["build"]["model_id"]
    )
    assert "--language-model-only" in rec["argv"] and "--quantization" not in rec["argv"]
    assert rec["kernels"]["linear_kernel"] == "CPUWNA16LinearKernel" and rec["gpu_memory_after_load_gb"] is None
    assert rec["startup_s"] > 0 and rec["vllm_version"]
    reap_cli("serve", str(servable_build), "--stop")
    assert json.loads(reap_cli("serve", str(servable_build), "--status").stdout)["running"] is False
    assert manifest(servable_build)["stages"]["serve"]["server"] == "stopped"
    time.sleep(1)
    assert group_members(rec["pid"]) == []


def test_foreground_sigterm_and_ctrl_c_stop_the_whole_process_group(servable_build, tmp_path):
    port = free_port()
    argv = [*REAP, "serve", str(servable_build), "--port", str(port), "--max-model-len", "512"]
    # SIGINT as a terminal delivers it, also when the test runner itself was started in the background
    # (a shell's `&` makes SIGINT ignored, and Python keeps an ignored SIGINT ignored)
    popen = dict(
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # 1. SIGTERM while vLLM is still starting: the stage is interrupted and vLLM's whole group is gone.
    proc = subprocess.Popen(argv, **popen)
    deadline = time.monotonic() + 300
    vllm: list[psutil.Process] = []
    while time.monotonic() < deadline and not vllm:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        vllm = [p for p in psutil.Process(proc.pid).children() if "vllm" in " ".join(p.cmdline())]
        time.sleep(0.5)
    time.sleep(3)  # vLLM is importing and loading
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert manifest(servable_build)["stages"]["serve"]["status"] == "interrupted"
    time.sleep(1)
    assert group_members(vllm[0].pid) == []

    # 2. The same command serves; Ctrl-C once it answers stops it the same way.
    proc = subprocess.Popen(argv, **popen)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # reap records the server once it answers
        rec = manifest(servable_build)["stages"].get("serve", {})
        if rec.get("status") == "running" and rec.get("base_url", "").endswith(f":{port}/v1"):
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(2)
    pgid = rec["pid"]
    assert group_members(pgid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert manifest(servable_build)["stages"]["serve"]["status"] == "interrupted"
    time.sleep(1)
    assert group_members(pgid) == []


def test_unknown_vllm_flag_is_reported_in_one_line(servable_build):
    r = reap_cli("serve", str(servable_build), "--port", str(free_port()), "--", "--bogus-flag", check=False)
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode == 1 and len(lines) == 1 and "unrecognized arguments: --bogus-flag" in lines[0], r.stderr[
        -2000:
    ]
    assert "Traceback" not in r.stderr


def test_checkpoint_this_cpu_cannot_serve_is_refused_before_launch(demo_build, servable_build):
    from reap.serve import cpu_int4_moe_kernel

    if cpu_int4_moe_kernel():
        assert servable_build == demo_build  # W4A16 experts are served as they are
        return
    t0 = time.monotonic()
    r = reap_cli("serve", str(demo_build), "--port", str(free_port()), check=False)
    assert r.returncode == 1 and "no int4 MoE kernel" in r.stderr and "routed_experts: auto" in r.stderr
    assert time.monotonic() - t0 < 60
    assert "serve" not in manifest(demo_build)["stages"]
