"""Session fixtures: the demo model is built once per test run (or taken from REAP_DEMO_SOURCE, a folder
made by `reap demo-model`), and quantized once by the real `reap build`. Under pytest-xdist (`make test` runs
two workers, one test file each at a time) the workers share these: whichever asks first makes it, the
others wait for it (`shared`); each worker starts its own vLLM server."""

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
ALL_CORES = dict(os.environ)  # for the demo model's training, which the other workers wait for
if os.environ.get("PYTEST_XDIST_WORKER") is not None:
    # Workers side by side: each one's builds, servers and evaluations get its share of the cores instead of
    # every process starting a thread per core (integration tests on 2 cores: 26 min 48 s serially, 22 min 16 s
    # with 2 workers oversubscribing the cores, 18 min 40 s with a core each).
    share = (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))
DEMO_RECIPE = str(data_dir("recipes") / "demo.yaml")
SRC = str(Path(reap.__file__).resolve().parents[1])
TOKEN = "hf_" + uuid.uuid4().hex + uuid.uuid4().hex[:6]  # alice, writes to alice/* and reap-lab/*
READ_TOKEN = "hf_" + uuid.uuid4().hex + uuid.uuid4().hex[:6]  # alice, a read-only token


def reap_cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*REAP, *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"reap {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def build_demo(source: Path, run: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    """`reap build` of the demo recipe from `source` into `run`, with more flags (`--set k=v`, `--iters 0`)."""
    return reap_cli("build", DEMO_RECIPE, "--model", str(source), "--out", str(run), *flags, check=check)


def shared(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` once per test run: in this session's temporary folder, or, under pytest-xdist, in the
    folder all workers share, by whichever worker asks first while the others wait on its lock."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name) / name
        make(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():  # not made yet, or the worker that tried failed: make it (again) here
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


def own_copy(tmp_path_factory, run: Path) -> Path:
    """Under pytest-xdist, this worker's copy of a shared run folder (tests record their stages into it);
    otherwise the folder itself."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return run
    return copy_run(run, tmp_path_factory.mktemp(run.name) / run.name)


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    given = os.environ.get("REAP_DEMO_SOURCE")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    return shared(tmp_path_factory, "demo-source", lambda out: reap_cli("demo-model", str(out), env=ALL_CORES))


@pytest.fixture(scope="session")
def demo_build(demo_source, tmp_path_factory) -> Path:
    """The demo recipe with every routed expert quantized, whatever this CPU can serve."""
    build = shared(
        tmp_path_factory,
        "demo-build",
        lambda run: build_demo(demo_source, run, "--set", "quantize.routed_experts=quantize"),
    )
    return own_copy(tmp_path_factory, build)


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
    build = shared(
        tmp_path_factory,
        "demo-cpu-build",
        lambda run: build_demo(demo_source, run),
    )
    return own_copy(tmp_path_factory, build)


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


# The files whose tests take longest, measured (2 workers, 2 cores: 2-6 min each), go first, so that under
# pytest-xdist's one-file-per-worker scheduling no long file starts last while the other worker sits idle.
LONG_FIRST = ["test_record.py", "test_parallel.py", "test_build.py", "test_eval.py", "test_run.py", "test_publish.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept within
