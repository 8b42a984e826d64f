"""Issue 15: no secret in a printed or recorded command, the eval key reaches lm-eval, offline mode and the
key stay inside eval, and what goes to the Hub carries no local absolute path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reap import compat, serve
from reap import evaluate as ev
from reap.card import card_metadata, render_card
from reap.errors import InputError
from reap.rundir import RunDir
from reap.secrets import hide_local_paths, mask_argv, redact
from reap.serve import ServeOptions, Server, Target, build_command

from .ckpt_factory import make_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = "sk-reap-test-9f8e7d6c5b4a"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("secrets") / "model")


def test_mask_argv_hides_the_values_of_secret_flags_only():
    argv = ["vllm", "--api-key", KEY, "--hf-token=hf_abc", "--tokenizer", "/t", "--max-num-batched-tokens", "8"]
    assert mask_argv(argv) == [
        "vllm",
        "--api-key",
        "***",
        "--hf-token=***",
        "--tokenizer",
        "/t",
        "--max-num-batched-tokens",
        "8",
    ]


def test_api_key_after_dashes_goes_to_vllm_by_environment_never_argv(ckpt, tmp_path, monkeypatch, capsys):
    """Before: `reap serve RUN -- --api-key SECRET` printed the key (dry run and the `[reap] serve:` line) and
    recorded it in stages.serve.argv, which public_manifest() published."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    tgt = Target(ckpt, "m", RunDir(tmp_path / "run"), {})
    for extra in (["--api-key", KEY, "--enable-prefix-caching"], [f"--api-key={KEY}", "--enable-prefix-caching"]):
        opts = ServeOptions(device="cpu", extra_args=extra)
        argv, env = build_command(tgt, opts)
        assert KEY not in " ".join(argv) and argv[-1] == "--enable-prefix-caching" and env["VLLM_API_KEY"] == KEY
        assert KEY not in serve.dry_run(tgt, opts)
        srv = Server(tgt, opts)
        assert srv.api_key == KEY and KEY not in json.dumps(srv.record())
    # any other flag naming a token is masked in what is printed and recorded
    srv = Server(tgt, ServeOptions(device="cpu", extra_args=["--hf-token", KEY]))
    assert KEY in srv.argv and KEY not in json.dumps(srv.record())
    assert KEY not in serve.dry_run(tgt, ServeOptions(device="cpu", extra_args=["--hf-token", KEY]))
    monkeypatch.setattr(serve.procs, "start_group", lambda *a, **k: None)
    monkeypatch.setattr(serve, "port_free", lambda *a: True)
    monkeypatch.setattr(serve, "check_cpu_can_serve", lambda c: None)
    srv.start()
    assert KEY not in capsys.readouterr().err


def test_eval_hands_the_servers_key_to_lm_eval_and_keeps_offline_mode_inside(tmp_path, monkeypatch):
    """Before: with VLLM_API_KEY set, reap eval started the server with the key but lm-eval sent none (every
    request refused); and eval set HF_HUB_OFFLINE for the whole process, so a later publish of the same
    `reap run` failed with "offline mode is on"."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("VLLM_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    run = RunDir(tmp_path)
    run.write_manifest(json.loads((DATA / "golden_manifest.json").read_text()))
    (tmp_path / "model").mkdir()
    seen = {}

    def fake_models(base_url, api_key):
        seen["models_key"] = api_key
        return [{"id": "demo", "max_model_len": 1024}]

    def fake_evaluate(**kw):
        seen["lm_eval_key"] = os.environ.get("OPENAI_API_KEY")
        seen["offline"] = hub_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
        task = kw["tasks"][0]
        sample = {"doc_id": 0, "doc_hash": "d", "prompt_hash": "p", "target_hash": "t", "acc": 0.5}
        return {
            "results": {task: {"acc,none": 0.5, "exact_match,none": 0.5}},
            "configs": {task: {"test_split": None, "validation_split": "validation"}},
            "samples": {task: [sample]},
        }

    import lm_eval

    monkeypatch.setattr(ev, "endpoint_models", fake_models)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    rec = ev.evaluate(tmp_path, endpoint="http://127.0.0.1:9/v1")
    assert seen == {"models_key": KEY, "lm_eval_key": KEY, "offline": (True, "1")}
    assert "OPENAI_API_KEY" not in os.environ and "HF_HUB_OFFLINE" not in os.environ
    assert hub_constants.HF_HUB_OFFLINE is False
    assert rec["results"]["demo_larger"]["split"] == "validation"
    assert KEY not in (tmp_path / "manifest.json").read_text()


def test_scoped_env_restores_absent_and_present_values(monkeypatch):
    monkeypatch.setenv("REAP_T1", "old")
    monkeypatch.delenv("REAP_T2", raising=False)
    with compat.scoped_env({"REAP_T1": "new", "REAP_T2": "x"}):
        assert os.environ["REAP_T1"] == "new" and os.environ["REAP_T2"] == "x"
    assert os.environ["REAP_T1"] == "old" and "REAP_T2" not in os.environ


def test_model_index_takes_split_and_fewshot_from_the_task_and_base_model_is_a_hub_id_or_absent():
    """Before: model-index said `split: test` for every task (lm-eval scores hellaswag on validation) and
    base_model fell back to the local folder's name."""
    manifest = json.loads((DATA / "golden_manifest.json").read_text())
    manifest["stages"]["eval"] = {
        "status": "done",
        "model_id": manifest["stages"]["build"]["model_id"],
        "suite": "standard",
        "lm_eval_version": "0.4.13",
        "results": {
            "hellaswag": {"metric": "acc_norm", "value": 0.8, "num_fewshot": 10, "split": "validation"},
            "mmlu": {"metric": "acc", "value": 0.7, "num_fewshot": 5, "split": "test"},
        },
    }
    results = card_metadata(manifest).eval_results
    assert [(r.dataset_type, r.dataset_split, r.dataset_args) for r in results] == [
        ("hellaswag", "validation", {"num_few_shot": 10}),
        ("mmlu", "test", {"num_few_shot": 5}),
    ]
    manifest["recipe"]["model"]["base_model"] = None
    text = str(render_card(manifest))
    assert "base_model:" not in text.split("---")[1] and "| base |" not in text


