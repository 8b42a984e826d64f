from __future__ import annotations

from pathlib import Path

import pytest

from reap.errors import RecipeError
from reap.recipe import DEFAULT_KEEP_16BIT, load_recipe, parse_recipe
from reap.resources import data_dir

RECIPES = data_dir("recipes")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_reproduce_the_seed_release(tmp_path):
    r = load_recipe(write(tmp_path, "name: x\nmodel: {path: /m}\n"))
    q = r.quantize
    assert (q.bits, q.group_size, q.sym, q.format) == (4, 128, True, "auto_round")
    assert (q.nsamples, q.seqlen, q.batch_size, q.dataset, q.iters) == (64, 512, 1, "NeelNanda/pile-10k", 200)
    assert set(q.keep_16bit) == {
        "mlp.gate",
        "mlp.shared_expert_gate",
        "linear_attn.in_proj_a",
        "linear_attn.in_proj_b",
        "lm_head",
        "model.visual",
        "mtp",
    }
    assert r.serve.tensor_parallel_size == 4


def test_shipped_recipes_are_valid():
    seed = load_recipe(RECIPES / "qwen3.5-reap-212b-a17b-w4a16.yaml")
    assert seed.quantize.iters == 200 and seed.model.pruned_from == "Qwen/Qwen3.5-397B-A17B"
    demo = load_recipe(RECIPES / "demo.yaml")
    assert demo.serve.tensor_parallel_size == 1 and demo.quantize.dataset.endswith(".jsonl")


def test_every_error_is_reported_at_once_with_file_and_field(tmp_path):
    p = write(tmp_path, "name: 'bad name!'\nmodel: {pathh: /m}\nquantize: {bits: 5, iters: -1, colour: red}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert str(p) in msg
    assert "name: use letters, digits" in msg
    assert "model.path: required field is missing" in msg
    assert "model.pathh: unknown field" in msg
    assert "quantize.bits: 5 bits cannot be served" in msg and "4 or 8" in msg
    assert "quantize.iters: Input should be greater than or equal to 0" in msg
    assert "quantize.colour: unknown field" in msg
    assert len(err.value.problems) == 6


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "none.yaml")
    with pytest.raises(RecipeError, match="not valid YAML at line 3"):
        load_recipe(write(tmp_path, "name: x\nmodel: [\n"))
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_missing_local_calibration_file(tmp_path):
    with pytest.raises(RecipeError, match=r"quantize.dataset: calibration file .*nope.jsonl not found"):
        load_recipe(write(tmp_path, f"name: x\nmodel: {{path: /m}}\nquantize: {{dataset: {tmp_path}/nope.jsonl}}\n"))


def test_overrides_and_list_form_of_keep_16bit(tmp_path):
    p = write(tmp_path, "name: x\nmodel: {path: /m}\nquantize: {keep_16bit: [mlp.gate, lm_head]}\n")
    r = load_recipe(p, {"quantize.iters": 0, "serve.tensor_parallel_size": 2})
    assert r.quantize.iters == 0 and r.serve.tensor_parallel_size == 2
    assert r.quantize.keep_16bit == {
        "mlp.gate": DEFAULT_KEEP_16BIT["mlp.gate"],
        "lm_head": DEFAULT_KEEP_16BIT["lm_head"],
    }


@pytest.mark.parametrize(
    "choice, gpus, kernel, kept",
    [
        ("quantize", 0, None, False),
        ("keep_16bit", 4, "AMX", True),
        ("auto", 0, None, True),  # vLLM's CPU build could not run int4 experts here
        ("auto", 0, "AMX", False),
        ("auto", 4, None, False),  # GPUs serve int4 experts (Marlin)
    ],
)
def test_routed_experts_choice(tmp_path, monkeypatch, choice, gpus, kernel, kept):
    from reap import engine, serve

    monkeypatch.setattr(serve, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(serve, "cpu_int4_moe_kernel", lambda: kernel)
    rec = parse_recipe({"name": "x", "model": {"path": "m"}, "quantize": {"routed_experts": choice}}, "r.yaml")
    keep = engine.keep_patterns(rec)
    assert ("mlp.experts" in keep) is kept
    assert set(rec.quantize.keep_16bit) <= set(keep)


def test_calibration_names_must_be_autorounds_exact_names():
    """Issue 15: AutoRound matches a dataset name by substring (and a folder path ending in `/` matches its
    first name): the build would calibrate on NeelNanda/pile-10k from the network, not what the recipe names."""
    from reap.build import check_calibration
    from reap.errors import InputError

    check_calibration("NeelNanda/pile-10k")
    check_calibration("NeelNanda/pile-10k:num=100")
    for name in ("pile", "someone/pile-10k-copy", "NeelNanda/pile-10k,mbp"):
        with pytest.raises(InputError, match="is not a dataset AutoRound knows by that name"):
            check_calibration(name)


def test_a_calibration_file_under_home_is_stored_expanded(tmp_path, monkeypatch):
    """Before: `~/calib.jsonl` passed the checks (they expand `~`) but AutoRound got the raw string and failed
    late with "Dataset not found", after the weights were loaded."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "calib.jsonl").write_text('{"text": "a"}\n')
    rec = parse_recipe({"name": "x", "model": {"path": "m"}, "quantize": {"dataset": "~/calib.jsonl"}}, "r.yaml")
    assert rec.quantize.dataset == str(tmp_path / "calib.jsonl")


def test_base_model_may_be_a_hub_id_without_an_org():
    """Before: model.base_model required ORG/NAME, so existing Hub models such as `gpt2` were refused."""
    for value in ("gpt2", "Qwen/Qwen3.5-397B-A17B"):
        rec = parse_recipe({"name": "x", "model": {"path": "m", "base_model": value, "pruned_from": value}}, "r.yaml")
        assert rec.model.base_model == rec.model.pruned_from == value
    for bad in ("/data/x", "a--b", "x.git"):
        with pytest.raises(RecipeError, match="not a Hub repo id: use ORG/NAME or NAME"):
            parse_recipe({"name": "x", "model": {"path": "m", "base_model": bad}}, "r.yaml")
    with pytest.raises(RecipeError, match="not a Hub repo id: use ORG/NAME "):
        parse_recipe({"name": "x", "model": {"path": "m"}, "publish": {"repo": "gpt2"}}, "r.yaml")
