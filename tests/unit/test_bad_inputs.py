"""Issue 15: bad input to every command ends in exactly one `Error:` line that names the problem, with the
expected exit code (1: reap refused it; 2: Click refused an option before reap ran), no traceback, and
nothing that existed before changed (nor anything new written) in the workspace the command ran in."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from reap.cli import reap
from reap.resources import data_dir

from .ckpt_factory import make_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data"
FAKE_TOKEN = "hf_" + "x" * 34


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # `{name}` is a path of the workspace (see `workspace`)
    code: int
    needle: str  # must appear in the Error: line
    env: dict[str, str] = field(default_factory=dict)
    hub: str | None = None  # "closed": a port nothing listens on; "empty": a server answering {} to everything


def C(id: str, *args: str, code: int = 1, needle: str, **kw) -> Case:
    return Case(id, args, code, needle, **kw)


RECIPE_CASES = [
    C("recipe-missing", "build", "{root}/nope.yaml", needle="file not found"),
    C("recipe-binary", "build", "{root}/binary.yaml", needle="not a text file"),
    C("recipe-a-list", "build", "{root}/list.yaml", needle="must be a YAML mapping"),
    C("recipe-bad-yaml", "build", "{root}/badyaml.yaml", needle="not valid YAML at line"),
    C("recipe-a-folder", "build", "{root}/src", needle="file not found"),
    C("set-under-a-value", "build", "{recipe}", "--set", "quantize.bits.x=1", needle="quantize.bits is a value"),
    C("set-under-name", "build", "{recipe}", "--set", "name.first=1", needle="name is a value, not a section"),
    C("set-bad-yaml", "build", "{recipe}", "--set", "eval.limit={{", code=2, needle="the value is not valid YAML"),
    C("set-no-equals", "build", "{recipe}", "--set", "novalue", code=2, needle="is not KEY=VALUE"),
    C("set-empty-key", "build", "{recipe}", "--set", "quantize..bits=4", needle="empty field name"),
    C("bits-3", "build", "{recipe}", "--set", "quantize.bits=3", needle="quantize.bits: 3 bits cannot be served"),
    C("bits-2", "build", "{recipe}", "--set", "quantize.bits=2", needle="quantize.bits: 2 bits cannot be served"),
    C("bits-string", "build", "{recipe}", "--set", "quantize.bits='4'", needle="quantize.bits: Input should be"),
    C("iters-true", "build", "{recipe}", "--set", "quantize.iters=true", needle="quantize.iters: Input should be"),
    C("iters-float", "build", "{recipe}", "--set", "quantize.iters=1.5", needle="quantize.iters: Input should be"),
    C("sym-int", "build", "{recipe}", "--set", "quantize.sym=1", needle="quantize.sym: Input should be"),
    C("nsamples-0", "build", "{recipe}", "--set", "quantize.nsamples=0", needle="quantize.nsamples: Input should"),
    C("group-100", "build", "{recipe}", "--set", "quantize.group_size=100", needle="quantize.group_size: allowed"),
    C("format-gguf", "build", "{recipe}", "--set", "quantize.format=gguf", needle="quantize.format: allowed"),
    C(
        "expert-tuning-unknown",
        "build",
        "{recipe}",
        "--set",
        "quantize.expert_tuning=fast",
        needle="quantize.expert_tuning: allowed",
    ),
    C("dataset-folder", "build", "{recipe}", "--set", "quantize.dataset={root}/calibdir", needle="not a .jsonl file"),
    C("dataset-missing", "build", "{recipe}", "--set", "quantize.dataset={root}/no.jsonl", needle="not found"),
    C("dataset-not-a-name", "build", "{recipe}", "--set", "quantize.dataset=my data!", needle="nor a dataset name"),
    C("unknown-field", "build", "{recipe}", "--set", "quantize.colour=red", needle="quantize.colour: unknown field"),
    C("bad-name", "build", "{recipe}", "--set", "name=bad name!", needle="name: use letters"),
    C("bad-repo", "build", "{recipe}", "--set", "publish.repo=nope", needle="is not a Hub repo id"),
    C("bad-revision", "build", "{recipe}", "--set", "publish.revision=my branch", needle="not a valid branch name"),
    C("base-model-a-path", "build", "{recipe}", "--set", "model.base_model=/data/x", needle="not a Hub repo id"),
    C("tp-0-in-recipe", "build", "{recipe}", "--set", "serve.tensor_parallel_size=0", needle="tensor_parallel_size"),
    C("recipe-eval-limit-0", "build", "{recipe}", "--set", "eval.limit=0", needle="eval.limit: Input should be"),
    C("eval-port-99999", "build", "{recipe}", "--set", "eval.port=99999", needle="eval.port: Input should be"),
]

BUILD_CASES = [
    C("build-iters-negative", "build", "{recipe}", "--iters", "-1", code=2, needle="'--iters': -1 is not in"),
    C("build-tp-0", "build", "{recipe}", "--tp", "0", code=2, needle="'--tp': 0 is not in the range"),
    C("build-gpus-0", "build", "{recipe}", "--gpus", "0", code=2, needle="'--gpus': 0 is not in the range"),
    C("build-out-a-file", "build", "{recipe}", "--out", "{root}/afile", needle="is a file, not a folder"),
    C("build-out-under-file", "build", "{recipe}", "--out", "{root}/afile/run", needle="which is a file"),
    C("build-out-unwritable", "build", "{recipe}", "--out", "/proc/1/run", needle="is not writable"),
    C("build-model-missing", "build", "{recipe}", "--model", "{root}/nope", needle="not found"),
    C("build-model-no-config", "build", "{recipe}", "--model", "{root}/calibdir", needle="no config.json"),
    C("build-config-a-list", "build", "{recipe}", "--model", "{root}/cfg-list", needle="is not a model config"),
    C("build-config-not-json", "build", "{recipe}", "--model", "{root}/cfg-bad", needle="is not valid JSON"),
    C("build-index-not-json", "build", "{recipe}", "--model", "{root}/bad-index", needle="is not valid JSON"),
    C("build-header-cut", "build", "{recipe}", "--model", "{root}/bad-header", needle="truncated or corrupt"),
    C("build-shard-missing", "build", "{recipe}", "--model", "{root}/no-shard", needle="is damaged"),
    C("build-shard-truncated", "build", "{recipe}", "--model", "{root}/cut-shard", needle="truncated or damaged"),
    C("build-not-moe", "build", "{recipe}", "--model", "{root}/llama", needle="`llama` model"),
]

VERIFY_CARD_CASES = [
    C("verify-tp-0", "verify", "{src}", "--tp", "0", code=2, needle="'--tp': 0 is not in the range x>=1"),
    C("verify-tp-negative", "verify", "{src}", "--tp", "-1", code=2, needle="'--tp': -1 is not in the range"),
    C("verify-missing", "verify", "{root}/nope", needle="not found"),
    C("verify-config-a-list", "verify", "{root}/cfg-list", needle="is not a model config"),
    C("verify-index-not-json", "verify", "{root}/bad-index", needle="is not valid JSON"),
    C("verify-header-cut", "verify", "{root}/bad-header", needle="truncated or corrupt"),
    C("verify-shard-truncated", "verify", "{root}/cut-shard", "--tp", "1", needle="(truncated or damaged)"),
    C("card-not-a-run", "card", "{root}/calibdir", needle="not a reap run folder"),
    C("card-manifest-a-list", "card", "{root}/run-list", needle="is not a reap manifest"),
    C("card-manifest-not-json", "card", "{root}/run-badjson", needle="is not valid JSON"),
    C("card-no-build", "card", "{root}/run-nobuild", needle="has no finished build"),
]

SERVE_CASES = [
    C("serve-port-99999", "serve", "{run}", "--port", "99999", code=2, needle="'--port': 99999 is not in"),
    C("serve-port-0", "serve", "{run}", "--port", "0", code=2, needle="'--port': 0 is not in the range"),
    C("serve-tp-0", "serve", "{run}", "--tp", "0", code=2, needle="'--tp': 0 is not in the range"),
    C("serve-tp-on-cpu", "serve", "{run}", "--cpu", "--tp", "3", needle="--tp 3 needs GPUs"),
    C("serve-tp-on-cpu-dry", "serve", "{run}", "--cpu", "--tp", "3", "--dry-run", needle="--tp 3 needs GPUs"),
    C("serve-timeout-0", "serve", "{run}", "--timeout", "0", code=2, needle="'--timeout': 0 is not in"),
    C("serve-max-len-0", "serve", "{run}", "--max-model-len", "0", code=2, needle="'--max-model-len': 0"),
    C("serve-api-key-no-value", "serve", "{run}", "--cpu", "--", "--api-key", needle="--api-key after `--` needs"),
    C("serve-missing", "serve", "{root}/nope", needle="not found"),
    C("serve-status-manifest-list", "serve", "{root}/run-list", "--status", needle="is not a reap manifest"),
]

EVAL_CASES = [
    C("eval-endpoint-not-url", "eval", "{run}", "--endpoint", "not a url", needle="is not an http(s) URL"),
    C("eval-endpoint-ftp", "eval", "{run}", "--endpoint", "ftp://127.0.0.1/v1", needle="is not an http(s) URL"),
    C("eval-endpoint-bad-port", "eval", "{run}", "--endpoint", "http://h:99999/v1", needle="not an http(s) URL"),
    C("eval-endpoint-not-http", "eval", "{run}", "--endpoint", "{garbage}", needle="no OpenAI-compatible server"),
    C("eval-limit-0", "eval", "{run}", "--limit", "0", code=2, needle="'--limit': 0 is not in the range"),
    C("eval-concurrency-0", "eval", "{run}", "--concurrency", "0", code=2, needle="'--concurrency': 0 is not"),
    C("eval-fewshot-negative", "eval", "{run}", "--num-fewshot", "-1", code=2, needle="'--num-fewshot': -1"),
    C("eval-port-70000", "eval", "{run}", "--port", "70000", code=2, needle="'--port': 70000 is not in"),
    C("eval-unknown-suite", "eval", "{run}", "--suite", "nope", needle="unknown suite 'nope'"),
    C("eval-include-missing", "eval", "{run}", "--include-path", "{root}/nope", needle="is not a folder"),
    C("eval-no-build", "eval", "{root}/run-nobuild", needle="has no finished build"),
    C("eval-agreement-text-calibrated-on", "eval", "{root}/run-heldout-calib", needle="must be measured on held-out"),
]

BENCH_CASES = [
    C("bench-endpoint-down", "bench", "{run}", "--endpoint", "{closed}/v1", needle="no OpenAI-compatible server"),
    C("bench-endpoint-not-url", "bench", "{run}", "--endpoint", "nope", needle="is not an http(s) URL"),
    C("bench-concurrency-0", "bench", "{run}", "--concurrency", "0", code=2, needle="must be at least 1"),
    C("bench-concurrency-list-0", "bench", "{run}", "--concurrency", "1,0,8", code=2, needle="must be at least 1"),
    C("bench-concurrency-word", "bench", "{run}", "--concurrency", "1,x", code=2, needle="not a comma-separated list"),
    C("bench-output-len-0", "bench", "{run}", "--output-len", "0", code=2, needle="'--output-len': 0 is not"),
    C("bench-no-build", "bench", "{root}/run-nobuild", needle="has no finished build"),
    C("bench-not-a-run", "bench", "{root}/calibdir", needle="not a reap run folder"),
    C("bench-vllm-flags-no-server", "bench", "{run}", "--endpoint", "{closed}/v1", "--", "--x", needle="starts none"),
    C(
        "recipe-bench-concurrency-0",
        "build",
        "{recipe}",
        "--set",
        "bench.concurrency=[0]",
        needle="bench.concurrency.0",
    ),
]

RUN_CASES = [
    C("run-only-publish", "run", "{recipe}", "--only", "publish", needle="add --publish"),
    C("run-only-bogus", "run", "{recipe}", "--only", "bogus", needle="--only bogus: no such stage"),
    C("run-from-after-until", "run", "{recipe}", "--from", "card", "--until", "build", needle="comes after"),
    C("run-dry-out-file", "run", "{recipe}", "--dry-run", "--out", "{root}/afile", needle="is a file, not a folder"),
    C("run-dry-other-recipe", "run", "{recipe}", "--dry-run", "--out", "{run}", needle="made by another recipe"),
    C("run-other-recipe", "run", "{recipe}", "--out", "{run}", needle="made by another recipe"),
    C("run-publish-no-repo", "run", "{recipe}", "--publish", needle="--publish needs publish.repo"),
    C("run-bits-3", "run", "{recipe}", "--dry-run", "--set", "quantize.bits=3", needle="3 bits cannot be served"),
]

PUBLISH_CASES = [
    C("publish-revision-space", "publish", "{run}", "--repo", "a/b", "--revision", "my branch", needle="--revision"),
    C("publish-bad-repo", "publish", "{run}", "--repo", "nope", needle="--repo: 'nope' is not a Hub repo id"),
    C("publish-no-repo", "publish", "{run}", needle="no repo to publish to"),
    C("publish-not-a-run", "publish", "{root}/calibdir", "--repo", "a/b", needle="not a reap run folder"),
    C("publish-no-build", "publish", "{root}/run-nobuild", "--repo", "a/b", needle="no finished, verified build"),
    C("publish-manifest-list", "publish", "{root}/run-list", "--repo", "a/b", needle="is not a reap manifest"),
    C("publish-no-token", "publish", "{run}", "--repo", "a/b", env={"HF_TOKEN": ""}, needle="no Hugging Face token"),
    C(
        "publish-hub-unreachable",
        "publish",
        "{run}",
        "--repo",
        "a/b",
        "--dry-run",
        env={"HF_TOKEN": FAKE_TOKEN},
        hub="closed",
        needle="cannot reach the Hub at",
    ),
    C(
        "publish-hub-answers-empty",
        "publish",
        "{run}",
        "--repo",
        "a/b",
        env={"HF_TOKEN": FAKE_TOKEN},
        hub="empty",
        needle="answered whoami without a user name",
    ),
]

PRUNE_DEMO_CASES = [
    C("prune-ratio-1.5", "prune", "{src16}", "--out", "{root}/o", "--ratio", "1.5", code=2, needle="0<x<1"),
    C("prune-keep-0", "prune", "{src16}", "--out", "{root}/o", "--keep", "0", code=2, needle="'--keep': 0 is not"),
    C("prune-nsamples-0", "prune", "{src16}", "--out", "{root}/o", "--nsamples", "0", code=2, needle="'--nsamples'"),
    C(
        "prune-out-a-file",
        "prune",
        "{src16}",
        "--out",
        "{root}/afile",
        "--keep",
        "2",
        "--method",
        "random",
        needle="file",
    ),
    C("prune-missing-src", "prune", "{root}/nope", "--out", "{root}/o", "--keep", "2", needle="not found"),
    C("prune-no-calibration", "prune", "{src16}", "--out", "{root}/o", "--keep", "2", needle="needs calibration"),
    C(
        "prune-binary-calibration",
        "prune",
        "{src16}",
        "--out",
        "{root}/o",
        "--keep",
        "2",
        "--calibration",
        "{root}/binary.yaml",
        needle="is unreadable",
    ),
    C("demo-model-under-file", "demo-model", "{root}/afile/x", needle="which is a file"),
    C("demo-model-steps-0", "demo-model", "{root}/d", "--steps", "0", code=2, needle="'--steps': 0 is not"),
    C("demo-model-layers-2", "demo-model", "{root}/d", "--layers", "2", code=2, needle="'--layers': 2 is not"),
]

CASES = (
    (RECIPE_CASES + BUILD_CASES + VERIFY_CARD_CASES + SERVE_CASES + EVAL_CASES + BENCH_CASES + RUN_CASES)
    + PUBLISH_CASES
    + PRUNE_DEMO_CASES
)


def test_the_table_has_at_least_60_distinct_cases_across_every_command():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    commands = {c.args[0] for c in CASES}
    assert commands == {"build", "verify", "card", "serve", "eval", "bench", "run", "publish", "prune", "demo-model"}


# --- the workspace every case runs in --------------------------------------------------------------------


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ws")
    src = make_checkpoint(root / "src")
    src16 = make_checkpoint(root / "src16", keep=("model",))  # a 16-bit source for prune
    cfg = json.loads((src16 / "config.json").read_text())
    del cfg["quantization_config"]
    (src16 / "config.json").write_text(json.dumps(cfg))
    (root / "calib.jsonl").write_text('{"text": "hello world"}\n')
    (root / "calibdir").mkdir()
    (root / "calibdir" / "a.txt").write_text("x")
    (root / "recipe.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "ws",
                "model": {"path": str(src), "license": "mit"},
                "quantize": {"bits": 4, "dataset": str(root / "calib.jsonl"), "device_map": "cpu"},
                "serve": {"tensor_parallel_size": 1},
            }
        )
    )
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "badyaml.yaml").write_text("name: [unclosed\n")
    (root / "afile").write_text("a file")
    for name, text in (("cfg-list", "[1, 2]"), ("cfg-bad", "{not json")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    bad_index = _copy_checkpoint(src, root / "bad-index")
    (bad_index / "model.safetensors.index.json").write_text("not json")
    bad_header = root / "bad-header"
    bad_header.mkdir()
    shutil.copy(src / "config.json", bad_header)
    (bad_header / "model.safetensors").write_bytes((100).to_bytes(8, "little") + b'{"a": ')
    no_shard = _copy_checkpoint(src, root / "no-shard")
    (no_shard / "model-00002-of-00002.safetensors").unlink()
    cut = _copy_checkpoint(src, root / "cut-shard")
    shard = cut / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # a built run (the golden manifest) and broken ones
    run = root / "run"
    _copy_checkpoint(src, run / "model")
    (run / "manifest.json").write_text((DATA / "golden_manifest.json").read_text())
    calibrated_on_heldout = json.loads((DATA / "golden_manifest.json").read_text())
    calibrated_on_heldout["recipe"]["quantize"]["dataset"] = str(data_dir("evals") / "demo/data/heldout.jsonl")
    _copy_checkpoint(src, root / "run-heldout-calib" / "model")
    for name, text in (
        ("run-heldout-calib", json.dumps(calibrated_on_heldout)),
        ("run-list", "[]"),
        ("run-badjson", "{"),
        ("run-nobuild", json.dumps({"name": "x", "stages": {}})),
    ):
        (root / name).mkdir(exist_ok=True)
        (root / name / "manifest.json").write_text(text)
    shutil.copytree(src, root / "run-list" / "model")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content digest (folders: "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if "__pycache__" in rel:
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class _Empty(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def servers():
    """A Hub that answers {} to everything, a TCP server that answers garbage, and a port nothing listens on."""
    empty = ThreadingHTTPServer(("127.0.0.1", 0), _Empty)
    threading.Thread(target=empty.serve_forever, daemon=True).start()
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen()

    def answer_garbage():
        while True:
            try:
                conn, _ = garbage.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"this is not HTTP\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    yield {
        "empty": f"http://127.0.0.1:{empty.server_address[1]}",
        "garbage": f"http://127.0.0.1:{garbage.getsockname()[1]}/v1",
        "closed": f"http://127.0.0.1:{closed_port}",
    }
    empty.shutdown()
    garbage.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case, workspace, servers, monkeypatch):
    monkeypatch.chdir(workspace)  # default output folders (runs/<name>) would land in the workspace too
    monkeypatch.delenv("REAP_DEBUG", raising=False)
    if case.hub:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "ENDPOINT", servers[case.hub])
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    paths = {
        "root": str(workspace),
        "recipe": str(workspace / "recipe.yaml"),
        "src": str(workspace / "src"),
        "src16": str(workspace / "src16"),
        "run": str(workspace / "run"),
        "garbage": servers["garbage"],
        "closed": servers["closed"],
    }
    args = [a.format(**paths) for a in case.args]
    before = snapshot(workspace)
    result = CliRunner(env={"HF_HOME": str(workspace.parent / "hf-home"), **case.env}).invoke(reap, args)
    assert result.exit_code == case.code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("Error:")]
    assert len(errors) == 1 and err[-1] == errors[0], result.stderr
    if case.code == 1:  # reap's own refusals: that one line and nothing else on stderr
        assert len(err) == 1, result.stderr
    assert case.needle in errors[0], errors[0]
    assert "unexpected" not in errors[0], errors[0]
    assert snapshot(workspace) == before
