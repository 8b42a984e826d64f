"""reap eval's own logic, without a server: suites, endpoints, and keeping what finished when a task fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reap import evaluate as ev
from reap import serve
from reap.errors import InputError
from reap.rundir import RunDir

from .fake_server import fake_server

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
    chat = ev.model_args("local-chat-completions", "http://h:1/v1", "d", tmp_path, 1, 1)
    assert chat["base_url"].endswith("/chat/completions")
    # several prompts per completions request; lm-eval's chat requests take one
    assert a["batch_size"] == ev.PROMPTS_PER_REQUEST > 1 and chat["batch_size"] == 1


def lm_eval_result(task: str, metric: str, scores: list[int], answers: list[str] | None = None, limit: int = 16):
    """What lm-eval's simple_evaluate returns for one task with per-document `scores` (log_samples on)."""
    import math

    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1))
    samples = [
        {
            "doc_id": i,
            "doc_hash": f"d{i}",
            "prompt_hash": f"p{i}",
            "target_hash": f"t{i}",
            "filter": "strip" if answers else "none",
            "arguments": [["prompt", {"until": ["\n"], "max_gen_toks": limit}]] if answers else [["prompt", " a"]],
            "resps": [[answers[i]]] if answers else [[[-1.0, False]]],
            metric: float(score),
        }
        for i, score in enumerate(scores)
    ]
    flt = "strip" if answers else "none"
    return {
        "results": {task: {f"{metric},{flt}": mean, f"{metric}_stderr,{flt}": sd / math.sqrt(n)}},
        "configs": {task: {"output_type": "generate_until" if answers else "multiple_choice", "test_split": "test"}},
        "samples": {task: samples},
    }


def test_a_baseline_run_records_errors_paired_recovery_truncation_and_agreement(tmp_path, monkeypatch):
    """Source and W4A16 answer the same 10 documents; W4A16 loses one of each task; its answers to the
    generation task reach the 4-token limit twice. Its top-1 next token differs from the source's at one of
    four positions of the held-out text."""
    import math

    from .ckpt_factory import make_checkpoint

    run = RunDir(tmp_path)
    manifest = json.loads((DATA / "golden_manifest.json").read_text())
    manifest["stages"]["build"]["source"] = str(make_checkpoint(tmp_path / "source"))
    run.write_manifest(manifest)
    make_checkpoint(tmp_path / "model")
    monkeypatch.setattr(ev, "preflight", lambda *a, **k: (None, 1024))
    monkeypatch.setattr(ev, "check_endpoint", lambda *a, **k: {"id": "demo", "max_model_len": 1024})
    monkeypatch.setattr(ev, "token_counter", lambda tokenizer: lambda text: len(text.split()))

    events = []
    monkeypatch.setattr(serve, "Server", fake_server(events, on_cpu=True))
    monkeypatch.setattr(serve, "cpu_room_for", lambda target, starting: True)

    def fake_evaluate(**kw):
        source = kw["model_args"]["model"] == "demo-source"
        if kw["tasks"] == ["demo_larger"]:
            return lm_eval_result("demo_larger", "acc", [1] * 9 + [1 if source else 0])
        answers = [" abc"] * 8 + ([" ab", " x"] if source else [" a b c d", " a b c d e"])
        return lm_eval_result("demo_reverse", "exact_match", [1] * 9 + [1 if source else 0], answers, limit=4)

    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)

    def top(probs):
        return [[t, math.log(p)] for t, p in probs.items()]

    def fake_capture(base_url, served, texts, top_k, **kw):
        flip = {1: 0.4, 2: 0.6} if served == "demo" else {1: 0.6, 2: 0.4}
        doc = {"tokens": [5, 1, 2], "logprobs": [math.log(0.9), math.log(flip[2])], "top": [top({1: 0.9, 2: 0.1})]}
        doc["top"].append(top(flip))
        return [doc, {**doc, "top": [top({1: 0.9, 2: 0.1})] * 2, "logprobs": [math.log(0.9), math.log(0.1)]}]

    monkeypatch.setattr(ev, "capture_logprobs", fake_capture)
    record = ev.evaluate(tmp_path, endpoint="http://127.0.0.1:8000/v1", baseline=True)
    larger, reverse = record["results"]["demo_larger"], record["results"]["demo_reverse"]
    assert larger["stderr"] == pytest.approx(math.sqrt(0.9 * 0.1 / 9)) and larger["n"] == 10
    assert reverse["filter"] == "strip" and larger["items"] == record["baseline"]["results"]["demo_larger"]["items"]
    assert reverse["generation"] == {
        "max_gen_toks": 4,
        "n": 10,
        "truncated": 2,
        "empty": 0,
        "truncated_rate": 0.2,
        "empty_rate": 0.0,
    }
    assert record["baseline"]["results"]["demo_reverse"]["generation"]["truncated"] == 0
    p = record["paired"]["demo_larger"]
    assert p["n"] == 10 and p["recovery"] == pytest.approx(0.9) and p["diff"] == pytest.approx(-0.1)
    assert p["within_noise"] and p["recovery_ci95"][0] < 0.9 < p["recovery_ci95"][1]
    a = record["agreement"]
    assert a["docs"] == 2 and a["positions"] == 4 and a["top1_agreement"] == 0.75 and a["kl_mean"] > 0
    assert a["data"] == "heldout.jsonl" and a["top_k"] == 20 and a["held_out_checked"]
    assert record["logprobs"]["sha256"] == ev.sha256((tmp_path / "eval" / "quantized" / "logprobs.jsonl").read_text())
    assert run.read_manifest()["stages"]["eval"]["agreement"] == a
    # W4A16 at --endpoint: the source alone served
    assert events == ["start demo-source:8000", "term demo-source", "stop demo-source"]

    # W4A16 again without --baseline: the source's results and logprobs are kept and compared again
    record = ev.evaluate(tmp_path, endpoint="http://127.0.0.1:8000/v1")
    assert record["paired"]["demo_larger"]["recovery"] == pytest.approx(0.9) and record["agreement"]["docs"] == 2
    # the source's files changed since they were recorded: nothing is compared with them
    (tmp_path / "eval" / "baseline" / "demo_larger.samples.jsonl").write_text("")
    (tmp_path / "eval" / "baseline" / "logprobs.jsonl").write_text("")
    record = ev.evaluate(tmp_path, endpoint="http://127.0.0.1:8000/v1")
    assert "demo_larger" not in record["paired"] and "demo_reverse" in record["paired"]
    assert record["agreement"] is None


