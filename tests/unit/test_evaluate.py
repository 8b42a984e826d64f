"""reap eval's own logic, without a server: suites, endpoints, and keeping what finished when a task fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reap import evaluate as ev
from reap.errors import InputError
from reap.rundir import RunDir

DATA = Path(__file__).resolve().parents[1] / "data"


def test_suites_and_tasks(tmp_path):
    demo = ev.load_suite("demo", None, None)
    assert [t.name for t in demo.tasks] == ["demo_larger", "demo_reverse"] and demo.offline
    assert demo.include_paths[0].name == "demo"
    std = ev.load_suite("standard", None, None)
    assert {"arc_challenge", "hellaswag", "mmlu", "gsm8k"} <= {t.name for t in std.tasks} and not std.offline
    custom = ev.load_suite(None, "my_task:f1,other", tmp_path)
    assert [(t.name, t.metric) for t in custom.tasks] == [("my_task", "f1"), ("other", "acc")]
    with pytest.raises(InputError, match="unknown suite 'x'; known suites: demo, standard"):
        ev.load_suite("x", None, None)
    with pytest.raises(InputError, match="not a folder"):
        ev.load_suite(None, "t", tmp_path / "missing")


def test_task_data_paths_are_made_absolute(tmp_path):
    out = ev.prepare_include(ev.load_suite("demo", None, None).include_paths, tmp_path)
    import yaml

    cfg = yaml.safe_load((out / "demo_larger.yaml").read_text())
    path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path.is_file()


def test_endpoint_forms():
    assert ev.normalize_endpoint("http://h:1/v1/") == ("http://h:1/v1", None)
    assert ev.normalize_endpoint("http://h:1/v1/completions") == ("http://h:1/v1", "/completions")
    assert ev.normalize_endpoint("http://h:1/v1/chat/completions") == ("http://h:1/v1", "/chat/completions")


def test_model_args_use_local_tokenizer_server_length_and_concurrency(tmp_path):
    a = ev.model_args("local-completions", "http://h:1/v1", "demo", tmp_path, 4096, 16)
    assert a["base_url"] == "http://h:1/v1/completions" and a["tokenizer"] == str(tmp_path)
    assert a["max_length"] == 4096 and a["num_concurrent"] == 16 and a["tokenized_requests"] is False
    assert ev.model_args("local-chat-completions", "http://h:1/v1", "d", tmp_path, 1, 1)["base_url"].endswith(
        "/chat/completions"
    )


def test_a_failing_task_keeps_the_finished_ones_marked_partial(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    manifest = json.loads((DATA / "golden_manifest.json").read_text())
    run.write_manifest(manifest)
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(ev, "preflight", lambda *a, **k: (None, 1024))
    monkeypatch.setattr(ev, "check_endpoint", lambda *a, **k: {"id": "demo", "max_model_len": 1024})
    calls = []

    def fake_evaluate(**kw):  # stands in for lm-eval: the first task finishes, then the server dies
        calls.append(kw["tasks"][0])
        if len(calls) == 2:
            raise ConnectionError("Cannot connect to host 127.0.0.1:8000")
        return {
            "results": {"demo_larger": {"acc,none": 0.9, "acc_stderr,none": 0.01}},
            "samples": {"demo_larger": [{}]},
        }

    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    with pytest.raises(ev.EvalError, match="demo_reverse failed against http://127.0.0.1:8000/v1: ConnectionError"):
        ev.evaluate(tmp_path, endpoint="http://127.0.0.1:8000/v1")
    rec = run.read_manifest()["stages"]["eval"]
    assert rec["status"] == "failed" and "ConnectionError" in rec["error"]
    assert rec["results"]["demo_larger"]["value"] == 0.9 and "demo_reverse" not in rec["results"]
    assert (tmp_path / "eval" / "quantized" / "demo_larger.json").is_file()


def test_a_run_refused_before_any_result_leaves_the_previous_record(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    manifest = json.loads((DATA / "golden_manifest.json").read_text())
    manifest["stages"]["eval"] = {"status": "done", "suite": "demo", "results": {"demo_larger": {"value": 1.0}}}
    run.write_manifest(manifest)
    with pytest.raises(ev.EvalError, match="no OpenAI-compatible server answers"):
        ev.evaluate(tmp_path, endpoint="http://127.0.0.1:9/v1")
    assert run.read_manifest()["stages"]["eval"]["status"] == "done"


def test_the_baseline_is_served_with_the_recipes_serve_section(tmp_path, monkeypatch):
    from reap import serve
    from reap.serve import ServeOptions, build_command

    from .ckpt_factory import make_checkpoint

    source = make_checkpoint(tmp_path / "source")
    make_checkpoint(tmp_path / "run" / "model")
    manifest = json.loads((DATA / "golden_manifest.json").read_text())
    manifest["stages"]["build"]["source"] = str(source)
    manifest["recipe"]["serve"].update(tensor_parallel_size=2, max_model_len=777)
    run = RunDir(tmp_path / "run")
    monkeypatch.setattr(serve, "visible_gpus", lambda: 2)
    for label, target in ev.targets(run, manifest, baseline=True):
        argv, _ = build_command(target, ServeOptions(device="cuda"))
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2", label
        assert argv[argv.index("--max-model-len") + 1] == "777", label
    assert [t.served_name for _, t in ev.targets(run, manifest, baseline=True)] == ["demo", "demo-source"]
