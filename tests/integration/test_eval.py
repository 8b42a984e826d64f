"""reap eval with the real lm-eval against the real vLLM CPU server."""

from __future__ import annotations

import json

import pytest

from .conftest import manifest, reap_cli

pytestmark = pytest.mark.integration


def test_eval_against_the_shared_endpoint_and_a_generation_limit_set_too_low(demo_server, servable_build, tmp_path):
    """The demo tasks and a variant of the reversal task with a 1-token limit (its answers, 3-6 letters, are cut
    off), in one `reap eval`: the variant's truncation rate is reported and flagged in the card."""
    import yaml

    from reap.evaluate import load_suite, prepare_include

    tasks = prepare_include(load_suite("demo", None, None).include_paths, tmp_path / "tasks")
    short = yaml.safe_load((tasks / "demo_reverse.yaml").read_text())
    short["task"], short["generation_kwargs"]["max_gen_toks"] = "demo_reverse_short", 1
    (tasks / "demo_reverse_short.yaml").write_text(yaml.safe_dump(short))
    names = "demo_larger:acc,demo_reverse:exact_match,demo_reverse_short:exact_match"
    r = reap_cli(
        "eval", str(servable_build), "--endpoint", demo_server.base_url, "--tasks", names, "--include-path", str(tasks),
        "--limit", "60",
    )  # fmt: skip
    ev = manifest(servable_build)["stages"]["eval"]
    assert ev["status"] == "done" and ev["lm_eval_version"] == "0.4.13"
    larger, reverse = ev["results"]["demo_larger"], ev["results"]["demo_reverse"]
    print("W4A16 on the demo suite:", larger, reverse)
    assert larger["n"] == 60 and reverse["n"] == 60 and larger["model_type"] == "local-completions"
    assert larger["value"] >= 0.85 and reverse["value"] >= 0.85  # far above chance (0.5 and ~0)
    saved = json.loads((servable_build / "eval" / "quantized" / "demo_larger.json").read_text())
    assert saved["results"]["demo_larger"]["acc,none"] == larger["value"]
    assert reverse["generation"]["max_gen_toks"] == 16 and reverse["generation"]["truncated"] == 0
    g = ev["results"]["demo_reverse_short"]["generation"]
    print("1-token limit:", g)
    assert g["max_gen_toks"] == 1 and g["n"] == 60 and g["truncated_rate"] >= 0.5
    card = (servable_build / "model" / "README.md").read_text()
    assert f"| demo_larger | acc | 0 | 60 | {larger['value']:.4f} ± {larger['stderr']:.4f} |" in card
    assert "model-index:" in card and "**Flagged: demo_reverse_short.**" in card and "**over 1 %**" in card
    assert "demo_larger" in r.stdout


def test_chat_url_for_a_multiple_choice_task_is_refused_with_why(demo_server, servable_build):
    r = reap_cli(
        "eval",
        str(servable_build),
        "--endpoint",
        demo_server.base_url + "/chat/completions",
        "--limit",
        "5",
        check=False,
    )
    assert r.returncode == 1 and "loglikelihood, which chat endpoints cannot return" in r.stderr


def test_unknown_task_suite_and_dead_endpoint(demo_server, servable_build):
    r = reap_cli(
        "eval", str(servable_build), "--endpoint", demo_server.base_url, "--tasks", "no_such_task", check=False
    )
    assert r.returncode == 1 and "unknown lm-eval task(s) ['no_such_task']" in r.stderr
    r = reap_cli("eval", str(servable_build), "--suite", "nope", check=False)
    assert r.returncode == 1 and "unknown suite 'nope'; known suites: demo, standard" in r.stderr
    r = reap_cli("eval", str(servable_build), "--endpoint", "http://127.0.0.1:9/v1", check=False)
    assert r.returncode == 1 and "no OpenAI-compatible server answers at http://127.0.0.1:9/v1" in r.stderr


def test_baseline_and_recovery_in_the_card(servable_build, demo_server):
    from .conftest import free_port

    # The shared server is busy with nothing now; reap starts its own servers for source and W4A16 in turn.
    reap_cli("eval", str(servable_build), "--baseline", "--limit", "60", "--port", str(free_port()))
    ev = manifest(servable_build)["stages"]["eval"]
    assert ev["status"] == "done"
    for task, r in ev["results"].items():
        src = ev["baseline"]["results"][task]
        print(f"{task}: source {src['value']:.3f} ± {src['stderr']:.3f}  W4A16 {r['value']:.3f} ± {r['stderr']:.3f}")
        assert r["value"] >= 0.9 * src["value"], (task, r, src)
        for side in (r, src):  # lm-eval's standard error: 0 only for a score of 0 or 1
            assert side["stderr"] > 0 if 0 < side["value"] < 1 else side["stderr"] == 0, side
        p = ev["paired"][task]
        print(f"{task}: paired {p}")
        assert p["n"] == 60 and p["recovery"] == pytest.approx(r["value"] / src["value"])
        assert p["recovery_ci95"][0] <= p["recovery"] <= p["recovery_ci95"][1] and isinstance(p["within_noise"], bool)
    reverse = ev["results"]["demo_reverse"]["generation"]
    assert reverse["max_gen_toks"] == 16 and reverse["n"] == 60 and reverse["truncated"] == 0
    a = ev["agreement"]
    print("token-level agreement, W4A16 against its source:", a)
    assert a["docs"] == 16 and a["mismatched_docs"] == 0 and a["positions"] > 2000 and a["held_out_checked"]
    assert 0 < a["kl_mean"] < 0.05 and a["top1_agreement"] > 0.9  # int4 moves the distribution, a little
    assert a["perplexity_quantized"] == pytest.approx(a["perplexity_source"], rel=0.1)
    card = (servable_build / "model" / "README.md").read_text()
    assert "| bf16 source |" in card and "| recovery [95 % CI] |" in card and "noise |" in card
    assert "### Token-level agreement with the bf16 source" in card and "type: perplexity" in card
    assert (servable_build / "logs" / "serve-baseline.log").is_file()


def test_the_same_model_on_both_sides_agrees_fully(demo_server):
    """Two captures of the held-out text from one server are the two sides of a comparison of a model with
    itself: KL 0 (up to float rounding) and every top-1 token the same."""
    from reap.evaluate import capture_logprobs, load_suite
    from reap.quality import compare_logprobs

    agreement = load_suite("demo", None, None).agreement
    texts = agreement.texts()[:8]
    first, second = (capture_logprobs(demo_server.base_url, "demo", texts, agreement.top_k) for _ in range(2))
    a = compare_logprobs(first, second)
    print("the same model twice:", a)
    assert a["docs"] == 8 and a["mismatched_docs"] == 0
    assert a["kl_mean"] == pytest.approx(0, abs=1e-6) and a["kl_max"] < 1e-4 and a["top1_agreement"] == 1.0
    assert a["perplexity_source"] == pytest.approx(a["perplexity_quantized"], rel=1e-5)
