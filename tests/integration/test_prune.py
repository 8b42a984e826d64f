"""`reap prune` on the trained demo model: the REAP-vs-baselines benchmark on a small budget,
and the pruned model through transformers, `reap build` and `reap serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reap.resources import data_dir

from .conftest import DEMO_RECIPE, free_port, manifest, reap_cli, served_right

pytestmark = pytest.mark.integration
CALIBRATION = str(data_dir("evals") / "demo" / "data" / "calibration.jsonl")
COMPARE = Path(__file__).resolve().parents[2] / "benchmarks" / "prune_compare.py"


def test_the_comparison_benchmark_reports_every_method_with_its_spread(demo_source, tmp_path):
    """benchmarks/prune_compare.py (docs/benchmarks.md's REAP-vs-baselines figures) on a small budget: every method
    scored, paired differences to REAP computed per source. Which method wins is the benchmark's finding, not a
    pass/fail criterion: on a model this small it flips with the machine that trained it (docs/benchmarks.md)."""
    work = tmp_path / "compare"
    proc = subprocess.run(
        [sys.executable, str(COMPARE), str(demo_source), str(demo_source), "--out", str(work / "pruned"),
         "--json", str(work / "compare.json"), "--ratios", "0.5", "--methods", "reap", "frequency",
         "--random-seeds", "1", "--limit", "10"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((work / "compare.json").read_text())
    assert {(r["source"], r["method"]) for r in data["rows"]} == {
        (s, m) for s in (f"0:{demo_source.name}", f"1:{demo_source.name}") for m in ("reap", "frequency", "random")
    }
    assert all(r["experts_after"] == 4 and 0 <= r["kept"] <= 2 for r in data["rows"])
    summary = data["summary"]["0.5"]
    kept = {m: summary[m]["kept_per_source"] for m in ("reap", "frequency", "random")}
    assert summary["frequency"]["reap_minus_this"] == [
        a - b for a, b in zip(kept["reap"], kept["frequency"], strict=True)
    ]
    assert summary["reap"]["reap_minus_this"] == [0.0, 0.0]
    assert kept["reap"][0] == kept["reap"][1]  # same source, same calibration: pruning is deterministic
    assert "| 50% | frequency |" in proc.stdout


@pytest.fixture(scope="module")
def pruned(demo_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune") / "demo-reap50"
    proc = reap_cli("prune", str(demo_source), "--out", str(out), "--ratio", "0.5", "--calibration", CALIBRATION)
    assert "8 -> 4 experts in each of 4 MoE layers" in proc.stdout
    return out


def test_prune_records_the_saliency_report_and_measured_stats(pruned, demo_source):
    p = manifest(pruned)["stages"]["prune"]
    assert p["status"] == "done" and p["method"] == "reap" and p["argv"][:2] == ["reap", "prune"]
    assert (p["experts_before"], p["experts_after"], p["moe_layers"], p["top_k"]) == (8, 4, 4, 2)
    assert [row["layer"] for row in p["layers"]] == [0, 1, 2, 3]
    for row in p["layers"]:
        assert (
            len(row["scores"]) == 8 and len(row["kept"]) == 4 and sorted(row["kept"] + row["dropped"]) == list(range(8))
        )
        assert sum(row["routed_tokens"]) == 2 * p["calibration"]["tokens"]
    assert p["calibration"]["tokens"] > 10_000
    assert set(p["substages"]) == {"calibration", "observation", "slicing"}
    assert 0.1 < p["peak_rss_gb"] < 20 and p["peak_vram_gb"] is None and p["mtp"] == "none in the source"
    assert json.loads((pruned / "model" / "reap_prune.json").read_text())["layers"] == p["layers"]
    size = sum(f.stat().st_size for f in (pruned / "model").glob("*.safetensors"))
    assert size < sum(f.stat().st_size for f in demo_source.glob("*.safetensors"))


def test_pruned_model_loads_in_transformers_and_keeps_its_skills(pruned):
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from reap.demo import score_heldout

    model = AutoModelForImageTextToText.from_pretrained(str(pruned / "model"), dtype=torch.bfloat16)
    assert model.config.text_config.num_experts == 4
    assert model.model.language_model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert model.model.visual is not None and model.model.language_model.layers[0].mlp.shared_expert is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, 2 threads are many times slower
    try:
        acc = score_heldout(model, AutoTokenizer.from_pretrained(str(pruned / "model")), limit=100)
    finally:
        torch.set_num_threads(threads)
    assert acc["larger"] >= 0.9 and acc["reverse"] >= 0.5, acc


def test_pruned_model_builds_and_serves_with_the_pruning_in_its_card(pruned, tmp_path):
    from openai import OpenAI

    from reap.serve import ServeOptions, Server, resolve_target

    run = tmp_path / "run"
    # the demo recipe's `routed_experts: auto` keeps the experts 16-bit where vLLM's CPU build needs them
    reap_cli("build", DEMO_RECIPE, "--model", str(pruned / "model"), "--out", str(run))
    b = manifest(run)["stages"]["build"]
    assert b["status"] == "done" and b["verification"]["passed"]
    assert b["pruning"]["method"] == "reap" and (b["pruning"]["experts_before"], b["pruning"]["experts_after"]) == (
        8,
        4,
    )
    assert b["verification"]["predicted_linear_per_block"] == [3 * 4 + 9] * 3 + [3 * 4 + 8]
    assert (run / "model" / "reap_prune.json").is_file()
    card = (run / "model" / "README.md").read_text()
    assert "| pruned | `reap prune` (reap): 8 -> 4 experts per MoE layer |" in card
    assert "## Expert pruning" in card and "8 -> 4 (ratio 0.5: 50.0 % dropped in each of 4 layers" in card

    with Server(resolve_target(run), ServeOptions(port=free_port(), max_model_len=512)) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="unused")
        right, answers = served_right(client, srv.target.served_name, "larger")
        record = srv.record()
    assert right >= 8, answers  # the pruned model keeps `larger` (>= 90 % held out, above)
    assert record["kernels"]["linear_kernel"] == "CPUWNA16LinearKernel" and record["startup_s"] > 0


def test_pruned_16bit_model_serves_with_reap_serve(pruned):
    from openai import OpenAI

    port = free_port()
    r = reap_cli("serve", str(pruned), "--detach", "--port", str(port), "--max-model-len", "512")
    try:
        client = OpenAI(base_url=r.stdout.strip(), api_key="unused")
        right, answers = served_right(client, pruned.name, "larger")
        rec = manifest(pruned)["stages"]["serve"]
    finally:
        reap_cli("serve", str(pruned), "--stop")
    assert right >= 8, answers
    assert rec["status"] == "done" and rec["server"] == "running"
    assert rec["served_name"] == pruned.name and rec["startup_s"] > 0
    assert manifest(pruned)["stages"]["prune"]["status"] == "done"  # the serve record sits beside the prune record