def test_agreement_text_that_shares_rows_with_the_calibration_data_is_refused(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    manifest = json.loads((DATA / "golden_manifest.json").read_text())
    manifest["recipe"]["quantize"]["dataset"] = str(ev.load_suite("demo", None, None).agreement.data)
    run.write_manifest(manifest)
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(InputError, match="shares 16 row.s. with the calibration data heldout.jsonl"):
        ev.evaluate(tmp_path, endpoint="http://127.0.0.1:9/v1")
    assert (tmp_path / "manifest.json").read_text() == before and not (tmp_path / "eval").exists()


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
        return lm_eval_result("demo_larger", "acc", [1] * 9 + [0])

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


def test_prompt_logprobs_are_asked_for_by_token_id_with_the_key(monkeypatch):
    seen = []

    def fake_completions(url, timeout, body, api_key):  # vLLM's answer, echo + logprobs, tokens as ids
        seen.append((url, body, api_key))
        logprobs = {
            "tokens": ["token_id:1", "token_id:2"],
            "token_logprobs": [None, -0.1],
            "top_logprobs": [None, {"token_id:2": -0.1, "token_id:3": -2.5}],
        }
        return 200, json.dumps({"usage": {"prompt_tokens": 2}, "choices": [{"logprobs": logprobs}]}).encode()

    monkeypatch.setattr(ev, "http_request", fake_completions)
    docs = ev.capture_logprobs("http://h:1/v1", "demo", ["ab"], 20, api_key="k")
    assert docs == [{"tokens": [1, 2], "logprobs": [-0.1], "top": [[[2, -0.1], [3, -2.5]]]}]
    url, body, key = seen[0]
    assert url == "http://h:1/v1/completions" and key == "k"
    assert body == {
        "model": "demo",
        "prompt": "ab",
        "max_tokens": 0,
        "temperature": 0,
        "echo": True,
        "logprobs": 20,
        "return_tokens_as_token_ids": True,
    }
    monkeypatch.setattr(ev, "http_request", lambda *a, **k: (400, b'{"message": "This model\'s maximum context"}'))
    with pytest.raises(ev.EvalError, match="HTTP 400: .*maximum context.*must fit the server's max_model_len"):
        ev.capture_logprobs("http://h:1/v1", "demo", ["ab"], 20)


Q, B, B2 = "http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1", "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize(
    "room, failing, expected",
    [
        # both fit: started together, the source on the next port; closed together after the stage
        (
            True,
            (),
            ["start demo:8000", "start demo-source:8001", f"eval demo at {Q}", f"eval demo-source at {B}"]
            + ["term demo", "term demo-source", "stop demo", "stop demo-source"],
        ),
        # they do not fit: one at a time
        (
            False,
            (),
            ["start demo:8000", f"eval demo at {Q}", "term demo", "stop demo", "start demo-source:8000"]
            + [f"eval demo-source at {B2}", "term demo-source", "stop demo-source"],
        ),
        # the source cannot start: W4A16 is evaluated first all the same, then the source's start fails again
        (
            True,
            ("demo-source",),
            ["start demo:8000", "start demo-source:8001", "stop demo-source", f"eval demo at {Q}"]
            + ["start demo-source:8001", "stop demo-source", "term demo", "stop demo"],
        ),
    ],
)
def test_eval_starts_both_cpu_servers_at_once_where_they_fit(tmp_path, monkeypatch, room, failing, expected):
    """`reap eval --baseline` on the CPU build: W4A16 and source servers start together (two start-ups take
    as long as one), each on its own port; where memory does not hold both, one at a time; a side that cannot
    start costs the other side nothing."""
    run = RunDir(tmp_path)
    run.write_manifest(json.loads((DATA / "golden_manifest.json").read_text()))
    events = []
    monkeypatch.setattr(serve, "Server", fake_server(events, on_cpu=True, failing=failing))
    monkeypatch.setattr(serve, "cpu_room_for", lambda target, starting: room)
    monkeypatch.setattr(serve, "port_free", lambda host, port: True)
    monkeypatch.setattr(ev, "held_out_check", lambda *a: False)

    def fake_run_suite(suite, base_url, served, *a, on_task, **kw):
        events.append(f"eval {served} at {base_url}")
        on_task({"demo_larger": {"value": 1.0}})

    monkeypatch.setattr(ev, "run_suite", fake_run_suite)
    monkeypatch.setattr(ev, "record_logprobs", lambda *a, **k: None)
    if failing:
        with pytest.raises(serve.ServeError, match="demo-source cannot start"):
            ev.evaluate(tmp_path, baseline=True)
        saved = run.read_manifest()["stages"]["eval"]
        assert saved["status"] == "failed" and saved["results"] == {"demo_larger": {"value": 1.0}}
    else:
        ev.evaluate(tmp_path, baseline=True)
    assert events == expected
