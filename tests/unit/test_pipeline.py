"""`reap run`'s plan: which stages run, which are skipped as done, and why (no stage is executed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reap import pipeline
from reap.errors import InputError
from reap.recipe import parse_recipe
from reap.rundir import RunDir


def recipe(src: Path, **sections):
    return parse_recipe({"name": "demo", "model": {"path": str(src)}, **sections}, "r.yaml")


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "source"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def actions(steps) -> dict[str, tuple[str, str]]:
    return {s["stage"]: (s["action"], s["why"]) for s in steps}


def finish(run: RunDir, steps, rec) -> None:
    """What a successful run leaves behind: outputs, stage records, fingerprints."""
    run.model_dir.mkdir(parents=True, exist_ok=True)
    (run.model_dir / "config.json").write_text("{}")
    run.card_path.write_text("card")
    manifest = {
        "name": rec.name,
        "recipe": rec.model_dump(mode="json"),
        "stages": {name: {"status": "done", "model_id": run.model_id()} for name in ("build", "verify", "eval")},
        "pipeline": {
            "stages": {
                s["stage"]: {"status": "done", "fingerprint": s["fingerprint"], "model_id": run.model_id()}
                for s in steps
                if s["action"] == "run"
            }
        },
    }
    run.write_manifest(manifest)


def test_fresh_run_runs_every_stage_then_nothing(src, tmp_path):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    steps = pipeline.plan(rec, run)
    assert [s["stage"] for s in steps if s["action"] == "run"] == ["build", "verify", "eval", "card"]
    finish(run, steps, rec)
    again = actions(pipeline.plan(rec, run))
    assert {a for a, _ in again.values()} == {"skip"}, again


def test_a_changed_eval_section_reruns_only_eval_and_card(src, tmp_path):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    finish(run, pipeline.plan(rec, run), rec)
    changed = actions(pipeline.plan(recipe(src, eval={"limit": 10}), run))
    assert changed["build"][0] == changed["verify"][0] == "skip"
    assert changed["eval"] == ("run", "inputs changed")
    assert changed["card"] == ("run", "upstream re-ran")


def test_a_changed_source_or_quantize_section_rebuilds_everything(src, tmp_path):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    finish(run, pipeline.plan(rec, run), rec)
    assert actions(pipeline.plan(recipe(src, quantize={"iters": 0}), run))["build"] == ("run", "inputs changed")
    (src / "model.safetensors").write_bytes(b"new weights")
    steps = actions(pipeline.plan(rec, run))
    assert steps["build"] == ("run", "inputs changed") and steps["eval"] == ("run", "upstream re-ran")


def test_an_interrupted_build_is_redone_and_everything_after_it(src, tmp_path):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    finish(run, pipeline.plan(rec, run), rec)
    manifest = run.read_manifest()
    manifest["pipeline"]["stages"]["build"].update(status="interrupted", fingerprint=None)
    run.write_manifest(manifest)
    steps = actions(pipeline.plan(rec, run))
    assert steps["build"] == ("run", "resumes (was interrupted)")
    assert steps["verify"] == steps["eval"] == steps["card"] == ("run", "upstream re-ran")


def test_a_stage_marked_running_by_a_killed_run_is_not_done(src, tmp_path):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    steps = pipeline.plan(rec, run)
    finish(run, steps, rec)
    manifest = run.read_manifest()
    manifest["pipeline"]["stages"]["eval"] = {
        "status": "running",
        "fingerprint": None,
        "attempt": steps[2]["fingerprint"],
    }
    run.write_manifest(manifest)
    assert actions(pipeline.plan(rec, run))["eval"] == ("run", "resumes (the last attempt was killed)")


def test_selection_only_from_until(src, tmp_path):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    finish(run, pipeline.plan(rec, run), rec)
    only = actions(pipeline.plan(rec, run, only="eval"))
    assert only["eval"] == ("run", "forced") and only["card"] == ("skip", "done")
    start = actions(pipeline.plan(rec, run, start="verify"))
    assert start["build"][0] == "skip" and all(start[s][0] == "run" for s in ("verify", "eval", "card"))
    until = actions(pipeline.plan(recipe(src, quantize={"iters": 1}), run, until="build"))
    assert until["build"][0] == "run" and until["eval"] == ("skip", "not selected")


def test_selection_errors(src, tmp_path):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    with pytest.raises(InputError, match="needed but not done"):
        pipeline.plan(rec, run, only="eval")
    with pytest.raises(InputError, match="comes after"):
        pipeline.plan(rec, run, start="card", until="build")
    with pytest.raises(InputError, match="the eval stage is not asked for by the recipe; set eval.enabled: true"):
        pipeline.plan(recipe(src, eval={"enabled": False}), run, only="eval")
    # issue 15: `--only publish` without --publish said "the recipe has no publish stage"
    with pytest.raises(
        InputError, match=r"--only publish: the publish stage is not asked for \(--publish\); add --publish"
    ):
        pipeline.plan(rec, run, only="publish")


def test_disabled_eval_is_skipped(src, tmp_path):
    steps = actions(pipeline.plan(recipe(src, eval={"enabled": False}), RunDir(tmp_path / "run")))
    assert steps["eval"] == ("skip", "not asked for by the recipe") and steps["card"][0] == "run"


def test_a_run_folder_of_another_recipe_is_refused(src, tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_manifest({"name": "other", "recipe": {"model": {"path": str(src)}}, "stages": {}})
    with pytest.raises(InputError, match="made by another recipe"):
        pipeline.check_run_folder(run, recipe(src))


def test_missing_source_says_how_to_make_it(tmp_path):
    with pytest.raises(InputError, match="reap demo-model"):
        pipeline.plan(recipe(tmp_path / "nope"), RunDir(tmp_path / "run"))


def test_dry_run_cli_prints_the_plan_and_touches_nothing(src, tmp_path):
    from click.testing import CliRunner

    from reap.cli import reap

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "demo", "model": {"path": str(src)}}))
    res = CliRunner().invoke(reap, ["run", str(path), "--out", str(tmp_path / "run"), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = [line.split()[:2] for line in res.output.splitlines()]
    assert lines[0] == ["skip", "prune"] and lines[1] == ["RUN", "build"]
    assert not (tmp_path / "run").exists()
    bad = CliRunner().invoke(reap, ["run", str(path), "--only", "bogus", "--dry-run"])
    assert bad.exit_code == 1 and "--only bogus: no such stage" in bad.output


def test_an_unknown_eval_suite_is_refused_before_anything_runs(src, tmp_path):
    with pytest.raises(InputError, match="unknown suite 'nope'"):
        pipeline.plan(recipe(src, eval={"suite": "nope"}), RunDir(tmp_path / "run"))


def test_publish_is_opt_in_and_needs_a_repo(src, tmp_path):
    run = RunDir(tmp_path / "run")
    assert actions(pipeline.plan(recipe(src), run))["publish"] == ("skip", "not asked for (--publish)")
    with pytest.raises(InputError, match="--publish needs publish.repo"):
        pipeline.plan(recipe(src), run, publish=True)
    steps = actions(pipeline.plan(recipe(src, publish={"repo": "me/demo"}), run, publish=True))
    assert steps["publish"] == ("run", "upstream re-ran")


def test_a_prune_section_adds_the_first_stage_and_its_changes_redo_everything(src, tmp_path):
    run = RunDir(tmp_path / "run")
    pruned = recipe(src, prune={"method": "random", "ratio": 0.5})
    steps = pipeline.plan(pruned, run)
    assert [s["stage"] for s in steps if s["action"] == "run"][:2] == ["prune", "build"]
    assert actions(pipeline.plan(recipe(src), run))["prune"] == ("skip", "not asked for by the recipe")
    finish(run, steps, pruned)
    (run.root / "pruned" / "model").mkdir(parents=True)
    (run.root / "pruned" / "model" / "config.json").write_text("{}")
    assert {a for a, _ in actions(pipeline.plan(pruned, run)).values()} == {"skip"}
    changed = actions(pipeline.plan(recipe(src, prune={"method": "random", "ratio": 0.25}), run))
    assert changed["prune"] == ("run", "inputs changed") and changed["build"] == ("run", "upstream re-ran")


def test_dry_run_refuses_a_calibration_name_the_build_refuses(src, tmp_path):
    """Before: AutoRound's exact-name check ran only inside build(), so `reap run --dry-run` planned a run
    with `quantize.dataset: pile` that the build then refused."""
    with pytest.raises(InputError, match="'pile' is not a dataset AutoRound knows by that name"):
        pipeline.plan(recipe(src, quantize={"dataset": "pile"}), RunDir(tmp_path / "run"))


@pytest.mark.parametrize(
    "change",
    [
        {"card": {"tags": ["mine"]}},
        {"model": {"license": "mit"}},
        {"model": {"base_model": "org/base"}},
        {"model": {"pruned_from": "org/bigger"}},
    ],
)
def test_card_and_metadata_fields_rerender_the_card_only(src, tmp_path, change):
    rec, run = recipe(src), RunDir(tmp_path / "run")
    finish(run, pipeline.plan(rec, run), rec)
    sections = {k: v for k, v in change.items() if k != "model"}
    model = {"path": str(src), **change.get("model", {})}
    changed = actions(pipeline.plan(parse_recipe({"name": "demo", "model": model, **sections}, "r.yaml"), run))
    assert {s for s, (a, _) in changed.items() if a == "run"} == {"card"}, changed
    assert changed["card"] == ("run", "inputs changed")


def test_a_prune_recipe_runs_again_in_its_own_folder(src, tmp_path):
    """The run records the recipe as given (source path, prune section), not the intermediate pruned path."""
    run = RunDir(tmp_path / "run")
    pruned = recipe(src, prune={"method": "random", "ratio": 0.5})
    finish(run, pipeline.plan(pruned, run), pruned)
    pipeline.check_run_folder(run, pruned)
    with pytest.raises(InputError, match="made by another recipe"):
        pipeline.check_run_folder(run, recipe(tmp_path, prune={"method": "random", "ratio": 0.5}))