def test_card_commands_and_recipe_show_no_local_absolute_path():
    manifest = json.loads((DATA / "golden_manifest.json").read_text())
    manifest["stages"]["build"]["argv"] = ["reap", "build", "/home/me/r.yaml", "--model", "/data/src", "--out=/x/run"]
    manifest["recipe"]["model"]["path"] = "/home/me/models/src"
    manifest["recipe"]["quantize"]["dataset"] = "/home/me/calib.jsonl"
    text = str(render_card(manifest))
    assert "/home/me" not in text and "/data/src" not in text and "/x/run" not in text
    assert "reap build <local path> --model <local path> --out=<local path>\n" in text
    assert hide_local_paths("path: /a/b, url: http://h/x, repo: org/name") == (
        "path: <local path>, url: http://h/x, repo: org/name"
    )


def test_api_key_with_several_values_is_refused_and_every_value_is_masked(ckpt, tmp_path, monkeypatch):
    """Before: vLLM's --api-key takes a list; `-- --api-key K1 K2` moved K1 to the environment and left K2 in
    argv, and mask_argv hid only one value after a secret flag, so K2 was printed."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    k2 = KEY[::-1]
    tgt = Target(ckpt, "m", RunDir(tmp_path / "run"), {})
    with pytest.raises(InputError) as err:
        build_command(tgt, ServeOptions(device="cpu", extra_args=["--api-key", KEY, k2, "--enable-prefix-caching"]))
    assert "one" in str(err.value) and KEY not in str(err.value) and k2 not in str(err.value)
    assert mask_argv(["vllm", "--hf-token", KEY, k2, "-tp", "2"]) == ["vllm", "--hf-token", "***", "***", "-tp", "2"]


def test_mask_argv_stops_hiding_at_a_single_dash_flag():
    """Before: only a value starting with `--` ended a secret flag's values, so after a switch whose name has a
    secret word (no value) `-tp` was masked."""
    assert mask_argv(["--disable-token-stats", "-tp", "2"]) == ["--disable-token-stats", "-tp", "2"]


def test_short_secret_values_do_not_damage_ordinary_text(monkeypatch):
    """Before: VLLM_API_KEY=test turned published results into {"split": "***", "task": "la***"} and
    `--served-model-name test-model` into `***-model`."""
    monkeypatch.setenv("VLLM_API_KEY", "test")
    assert redact('{"split": "test", "task": "latest"}') == '{"split": "test", "task": "latest"}'
    assert mask_argv(["--served-model-name", "test-model"]) == ["--served-model-name", "test-model"]
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    assert redact(f"Bearer {KEY}.") == "Bearer ***."
    assert mask_argv(["--served-model-name", f"{KEY}-model", f"--x={KEY}"]) == ["--served-model-name", "***", "--x=***"]


def test_a_server_started_under_vllm_api_key_hands_that_key_to_its_probes_and_lm_eval(ckpt, tmp_path, monkeypatch):
    """Server.api_key is the one place the key a server runs with is resolved (the option that nobody set and
    http_request's own fallback to the environment are gone): an eval-started server must still pass it on."""
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    srv = Server(Target(ckpt, "m", RunDir(tmp_path / "run"), {}), ServeOptions(device="cpu"))
    assert srv.api_key == KEY and "VLLM_API_KEY" not in srv.env_add
    sent = {}

    def urlopen(req, timeout):
        sent.update(req.headers)
        raise serve.urllib.error.URLError("refused")

    monkeypatch.setattr(serve.urllib.request, "urlopen", urlopen)
    serve.http_request("http://127.0.0.1:9/health")
    assert "Authorization" not in sent


def test_hide_local_paths_keeps_a_closing_backtick():
    """Before: "`/v1/completions`" became "`<local path>": the path swallowed the closing backtick."""
    assert hide_local_paths("POST `/v1/completions` to `/srv/x`.") == "POST `<local path>` to `<local path>`."


def test_a_hub_token_is_masked_in_an_error_line_even_when_this_process_does_not_know_it():
    """Before: only publish knew the shape of a Hub token; an error line carrying one printed it."""
    token = "hf_" + "a1B2" * 9
    assert redact(f"401 for token {token}") == "401 for token ***"


def test_a_failure_message_recorded_in_the_manifest_holds_no_known_secret(tmp_path, monkeypatch):
    """The ad-hoc redaction of lm-eval's failure line is gone (errors are redacted where they are shown):
    the manifest, where eval records that line as the stage's error, masks known secrets itself."""
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    run = RunDir(tmp_path)
    run.update_stage("eval", {"status": "partial", "error": f"EvalError: 401 with key {KEY}"})
    assert KEY not in run.manifest_path.read_text()
    assert run.read_manifest()["stages"]["eval"]["error"] == "EvalError: 401 with key ***"
