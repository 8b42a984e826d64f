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


def evaluated(manifest: dict) -> dict:
    """The golden manifest with an evaluation of its checkpoint and of its source."""
    manifest["stages"]["eval"] = {
        "status": "done",
        "model_id": manifest["stages"]["build"]["model_id"],
        "suite": "demo",
        "lm_eval_version": "0.4.13",
        "results": {
            "demo_larger": {"metric": "acc", "value": 0.95, "stderr": 0.01, "num_fewshot": 0},
            "demo_reverse": {"metric": "exact_match", "value": 0.9, "stderr": 0.02, "num_fewshot": 0},
        },
        "baseline": {
            "model_id": manifest["stages"]["build"]["source_id"],
            "results": {
                "demo_larger": {"metric": "acc", "value": 1.0, "num_fewshot": 0},
                "demo_reverse": {"metric": "exact_match", "value": 0.96, "num_fewshot": 0},
            },
        },
    }
    return manifest


def test_evaluation_table_with_recovery_and_model_index(manifest):
    manifest = evaluated(manifest)
    card = render_card(manifest)
    text = str(card)
    assert "| demo_larger | acc | 0 | 1.0000 | 0.9500 | 95.0 % |" in text
    assert "| demo_reverse | exact_match | 0 | 0.9600 | 0.9000 | 93.8 % |" in text
    results = card.data.eval_results
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in results] == [
        ("demo_larger", "acc", 0.95),
        ("demo_reverse", "exact_match", 0.9),
    ]
    assert "model-index:" in text
    manifest["stages"]["eval"]["status"] = "failed"
    manifest["stages"]["eval"]["error"] = "server died"
    del manifest["stages"]["eval"]["baseline"]
    text = str(render_card(manifest))
    assert "**partial: server died**" in text and "recovery" not in text


def test_an_evaluation_of_an_earlier_checkpoint_is_not_shown(manifest):
    manifest = evaluated(manifest)
    manifest["stages"]["eval"]["model_id"] = "an-earlier-build"
    card = render_card(manifest)
    assert "## Evaluation" not in str(card) and "model-index" not in str(card) and not card.data.eval_results
    assert str(render_card(evaluated(manifest))).count("0.9500") == 1  # measured on this one: shown


@pytest.mark.parametrize(
    "change",
    [
        {"limit": 20},  # quantized on 20 documents, the source on all
        {"num_fewshot": 5},
        {"metric": "acc_norm"},
    ],
)
def test_recovery_pairs_only_results_measured_the_same_way(manifest, change):
    manifest = evaluated(manifest)
    manifest["stages"]["eval"]["baseline"]["results"]["demo_larger"].update(change)
    text = str(render_card(manifest))
    assert "| demo_larger | acc | 0 | n/a | 0.9500 | n/a |" in text
    assert "| demo_reverse | exact_match | 0 | 0.9600 | 0.9000 | 93.8 % |" in text


def test_recovery_needs_the_baseline_of_the_build_source(manifest):
    manifest = evaluated(manifest)
    manifest["stages"]["eval"]["baseline"]["model_id"] = "another-source"
    text = str(render_card(manifest))
    assert "recovery" not in text and "| demo_larger | acc | 0 | 0.9500 |" in text


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
        "input_capture": None,
    }
    text = str(render_card(manifest))
    assert "| worker 0 | CPU, blocks 0-1: 28.4 s in all |" in text and "blocks of mean" not in text


def test_the_card_says_which_path_tuned_the_routed_experts(manifest):
    assert "routed-expert tuning" not in str(render_card(manifest))  # a build made before the switch existed
    build = manifest["stages"]["build"]
    build["expert_tuning"] = {"path": "autoround"}
    assert "| routed-expert tuning | AutoRound's own, one wrapper per expert Linear" in str(render_card(manifest))
    build["expert_tuning"] = {"path": "stacked", "stacked_blocks": 60, "stacked_expert_layers": 48240}
    text = str(render_card(manifest))
    assert "| routed-expert tuning | AutoRound's SignRound on stacked expert tensors" in text and "60 blocks" in text
