"""`reap build`'s record without AutoRound (its engine replaced by a copy of a made-up W4A16 checkpoint): a card
that does not render leaves the verified build in place; a failed or interrupted rebuild leaves the earlier
build, its recipe and its record the current ones; the release gets the usual file modes."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from reap import build as build_mod
from reap import engine
from reap.errors import CardError, StageError
from reap.recipe import parse_recipe
from reap.rundir import RunDir

from .ckpt_factory import make_checkpoint


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q") / "model")


def recipe(src, **card):
    return parse_recipe(
        {
            "name": "demo",
            "model": {"path": str(src), "license": "mit"},
            "quantize": {"routed_experts": "quantize", "dataset": "NeelNanda/pile-10k"},
            "serve": {"tensor_parallel_size": 1},
            "card": card,
        },
        "r.yaml",
    )


def fake_engine(monkeypatch, quantized, fail: BaseException | None = None):
    def quantize(src, rec, work, logfile, clock, block_inputs=None):
        if fail is not None:
            raise fail
        shutil.copytree(quantized, work)
        for f in work.iterdir():
            f.chmod(0o600)  # as a copy of a source written 0600 would be
        return {"blocks": [], "autoround_summary": None, "fixes_applied": [], "kept_16bit_requested": []}

    monkeypatch.setattr(engine, "quantize", quantize)


def test_card_failure_keeps_the_verified_build_and_a_failed_rebuild_changes_nothing(quantized, tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src")
    run = RunDir(tmp_path / "run")
    fake_engine(monkeypatch, quantized)
    old = os.umask(0o022)
    try:
        with pytest.raises(CardError, match="tags"):
            build_mod.build(recipe(src, tags=[]), run.root)
    finally:
        os.umask(old)
    first = run.read_manifest()
    assert first["stages"]["build"]["status"] == "done" and first["stages"]["build"]["model_id"] == run.model_id()
    assert (run.model_dir / "config.json").is_file() and not run.card_path.exists()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [run.manifest_path, *run.model_dir.iterdir()]}
    assert set(modes.values()) == {0o644}, modes
    recipe_text = run.recipe_path.read_text()

    for fail, status in ((StageError("AutoRound failed: boom"), "failed"), (KeyboardInterrupt(), "interrupted")):
        fake_engine(monkeypatch, quantized, fail)
        with pytest.raises(type(fail)):
            build_mod.build(recipe(src, tags=["changed"]).model_copy(update={"name": "other"}), run.root, True)
        m = run.read_manifest()
        assert m["stages"]["build"]["last_attempt"]["status"] == status
        assert {k: v for k, v in m["stages"]["build"].items() if k != "last_attempt"} == first["stages"]["build"]
        assert m["name"] == "demo" and m["recipe"] == first["recipe"] and run.recipe_path.read_text() == recipe_text
        assert not (run.root / "model.partial").exists()


def test_build_refuses_a_recipe_with_a_prune_section(tmp_path):
    from reap.errors import InputError

    rec = parse_recipe(
        {"name": "d", "model": {"path": str(tmp_path)}, "prune": {"method": "random", "ratio": 0.5}}, "r.yaml"
    )
    with pytest.raises(InputError, match="reap run"):
        build_mod.build(rec, tmp_path / "run")
    assert not (tmp_path / "run").exists()
