"""Where the time of one AutoRound block goes (issue 21): one MoE block of the 212B width under reap's engine.

Writes a 1-layer random-init slice (`make_slice.write_slice`: a DeltaNet block, hidden 4096, 268 experts of
1024, top-10), runs `reap.engine.quantize` on it (AutoRound 0.16.1, the recipe's settings) and times its
phases by wrapping AutoRound's own functions, with the device synchronised at each edge:

    input caching         Calibrator.__call__ (embedding + calibration pass up to the block)
    materialize/dispatch  the block's weights materialised and moved to the device
    fp outputs            the first no-grad forward of the block (full-precision reference outputs)
    wrapping              wrapper_block (WrapperLinear per Linear: rounding and min/max parameters)
    tuning iterations     between optimizer steps (forward, backward, best-params copy, SignSGD step)
    unwrap (final qdq)    unwrapper_block with the best parameters
    q outputs             the no-grad forward of the quantized block (inputs of the next block)
    pack                  immediate_pack of every quantized layer; save: save_quantized

A few tuning iterations run under torch.profiler: kernels launched per iteration, time in kernels against
wall time (the rest is the host: Python, launches, synchronisations).

    python benchmarks/gpu_block_profile.py WORK [--tiny] [--iters 50] [--nsamples 64] [--seqlen 512] \\
        [--device cuda|cpu] [--json OUT.json]

`--tiny` rehearses the same run on a CPU with the demo model's widths. benchmarks/gpu_block_profile.sh runs it
on a lent GPU host.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class Phases:
    """Wall time of calls to patched functions, the device synchronised before and after each call."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.calls: list[tuple[str, float, float]] = []
        self.steps: list[float] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def sync(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        orig = getattr(owner, attr)

        @functools.wraps(orig)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = self.sync()
            try:
                return orig(*args, **kwargs)
            finally:
                self.calls.append((name, t0, self.sync()))

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))

    def undo(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)

    def total(self, name: str) -> float:
        return round(sum(b - a for n, a, b in self.calls if n == name), 3)

    def each(self, name: str) -> list[float]:
        return [round(b - a, 3) for n, a, b in self.calls if n == name]


def kernel_stats(prof: Any, iterations: int, wall_s: float) -> dict[str, Any]:
    """Kernels per iteration and their time from a torch.profiler run over `iterations` tuning iterations."""
    from torch.autograd import DeviceType

    kernels = [  # not the GPU-side ranges of annotations such as Optimizer.step#SignSGD.step
        e
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Optimizer.", "Profiler"))
    ]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy_us, end = 0.0, float("-inf")
    for a, b in spans:  # union of the kernels' intervals (several streams may overlap)
        if b > end:
            busy_us += b - max(a, end)
            end = b
    aten = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {
        "iterations": iterations,
        "wall_s_per_iter_profiled": round(wall_s / iterations, 4),
        "kernels_per_iter": round(len(kernels) / iterations),
        "aten_ops_per_iter": round(len(aten) / iterations),
        "kernel_busy_s_per_iter": round(busy_us / 1e6 / iterations, 4),
        "busy_fraction": round(busy_us / 1e6 / wall_s, 3) if wall_s else None,
        "top_kernels": [
            {
                "name": n[:90],
                "calls_per_iter": round(len(v) / iterations),
                "s_per_iter": round(sum(v) / 1e6 / iterations, 4),
            }
            for n, v in top
        ],
    }


