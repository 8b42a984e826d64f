"""reap eval with the real lm-eval against the real vLLM CPU server."""

from __future__ import annotations

import json

import pytest

from .conftest import manifest, reap_cli

pytestmark = pytest.mark.integration


def test_eval_against_the_shared_endpoint(demo_server, servable_build):
    r = reap_cli("eval", str(servable_build), "--endpoint", demo_server.base_url, "--limit", "60")
    ev = manifest(servable_build)["stages"]["eval"]
    assert ev["status"] == "done" and ev["suite"] == "demo" and ev["lm_eval_version"] == "0.4.13"
    larger, reverse = ev["results"]["demo_larger"], ev["results"]["demo_reverse"]
    print("W4A16 on the demo suite:", larger, reverse)
    assert larger["n"] == 60 and reverse["n"] == 60 and larger["model_type"] == "local-completions"
    assert larger["value"] >= 0.85 and reverse["value"] >= 0.85  # far above chance (0.5 and ~0)
    saved = json.loads((servable_build / "eval" / "quantized" / "demo_larger.json").read_text())
    assert saved["results"]["demo_larger"]["acc,none"] == larger["value"]
    card = (servable_build / "model" / "README.md").read_text()
    assert f"| demo_larger | acc | 0 | {larger['value']:.4f} |" in card and "model-index:" in card
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
        print(f"{task}: source {src['value']:.3f}  W4A16 {r['value']:.3f}")
        assert r["value"] >= 0.9 * src["value"], (task, r, src)
    card = (servable_build / "model" / "README.md").read_text()
    assert "| bf16 source |" in card and " % |" in card
    assert (servable_build / "logs" / "serve-baseline.log").is_file()
