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
        part = Part(k, k, k + 1, k, "cpu", tmp_path / f"part-{k}", "fp", "in")
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
    parts = [Part(0, 0, 6, 0, "0", Path("p0"), "fp", "in"), Part(1, 6, 12, 1, "1", Path("p1"), "fp", "in")]
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


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--nodes", "2"], ["--nodes 2 needs --master ADDR:PORT"]),
        (["--nodes", "2", "--master", "host0"], ["needs --master ADDR:PORT", "host0:29500"]),
        (["--nodes", "2", "--node-rank", "2", "--master", "h:1"], ["--node-rank 2 is not below --nodes 2"]),
        (["--master", "h:29500"], ["--master is for builds over several hosts"]),
        (["--nodes", "2", "--master", "h:29500"], ["--nodes 2 needs at least 2 ranges"]),
    ],
)
def test_cli_refuses_a_host_layout_that_cannot_run(tmp_path, args, needles):
    r = run("build", DEMO_RECIPE, "--out", str(tmp_path / "run"), *args)
    one_error_line(r, *needles)
    assert not (tmp_path / "run").exists()


def test_a_rank_left_running_by_a_killed_build_is_not_overwritten(tmp_path):
    """A build killed with SIGKILL leaves its ranks running: a re-run refuses to start over their folders."""
    import socket
    import subprocess
    import sys

    from reap.parallel import Topology, run_ranks

    src = Checkpoint.open(make_checkpoint(tmp_path / "src"))
    recipe = load_recipe(DEMO_RECIPE, {"model.path": str(src.root), "quantize.parallel": 2})
    root = tmp_path / "run" / ".parallel"
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "reap.parallel"])
    try:
        (root / "part-1").mkdir(parents=True)
        worker = {"status": "running", "pid": orphan.pid, "host": socket.gethostname()}
        (root / "part-1" / "manifest.json").write_text(json.dumps({"stages": {"worker": worker}}))
        (root / "part-1" / "keep").write_text("the running rank's")
        with pytest.raises(
            InputError,
            match=rf"worker 1 \(rank 1, CPU, blocks 1-1\) of an earlier attempt is still running \(pid {orphan.pid}",
        ):
            run_ranks(src, recipe, root, [], Topology())
        assert (root / "part-1" / "keep").is_file()
    finally:
        orphan.kill()
        orphan.wait()


def _blocks_checkpoint(root: Path, blocks: int) -> Path:
    """Just enough of a checkpoint for planning: a config and one tensor per block (its header gives the size)."""
    import torch
    from safetensors.torch import save_file

    if (root / "config.json").is_file():
        return root
    root.mkdir(parents=True)
    text = {"num_hidden_layers": blocks, "num_experts": 4, "hidden_size": 8}
    (root / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": text}))
    tensors = {
        f"model.language_model.layers.{i}.mlp.experts.0.up_proj.weight": torch.zeros(8, 8) for i in range(blocks)
    }
    save_file({**tensors, "lm_head.weight": torch.zeros(8, 8)}, str(root / "model.safetensors"))
    return root


def _plan(tmp_path, overrides, gpus=(), blocks=2, topology=None):
    from reap.parallel import Topology, plan_parts

    src = Checkpoint.open(_blocks_checkpoint(tmp_path / "src", blocks))
    recipe = load_recipe(DEMO_RECIPE, {"model.path": str(src.root), **overrides})
    return plan_parts(tmp_path / "run", src, recipe, list(gpus), topology or Topology()), src, recipe


def test_gpu_ranks_run_on_their_one_visible_gpu(tmp_path):
    from reap.parallel import _part_recipe, _rank_env

    parts, _, recipe = _plan(tmp_path, {"quantize.device_map": "0,1", "quantize.parallel": 2}, gpus=["0", "1"])
    assert [p.device for p in parts] == ["0", "1"]
    assert _part_recipe(recipe, parts[1]).quantize.device_map == 0
    env = _rank_env(1, 2, 1, 2, "1", ("127.0.0.1", 29500))
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29500"
    cpu = _rank_env(0, 2, 0, 2, "cpu", ("127.0.0.1", 1))
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and int(cpu["OMP_NUM_THREADS"]) >= 1


def test_ranges_beyond_the_ranks_take_turns_on_them(tmp_path):
    """More ranges than GPUs (or quantize.workers_at_once): rank r takes ranges r, r + W, ...; a range after
    one of the same rank reads the inputs that rank saved, the others receive them."""
    parts, _, _ = _plan(tmp_path, {"quantize.parallel": 5, "quantize.device_map": "auto"}, gpus=["0", "1"], blocks=10)
    assert [(p.rank, p.device) for p in parts] == [(0, "0"), (1, "1"), (0, "0"), (1, "1"), (0, "0")]
    assert [p.inputs for p in parts] == ["calibration", "recv", "recv", "recv", "recv"]
    assert [p.forward for p in parts] == [True] * 4 + [False] and [p.send for p in parts] == [True] * 4 + [False]
    parts, _, _ = _plan(tmp_path, {"quantize.parallel": 4, "quantize.workers_at_once": 1}, blocks=8)
    assert {p.rank for p in parts} == {0} and [p.inputs for p in parts] == ["calibration", "file", "file", "file"]
    assert not any(p.send for p in parts) and [p.forward for p in parts] == [True, True, True, False]


def test_a_rerun_keeps_finished_ranges_and_reads_what_they_handed_on(tmp_path):
    from reap.parallel import source_fingerprint

    parts, src, recipe = _plan(tmp_path, {"quantize.parallel": 2})
    done = {"stages": {"worker": {"status": "done", "fingerprint": parts[0].fingerprint}}}
    parts[0].model.mkdir(parents=True)
    (parts[0].root / "manifest.json").write_text(json.dumps(done))
    again, _, _ = _plan(tmp_path, {"quantize.parallel": 2})
    assert not again[0].kept  # its handed-on inputs are missing: redone, so that range 1 gets them
    handed = parts[1].inputs_file
    handed.write_bytes(b"tensors")
    handed.with_suffix(".json").write_text(json.dumps({"fingerprint": source_fingerprint(src, recipe, [1])}))
    again, _, _ = _plan(tmp_path, {"quantize.parallel": 2})
    assert again[0].kept and not again[1].kept and again[1].inputs == "file" and not again[0].forward
    handed.with_suffix(".json").write_text(json.dumps({"fingerprint": "another source"}))
    again, _, _ = _plan(tmp_path, {"quantize.parallel": 2})
    assert not again[0].kept and again[1].inputs == "recv"


def test_hosts_share_the_ranks_in_order(tmp_path):
    from reap.parallel import Topology, node_of

    parts, _, recipe = _plan(tmp_path, {"quantize.parallel": 4}, blocks=4, topology=Topology(2, 1, "host0", 29500))
    assert [node_of(p.rank, 4, Topology(2, 1, "host0", 29500)) for p in parts] == [0, 0, 1, 1]
    with pytest.raises(InputError, match="3 ranks do not divide among 2 hosts"):
        _plan(tmp_path, {"quantize.parallel": 3}, blocks=4, topology=Topology(2, 0, "host0", 29500))
