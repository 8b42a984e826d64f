"""Session fixtures: the demo model is built once per test run (or taken from REAP_DEMO_SOURCE, a folder
made by `reap demo-model`), and quantized once by the real `reap build`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import reap
from reap.resources import data_dir
from tests.hubserver import HubServer, User

REAP = [sys.executable, "-m", "reap"]
DEMO_RECIPE = str(data_dir("recipes") / "demo.yaml")
SRC = str(Path(reap.__file__).resolve().parents[1])
TOKEN = "hf_" + uuid.uuid4().hex + uuid.uuid4().hex[:6]  # alice, writes to alice/* and reap-lab/*
READ_TOKEN = "hf_" + uuid.uuid4().hex + uuid.uuid4().hex[:6]  # alice, a read-only token


def reap_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*REAP, *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"reap {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def demo_model(tmp_path_factory, reuse_env: str, *args: str) -> Path:
    """A demo checkpoint made by `reap demo-model [args]`, or the folder named by the `reuse_env` variable."""
    given = os.environ.get(reuse_env)
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    out = tmp_path_factory.mktemp("demo") / "source"
    reap_cli("demo-model", str(out), *args)
    return out


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    return demo_model(tmp_path_factory, "REAP_DEMO_SOURCE")


@pytest.fixture(scope="session")
def demo_build(demo_source, tmp_path_factory) -> Path:
    """The demo recipe with every routed expert quantized, whatever this CPU can serve."""
    run = tmp_path_factory.mktemp("runs") / "demo"
    reap_cli(
        "build",
        DEMO_RECIPE,
        "--model",
        str(demo_source),
        "--out",
        str(run),
        "--set",
        "quantize.routed_experts=quantize",
    )
    return run


def copy_run(src: Path, dest: Path) -> Path:
    """A run folder of the same checkpoint (same `model_id`) without its evaluation and server state."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("serve.pid", "eval"))
    return dest


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def servable_build(request, demo_source, tmp_path_factory) -> Path:
    """The demo recipe as it is, which vLLM's CPU build serves here: `routed_experts: auto` quantizes the routed
    experts where that build has an int4 MoE kernel (AMX, or AMD + zentorch: then this is `demo_build`, not built
    twice) and keeps them 16-bit elsewhere."""
    from reap.serve import cpu_int4_moe_kernel

    if cpu_int4_moe_kernel():
        return request.getfixturevalue("demo_build")
    run = tmp_path_factory.mktemp("runs") / "demo-cpu"
    reap_cli("build", DEMO_RECIPE, "--model", str(demo_source), "--out", str(run))
    return run


@pytest.fixture(scope="session")
def demo_server(servable_build):
    """One vLLM (CPU build) server for every test that needs an endpoint, through reap's Python API."""
    from reap.serve import ServeOptions, Server, resolve_target

    with Server(resolve_target(servable_build), ServeOptions(port=free_port(), max_model_len=1024)) as srv:
        yield srv


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The Hub stand-in on 127.0.0.1 (tests/hubserver.py) that the real huggingface_hub client talks to."""
    users = {
        TOKEN: User("alice", orgs=("reap-lab",), read_orgs=("readers",)),
        READ_TOKEN: User("alice", orgs=("reap-lab",), role="read"),
    }
    with HubServer(tmp_path_factory.mktemp("hub"), users) as server:
        yield server


def env_for(hub: HubServer, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()  # no real login, no offline switch
        if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join([SRC, env.get("PYTHONPATH", "")]),
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def served_right(client, name: str, task: str, n: int = 10) -> tuple[int, dict[int, str]]:
    """How many of the first `n` held-out rows of a demo task the served model answers right (greedy, one
    request). A count, not one given item: the trained demo model differs from machine to machine."""
    from reap.demo import answer_of, prompt_of, read_task_rows

    rows = read_task_rows(task, "test")[:n]
    out = client.completions.create(model=name, prompt=[prompt_of(task, r) for r in rows], max_tokens=8, temperature=0)
    answers = {c.index: c.text for c in out.choices}
    return sum(answers[i].startswith(answer_of(task, r)) for i, r in enumerate(rows)), answers