def install(ph: Phases, profile_from: int, profile_iters: int, state: dict[str, Any]) -> None:
    """Patch AutoRound's phase functions (before the AutoRound object is made: it binds wrapper_block then)."""
    import torch
    from auto_round.algorithms import block_runner
    from auto_round.algorithms.composer import AlgorithmComposer
    from auto_round.algorithms.quantization.sign_round import quantizer as sr
    from auto_round.calibration.base import Calibrator
    from auto_round.compressors import orchestrator
    from auto_round.compressors import utils as cutils
    from auto_round.compressors.base import BaseOrchestrator

    from reap import fastround

    ph.wrap(Calibrator, "__call__", "input_caching")
    ph.wrap(orchestrator, "materialize_model_", "materialize")
    ph.wrap(AlgorithmComposer, "dispatch_block", "dispatch_to_device")
    ph.wrap(block_runner.BlockForwardRunner, "__call__", "nograd_forward")
    ph.wrap(sr, "wrapper_block", "wrapping")
    ph.wrap(fastround, "wrap_experts", "wrapping_stacked")
    ph.wrap(sr, "unwrapper_block", "unwrap_final_qdq")
    ph.wrap(sr.SignRoundQuantizer, "quantize_block", "quantize_block")
    ph.wrap(cutils, "immediate_pack", "pack")
    ph.wrap(BaseOrchestrator, "save_quantized", "save")

    orig_qb = sr.SignRoundQuantizer.quantize_block

    def quantize_block(self: Any, block: Any, fp_inputs: Any, *args: Any, **kwargs: Any) -> Any:
        state["samples"] = len(fp_inputs) if isinstance(fp_inputs, list) else None
        state["sample_shape"] = list(fp_inputs[0].shape) if isinstance(fp_inputs, list) else None
        state["step_times"] = ph.steps = [ph.sync()]
        return orig_qb(self, block, fp_inputs, *args, **kwargs)

    sr.SignRoundQuantizer.quantize_block = quantize_block
    ph._undo.append((sr.SignRoundQuantizer, "quantize_block", orig_qb))

    orig_step = sr.SignRoundQuantizer._step
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ph.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def step(self: Any, *args: Any) -> Any:
        out = orig_step(self, *args)
        ph.steps.append(ph.sync())
        done = len(ph.steps) - 1  # iterations finished
        if done == profile_from and state.get("profile") is None:
            state["prof"] = torch.profiler.profile(activities=activities)
            state["prof"].__enter__()
            state["prof_t0"] = time.perf_counter()
        elif done == profile_from + profile_iters and "prof" in state and state.get("profile") is None:
            wall = time.perf_counter() - state["prof_t0"]
            state["prof"].__exit__(None, None, None)
            state["profile"] = kernel_stats(state.pop("prof"), profile_iters, wall)
        return out

    sr.SignRoundQuantizer._step = step
    ph._undo.append((sr.SignRoundQuantizer, "_step", orig_step))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile-from", type=int, default=5, help="first profiled tuning iteration")
    ap.add_argument("--profile-iters", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--expert-tuning", choices=["autoround", "stacked"], default="autoround")
    ap.add_argument("--keep-slice", action="store_true", help="reuse WORK/slice if it is there")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_slice import write_slice
    from reap import engine
    from reap.checkpoint import Checkpoint
    from reap.compat import ensure_torchvision_importable
    from reap.recipe import load_recipe
    from reap.stats import Clock, package_versions

    slice_dir, out = args.work / "slice", args.work / "out"
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not (args.keep_slice and (slice_dir / "config.json").is_file()):
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        report["slice"] = write_slice(slice_dir, 1, args.experts, args.device, tiny=args.tiny)
    shutil.rmtree(out, ignore_errors=True)  # a second run (the other path) reuses the slice: --keep-slice
    shutil.rmtree(out.with_name(out.name + ".autoround"), ignore_errors=True)
    cuda = args.device.startswith("cuda")
    recipe = load_recipe(
        REPO / "recipes" / "demo.yaml",
        {
            "model.path": str(slice_dir),
            "quantize.iters": args.iters,
            "quantize.nsamples": args.nsamples,
            "quantize.seqlen": args.seqlen,
            "quantize.dataset": str(slice_dir / "calibration.jsonl"),
            "quantize.device_map": 0 if cuda else "cpu",
            "quantize.routed_experts": "quantize",
            "quantize.format": "auto_round",
            "quantize.expert_tuning": args.expert_tuning,
            "serve.tensor_parallel_size": 1 if args.tiny else 4,
        },
    )
    ensure_torchvision_importable()
    import torch

    ph, state = Phases(cuda), {}
    install(ph, args.profile_from, args.profile_iters, state)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = Clock()
    t0 = ph.sync()
    try:
        result = engine.quantize(Checkpoint.open(slice_dir), recipe, out, args.work / "build.log", clock)
    finally:
        ph.undo()
    wall = ph.sync() - t0
    steps = state.get("step_times", [])
    iters = [round(b - a, 4) for a, b in zip(steps, steps[1:], strict=False)]
    unprofiled = [t for i, t in enumerate(iters) if not args.profile_from <= i < args.profile_from + args.profile_iters]
    fwd = ph.each("nograd_forward")
    phases = {
        "weight_loading (AutoRound object)": clock.spans.get("weight_loading"),
        "input_caching": ph.total("input_caching"),
        "materialize": ph.total("materialize"),
        "dispatch_to_device": ph.total("dispatch_to_device"),
        "fp_outputs (1st no-grad forward)": fwd[0] if fwd else None,
        "wrapping": ph.total("wrapping"),
        "wrapping_stacked (inside wrapping)": ph.total("wrapping_stacked"),
        "tuning_iterations": round(sum(iters), 3),
        "unwrap_final_qdq": ph.total("unwrap_final_qdq"),
        "q_outputs (later no-grad forwards)": round(sum(fwd[1:]), 3),
        "quantize_block (wrap+tune+unwrap)": ph.total("quantize_block"),
        "pack": ph.total("pack"),
        "save": ph.total("save"),
        "engine.quantize total": round(wall, 3),
    }
    report.update(
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        versions=package_versions(),
        samples=state.get("samples"),
        sample_shape=state.get("sample_shape"),
        phases_s=phases,
        iterations=len(iters),
        iter_s_median=sorted(unprofiled)[len(unprofiled) // 2] if unprofiled else None,
        iter_s_first3=iters[:3],
        profile=state.get("profile"),
        blocks=result["blocks"],
        expert_tuning=result["expert_tuning"],
        peak_gpu_allocated_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
