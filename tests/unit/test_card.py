"""The card is a pure, strict function of the manifest."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from reap.card import render_card, render_card_into
from reap.errors import CardError
from reap.rundir import RunDir

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture()
def manifest() -> dict:
    return json.loads((DATA / "golden_manifest.json").read_text())


def test_golden_card(manifest):
    golden = DATA / "golden_card.md"
    text = str(render_card(manifest))
    if os.environ.get("REAP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), "card changed: review, then REAP_UPDATE_GOLDEN=1 to accept"


def test_metadata(manifest):
    data = render_card(manifest).data
    assert data.base_model == "reap/demo-qwen3_5-moe-tiny" and data.base_model_relation == "quantized"
    assert data.license == "apache-2.0" and data.library_name == "transformers" and "w4a16" in data.tags


def test_sections_without_data_are_left_out_and_gpu_rows_appear_with_data(manifest):
    text = str(render_card(manifest))
    assert "peak GPU memory" not in text and "pruned (REAP) from" not in text
    gpu = copy.deepcopy(manifest)
    gpu["hardware"]["gpus"] = [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.6, "driver": "580.1", "cuda": "13.0"}
        for i in range(8)
    ]
    gpu["stages"]["build"]["peak_vram_gb"] = {str(i): 60.5 + i for i in range(8)}
    gpu["recipe"]["model"]["pruned_from"] = "Qwen/Qwen3.5-397B-A17B"
    text = str(render_card(gpu))
    assert "| peak GPU memory | GPU0 60.5 GB, GPU1 61.5 GB" in text and "8x NVIDIA H100 80GB HBM3" in text
    assert "| pruned (REAP) from | `Qwen/Qwen3.5-397B-A17B` |" in text
    del gpu["stages"]["build"]["blocks"]
    assert "| per block |" not in str(render_card(gpu))


def test_missing_value_is_an_error_not_an_empty_cell(manifest):
    del manifest["stages"]["build"]["versions"]["auto-round"]
    with pytest.raises(CardError, match="auto-round"):
        render_card(manifest)
    del manifest["stages"]["build"]["verification"]
    with pytest.raises(CardError, match="verification"):
        render_card(manifest)


def test_missing_license_is_an_error(manifest):
    manifest["stages"]["build"]["source_license"] = None
    with pytest.raises(CardError, match="license"):
        render_card(manifest)
    manifest["recipe"]["model"]["license"] = "mit"  # the recipe's license, a card input only
    assert render_card(manifest).data.license == "mit"


def test_render_into_a_run_and_refuse_an_unfinished_build(manifest, tmp_path):
    run = RunDir(tmp_path)
    run.write_manifest(manifest)
    assert render_card_into(run).read_text() == str(render_card(manifest))
    manifest["stages"]["build"]["status"] = "failed"
    run.write_manifest(manifest)
    with pytest.raises(CardError, match="no finished build"):
        render_card_into(run)


def generation(n: int, truncated: int = 0, empty: int = 0, limit: int = 16) -> dict:
    return {
        "max_gen_toks": limit,
        "n": n,
        "truncated": truncated,
        "empty": empty,
        "truncated_rate": truncated / n,
        "empty_rate": empty / n,
    }


def evaluated(manifest: dict) -> dict:
    """The golden manifest with an evaluation of its checkpoint and of its source, as `reap eval --baseline`
    records it: scores with standard errors, the paired statistics and the token-level agreement."""
    common = {"num_fewshot": 0, "limit": 60, "model_type": "local-completions", "n": 60, "filter": "none"}
    larger = dict(common, metric="acc", items="i-larger")
    reverse = dict(common, metric="exact_match", items="i-reverse")
    manifest["stages"]["eval"] = {
        "status": "done",
        "model_id": manifest["stages"]["build"]["model_id"],
        "suite": "demo",
        "lm_eval_version": "0.4.13",
        "results": {
            "demo_larger": dict(larger, value=0.95, stderr=0.0284),
            "demo_reverse": dict(reverse, value=0.9, stderr=0.0391, generation=generation(60)),
        },
        "baseline": {
            "model_id": manifest["stages"]["build"]["source_id"],
            "results": {
                "demo_larger": dict(larger, value=1.0, stderr=0.0),
                "demo_reverse": dict(reverse, value=0.9667, stderr=0.0234, generation=generation(60)),
            },
        },
        "paired": {
            "demo_larger": {
                "n": 60,
                "diff": -0.05,
                "diff_se": 0.0284,
                "diff_ci95": [-0.1056, 0.0056],
                "within_noise": True,
                "recovery": 0.95,
                "recovery_se": 0.0284,
                "recovery_ci95": [0.8944, 1.0056],
            },
            "demo_reverse": {
                "n": 60,
                "diff": -0.0667,
                "diff_se": 0.0325,
                "diff_ci95": [-0.1304, -0.003],
                "within_noise": False,
                "recovery": 0.931,
                "recovery_se": 0.0336,
                "recovery_ci95": [0.8651, 0.9969],
            },
        },
        "agreement": {
            "data": "heldout.jsonl",
            "top_k": 20,
            "held_out_checked": True,
            "docs": 32,
            "positions": 7808,
            "mismatched_docs": 0,
            "kl_mean": 0.001234,
            "kl_se": 0.000101,
            "kl_max": 0.2345,
            "top1_agreement": 0.9921,
            "top1_agreement_se": 0.0012,
            "perplexity_source": 1.8512,
            "perplexity_quantized": 1.8634,
        },
    }
    return manifest


def test_golden_evaluated_card(manifest):
    golden = DATA / "golden_card_evaluated.md"
    text = str(render_card(evaluated(manifest)))
    if os.environ.get("REAP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), "card changed: review, then REAP_UPDATE_GOLDEN=1 to accept"


def test_evaluation_table_with_errors_paired_recovery_and_model_index(manifest):
    manifest = evaluated(manifest)
    card = render_card(manifest)
    text = str(card)
    assert (
        "| demo_larger | acc | 0 | 60 | 1.0000 ± 0.0000 | 0.9500 ± 0.0284 | 95.0 % [89.4, 100.6] "
        "| -0.0500 ± 0.0557: within noise |"
    ) in text
    assert "| demo_reverse | exact_match | 0 | 60 | 0.9667 ± 0.0234 | 0.9000 ± 0.0391 | 93.1 % [86.5, 99.7] " in text
    assert "-0.0667 ± 0.0637: loss beyond noise |" in text
    results = card.data.eval_results
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in results] == [
        ("demo_larger", "acc", 0.95),
        ("demo_reverse", "exact_match", 0.9),
        ("heldout", "perplexity", 1.8634),
    ]
    assert "model-index:" in text
    manifest["stages"]["eval"]["status"] = "failed"
    manifest["stages"]["eval"]["error"] = "server died"
    del manifest["stages"]["eval"]["baseline"]
    text = str(render_card(manifest))
    assert "**partial: server died**" in text and "recovery" not in text and "agreement" not in text
    assert "| demo_larger | acc | 0 | 60 | 0.9500 ± 0.0284 |" in text


def test_token_level_agreement_in_the_card(manifest):
    text = str(render_card(evaluated(manifest)))
    assert "| mean KL(source ‖ W4A16) per token | 0.00123 ± 0.00010 nats (max 0.2345) |" in text
    assert "| top-1 agreement | 99.2 ± 0.1 % |" in text
    assert "| perplexity, bf16 source | 1.8512 |" in text and "| perplexity, W4A16 | 1.8634 |" in text
    assert "32 documents, 7808 next-token positions; no text in common with the calibration file" in text
    assert "top-20 support" in text and "one bucket holding the rest of the mass" in text


def test_truncated_or_empty_generations_over_1_percent_are_flagged(manifest):
    manifest = evaluated(manifest)
    text = str(render_card(manifest))
    assert "| demo_reverse | 16 | 0/60 (0.0 %) | 0/60 (0.0 %) | 0/60 (0.0 %) | 0/60 (0.0 %) |" in text
    assert "Flagged" not in text
    manifest["stages"]["eval"]["results"]["demo_reverse"]["generation"] = generation(60, truncated=57, limit=1)
    text = str(render_card(manifest))
    assert "**Flagged: demo_reverse.**" in text
    assert "| demo_reverse | 1 | 57/60 (95.0 %) **over 1 %** | 0/60 (0.0 %) | 0/60 (0.0 %) | 0/60 (0.0 %) |" in text
    # one empty answer in 60 (1.7 %) is over 1 % too, on either side
    manifest["stages"]["eval"]["results"]["demo_reverse"]["generation"] = generation(60)
    manifest["stages"]["eval"]["baseline"]["results"]["demo_reverse"]["generation"] = generation(60, empty=1)
    assert "| 1/60 (1.7 %) **over 1 %** |" in str(render_card(manifest))


def test_an_evaluation_of_an_earlier_checkpoint_is_not_shown(manifest):
    manifest = evaluated(manifest)
    manifest["stages"]["eval"]["model_id"] = "an-earlier-build"
    card = render_card(manifest)
    assert "## Evaluation" not in str(card) and "model-index" not in str(card) and not card.data.eval_results
    assert str(render_card(evaluated(manifest))).count("0.9500 ± 0.0284") == 1  # measured on this one: shown


@pytest.mark.parametrize(
    "change",
    [
        {"limit": 20},  # quantized on 20 documents, the source on all
        {"num_fewshot": 5},
        {"metric": "acc_norm"},
        {"items": "other documents"},  # same count, other data
    ],
)
def test_recovery_pairs_only_results_measured_the_same_way(manifest, change):
    manifest = evaluated(manifest)
    manifest["stages"]["eval"]["baseline"]["results"]["demo_larger"].update(change)
    text = str(render_card(manifest))
    assert "| demo_larger | acc | 0 | 60 | n/a | 0.9500 ± 0.0284 | n/a | n/a |" in text
    assert "| demo_reverse | exact_match | 0 | 60 | 0.9667 ± 0.0234 | 0.9000 ± 0.0391 | 93.1 % [86.5, 99.7] " in text


def test_without_per_document_samples_recovery_has_no_interval(manifest):
    manifest = evaluated(manifest)
    del manifest["stages"]["eval"]["paired"]  # e.g. an evaluation recorded before reap kept samples' hashes
    manifest["stages"]["eval"]["agreement"] = None  # nor logprobs of both sides
    text = str(render_card(manifest))
    assert "Token-level agreement" not in text
    assert "| demo_larger | acc | 0 | 60 | 1.0000 ± 0.0000 | 0.9500 ± 0.0284 | 95.0 % | n/a |" in text
    assert "paired, document by document" not in text


def test_recovery_and_agreement_need_the_baseline_of_the_build_source(manifest):
    manifest = evaluated(manifest)
    manifest["stages"]["eval"]["baseline"]["model_id"] = "another-source"
    card = render_card(manifest)
    text = str(card)
    assert "recovery" not in text and "| demo_larger | acc | 0 | 60 | 0.9500 ± 0.0284 |" in text
    assert "Token-level agreement" not in text and "perplexity" not in text
    assert [r.metric_type for r in card.data.eval_results] == ["acc", "exact_match"]


def test_serve_command_comes_from_the_recorded_gpu_argv_without_local_paths(manifest):
    manifest["stages"]["serve"] = {
        "model_id": manifest["stages"]["build"]["model_id"],
        "argv": [
            "/usr/bin/python3",
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            "/home/me/runs/demo/model",
            "--tensor-parallel-size",
            "4",
            "--dtype",
            "bfloat16",
        ],
    }
    text = str(render_card(manifest))
    assert "vllm serve demo --tensor-parallel-size 4 --dtype bfloat16\n" in text and "/home/me" not in text
    manifest["stages"]["serve"]["argv"] = ["/x/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"]
    assert "vllm serve demo --tensor-parallel-size 1 --dtype bfloat16 --language-model-only" in str(
        render_card(manifest)
    )


def test_card_inputs_come_from_the_runs_recipe_and_change_no_weight(manifest, tmp_path):
    import yaml
    from click.testing import CliRunner

    from reap.cli import reap

    run = RunDir(tmp_path)
    run.model_dir.mkdir()
    run.write_manifest(manifest)
    edited = dict(manifest["recipe"], card=dict(manifest["recipe"]["card"], tags=["mine"]))
    edited["model"] = dict(edited["model"], license="mit")
    run.recipe_path.write_text(yaml.safe_dump(edited, sort_keys=False))
    r = CliRunner().invoke(reap, ["card", str(tmp_path)])
    assert r.exit_code == 0, r.output
    card = run.card_path.read_text()
    assert "license: mit" in card and "- mine" in card
    saved = yaml.safe_load((run.model_dir / "reap_recipe.yaml").read_text())
    assert saved["card"]["tags"] == ["mine"] and run.read_manifest()["recipe"]["model"]["license"] == "mit"
    assert run.read_manifest()["stages"]["build"] == manifest["stages"]["build"]


def test_parallel_rtn_build_has_no_per_block_times(manifest):
    """AutoRound logs no per-block line in RTN mode: a block-parallel RTN build's workers have no block times."""
    manifest["stages"]["build"]["parallel"] = {
        "workers": [
            {"index": i, "device": "cpu", "blocks": [2 * i, 2 * i + 1], "wall_s": 28.4, "block_wall_s": []}
            for i in range(2)
        ],
    }
    text = str(render_card(manifest))
    assert "| worker 0 | CPU, blocks 0-1: 28.4 s in all |" in text and "blocks of mean" not in text


