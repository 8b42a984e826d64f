"""Block-parallel build: the split, the workers' views, the merge and the refusals before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reap.checkpoint import Checkpoint, layer_index, shift_layer
from reap.errors import InputError
from reap.parallel import (
    Part,
    check_parallel,
    merge_parts,
    merge_quantization_configs,
    split_blocks,
    write_range_view,
    write_view,
)
from reap.recipe import load_recipe
from reap.resources import data_dir

from .ckpt_factory import make_checkpoint
from .test_cli import DEMO_RECIPE, one_error_line, run


@pytest.mark.parametrize("blocks,workers", [(8, 2), (60, 8), (9, 4), (4, 4), (61, 3), (8, 1)])
def test_split_covers_every_block_once_in_order(blocks, workers):
    ranges = split_blocks(blocks, workers)
    assert len(ranges) == workers
    assert ranges[0][0] == 0 and ranges[-1][1] == blocks
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # even, worker 0 (no wait) first


def test_split_gives_the_remainder_to_the_first_workers():
    assert split_blocks(9, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert split_blocks(8, 2) == [(0, 4), (4, 8)]


def test_view_links_the_source_and_cuts_the_config(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    before = (src / "config.json").read_text()
    write_view(src, tmp_path / "view", 1)
    cfg = json.loads((tmp_path / "view" / "config.json").read_text())["text_config"]
    assert cfg["num_hidden_layers"] == 1 and cfg["layer_types"] == ["linear_attention"] and cfg["use_cache"] is False
    shard = tmp_path / "view" / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and shard.resolve() == (src / shard.name).resolve()
    assert (src / "config.json").read_text() == before  # the source is never written


def test_range_view_holds_its_blocks_renumbered_and_everything_else(tmp_path):
    from safetensors import safe_open

    src = Checkpoint.open(make_checkpoint(tmp_path / "src"))
    write_range_view(src, tmp_path / "view", 1, 2)
    view = Checkpoint.open(tmp_path / "view")
    cfg = view.text_config
    assert cfg["num_hidden_layers"] == 1 and cfg["layer_types"] == src.text_config["layer_types"][1:2]
    assert cfg["use_cache"] is False
    expected = {shift_layer(n, -1) for n in src.weight_map if layer_index(n) in (1, None)}
    assert set(view.weight_map) == expected and {layer_index(n) for n in view.weight_map} == {0, None}
    for name in src.weight_map:
        if layer_index(name) in (1, None):
            with (
                safe_open(str(src.root / src.weight_map[name]), "pt") as a,
                safe_open(str(view.root / view.weight_map[shift_layer(name, -1)]), "pt") as b,
            ):
                assert a.get_tensor(name).equal(b.get_tensor(shift_layer(name, -1))), name
    assert not any(f.is_symlink() for f in view.root.glob("*.safetensors"))  # renamed copies, the source untouched
    assert not (view.root / "model-00001-of-00002.safetensors").samefile(src.root / "model-00001-of-00002.safetensors")


def _part_outputs(tmp_path: Path) -> tuple[Checkpoint, list[Part]]:
    """Two workers' outputs of a 2-block model as workers leave them: block k numbered 0, the tensors outside
    the blocks, a config of one block, and per-layer quantization entries of their block marked as theirs."""
    src = Checkpoint.open(make_checkpoint(tmp_path / "src"))
    parts = []
    for k in range(2):
        part = Part(k, k, k + 1, "cpu", tmp_path / f"part-{k}")
        write_range_view(src, part.model, k, k + 1)
        cfg = json.loads((part.model / "config.json").read_text())
        extra = cfg["quantization_config"]["extra_config"]
        cfg["quantization_config"]["extra_config"] = {
            shift_layer(key, -k): dict(value, data_type=f"worker-{k}")
            for key, value in extra.items()
            if layer_index(key.replace("\\", "")) in (k, None)
        }
        (part.model / "config.json").write_text(json.dumps(cfg))
        parts.append(part)
    return src, parts


def test_merge_numbers_each_workers_blocks_back_and_passes_the_gates(tmp_path):
    from safetensors import safe_open

    from reap.verify import verify_checkpoint

    src, parts = _part_outputs(tmp_path)
    info = merge_parts(parts, tmp_path / "merged", src.config)
    merged = Checkpoint.open(tmp_path / "merged")
    assert {k: merged.text_config.get(k) for k in ("num_hidden_layers", "layer_types", "use_cache")} == {
        k: src.text_config.get(k) for k in ("num_hidden_layers", "layer_types", "use_cache")
    }
    assert set(merged.weight_map) == set(src.weight_map) and info["tensors"] == len(src.weight_map)
    for name, shard in merged.weight_map.items():
        with safe_open(str(merged.root / shard), "pt") as a, safe_open(str(src.root / src.weight_map[name]), "pt") as b:
            assert a.get_tensor(name).equal(b.get_tensor(name)), name
    extra = merged.quantization_config["extra_config"]
    assert set(extra) == set(src.quantization_config["extra_config"])
    for key, value in extra.items():
        layer = layer_index(key.replace("\\", ""))
        assert value["data_type"] == f"worker-{1 if layer is None else layer}", key
    assert verify_checkpoint(merged.root, tp=1)["passed"]


def test_merge_of_gptq_configs_is_the_sequential_one():
    def entry(layer: int, module: str) -> str:
        return rf"-:.*model\.language_model\.layers\.{layer}\.{module}.*"

    def dynamic(blocks: range) -> dict:  # as AutoRound and compat.gptq_skip_16bit_moe write them
        return {
            **{entry(i, m): {} for i in blocks for m in ("mlp\\.gate", "x")},
            **{rf"-:.*layers\.{i}\.mlp\.experts$": {} for i in blocks},
        }

    seq = {
        "bits": 4,
        "quant_method": "gptq",
        "dynamic": dynamic(range(12)),
        "modules_in_block_to_quantize": [["a", "b", "self_attn.q_proj"]],
    }
    parts = [Part(0, 0, 6, "0", Path("p0")), Part(1, 6, 12, "1", Path("p1"))]
    # each worker numbers its blocks from 0
    w0 = dict(seq, dynamic=dynamic(range(6)), modules_in_block_to_quantize=[["a", "b"]])
    w1 = dict(w0, modules_in_block_to_quantize=[["a", "self_attn.q_proj"]])
    assert merge_quantization_configs([w0, w1], parts) == seq


def test_refusals_before_anything_runs(tmp_path):
    src = Checkpoint.open(make_checkpoint(tmp_path / "src"))
    recipe = load_recipe(
        DEMO_RECIPE, {"model.path": str(src.root), "quantize.parallel": 3, "quantize.device_map": "auto"}
    )
    with pytest.raises(InputError, match="model has 2 decoder blocks; use at most 2 workers"):
        check_parallel(src, recipe, ["0", "1", "2"], [80.0] * 3)
    recipe = recipe.model_copy(update={"quantize": recipe.quantize.model_copy(update={"parallel": 2})})
    check_parallel(src, recipe, ["0"], [80.0])  # more workers than GPUs queue
    with pytest.raises(InputError, match=r"one block needs about .* GB of GPU memory .* smallest GPU has 0.0 GB"):
        check_parallel(src, recipe, ["0", "1"], [80.0, 1e-6])
    check_parallel(src, recipe, ["0", "1"], [80.0, 80.0])  # fits


def test_cli_refuses_more_gpus_than_visible_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    r = run("build", DEMO_RECIPE, "--gpus", "2", "--out", str(tmp_path / "run"))
    one_error_line(r, "--gpus 2 asks for more GPUs than are visible here (0)", "quantize.parallel=N")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    r = run("build", DEMO_RECIPE, "--gpus", "2", "--out", str(tmp_path / "run"))
    one_error_line(r, "quantizes on the CPU", "quantize.device_map=auto")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_more_workers_than_blocks(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    shutil.copy(data_dir("recipes") / "demo.yaml", tmp_path / "r.yaml")
    r = run(
        "build",
        str(tmp_path / "r.yaml"),
        "--model",
        str(src),
        "--set",
        "quantize.parallel=5",
        "--out",
        str(tmp_path / "run"),
    )
    one_error_line(r, "quantize.parallel is 5 but the model has 2 decoder blocks")
    assert not (tmp_path / "run").exists()


def test_a_worker_left_running_by_a_killed_build_is_not_overwritten(tmp_path):
    """A build killed with SIGKILL leaves its workers running: a re-run refuses to start over their folders."""
    import subprocess
    import sys

    from reap.parallel import plan_parts, run_workers
    from reap.rundir import RunDir

    src = Checkpoint.open(make_checkpoint(tmp_path / "src"))
    recipe = load_recipe(DEMO_RECIPE, {"model.path": str(src.root), "quantize.parallel": 2})
    run = RunDir(tmp_path / "run")
    parts = plan_parts(run, 2, recipe, [])
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "reap.parallel"])
    try:
        parts[1].root.mkdir(parents=True)
        parts[1].run.write_manifest({"stages": {"worker": {"status": "running", "pid": orphan.pid}}})
        (parts[1].root / "keep").write_text("the running worker's")
        with pytest.raises(
            InputError,
            match=rf"worker 1 \(CPU, blocks 1-1\) of an earlier attempt is still running "
            rf"\(pid {orphan.pid}",
        ):
            run_workers(src, recipe, parts)
        assert (parts[1].root / "keep").is_file()
    finally:
        orphan.kill()
        orphan.wait()


def test_gpu_workers_run_on_their_one_visible_gpu():
    from reap.parallel import _worker_env, _worker_recipe

    recipe = load_recipe(DEMO_RECIPE, {"quantize.device_map": "0,1,2,3", "quantize.parallel": 4})
    part = Part(2, 4, 6, "2", Path("p2"))
    assert _worker_recipe(recipe, part)["quantize"]["device_map"] == 0
    assert _worker_env(part, 4)["CUDA_VISIBLE_DEVICES"] == "2"
    cpu = Part(1, 2, 4, "cpu", Path("p1"))
    env = _worker_env(cpu, 2)
    assert _worker_recipe(recipe, cpu)["quantize"]["device_map"] == "cpu"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and int(env["OMP_NUM_THREADS"]) >= 1


class _Proc:
    def __init__(self, returncode=None):
        self.returncode = returncode


def test_workers_beyond_the_gpus_queue_one_per_gpu(tmp_path):
    from reap.parallel import _Launcher, _workers_at_once, plan_parts
    from reap.rundir import RunDir

    recipe = load_recipe(DEMO_RECIPE, {"quantize.parallel": 5, "quantize.device_map": "auto"})
    parts = plan_parts(RunDir(tmp_path), 10, recipe, ["0", "1"])
    assert [p.device for p in parts] == ["0", "1", "0", "1", "0"]
    at_once = _workers_at_once(recipe, parts)
    assert at_once == 2
    launcher = _Launcher(None, recipe, at_once, {}, [])
    launcher.parts, launcher.procs = {0: parts[0]}, {0: _Proc()}
    assert not launcher.free(parts[2]) and launcher.free(parts[1])  # GPU 0 is busy
    launcher.procs[0].returncode = 0
    assert launcher.free(parts[2])


def test_workers_at_once_bounds_cpu_workers(tmp_path):
    from reap.parallel import CAPTURE, Part, _Launcher, _workers_at_once, plan_parts
    from reap.rundir import RunDir

    recipe = load_recipe(DEMO_RECIPE, {"quantize.parallel": 4})
    parts = plan_parts(RunDir(tmp_path), 8, recipe, [])
    assert _workers_at_once(recipe, parts) == 4  # CPU workers all at once by default
    recipe = load_recipe(DEMO_RECIPE, {"quantize.parallel": 4, "quantize.workers_at_once": 1})
    at_once = _workers_at_once(recipe, parts)
    launcher = _Launcher(None, recipe, at_once, {}, [])
    capture = Part(CAPTURE, 0, 7, "cpu", tmp_path / "capture")
    launcher.parts, launcher.procs = {CAPTURE: capture}, {CAPTURE: _Proc()}
    assert not launcher.free(parts[0])  # the capture counts
    launcher.procs[CAPTURE].returncode = 0
    assert launcher.free(parts[0])
    launcher.parts[0], launcher.procs[0] = parts[0], _Proc()
    assert not launcher.free(parts[1])