def test_a_parallel_build_card_says_when_each_range_had_its_inputs(manifest):
    manifest["stages"]["build"]["parallel"] = {
        "workers": [
            {"index": i, "device": str(i), "blocks": [4 * i, 4 * i + 3], "wall_s": 200.0, "block_wall_s": [41.0] * 4}
            | {"inputs_after_s": [29.0, 61.5][i], "kept_from_earlier_attempt": False}
            for i in range(2)
        ],
    }
    text = str(render_card(manifest))
    assert "| worker 0 | GPU 0, blocks 0-3: 3.3 min in all, 4 blocks of mean 41.0 s |" in text  # range 0: at once
    assert (
        "| worker 1 | GPU 1, blocks 4-7: 3.3 min in all, 4 blocks of mean 41.0 s, its inputs after 61.5 s "
        "(full precision, from worker 0) |"
    ) in text


def test_the_card_says_which_path_tuned_the_routed_experts(manifest):
    assert "routed-expert tuning" not in str(render_card(manifest))  # a build made before the switch existed
    build = manifest["stages"]["build"]
    build["expert_tuning"] = {"path": "autoround"}
    assert "| routed-expert tuning | AutoRound's own, one wrapper per expert Linear" in str(render_card(manifest))
    build["expert_tuning"] = {"path": "stacked", "stacked_blocks": 60, "stacked_expert_layers": 48240}
    text = str(render_card(manifest))
    assert "| routed-expert tuning | AutoRound's SignRound on stacked expert tensors" in text and "60 blocks" in text
