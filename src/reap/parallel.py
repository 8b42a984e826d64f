"""Block-parallel AutoRound: `reap build --gpus N` (recipe `quantize.parallel: N`).

The decoder blocks are split into N contiguous ranges, one worker process each (one GPU each; on a host
without GPUs, CPU processes sharing the cores). Worker k runs real AutoRound on a *view* of the source cut
after its last block (a folder of links whose config says `num_hidden_layers = stop`): the blocks before
its range are run untuned, which is the full-precision forward pass over the calibration set that gives
its first block's inputs; inside its range the quantized outputs feed the next block, exactly as in a
sequential build. Each worker saves a checkpoint into `.parallel/part-K/model`; `merge_parts` takes each
block's tensors from the worker that owns it (everything else from the last worker, whose view is the
whole model) and joins the workers' quantization configs into one, so the result has the tensor names and
`quantization_config` of a sequential build. The usual gates then run on it.

A worker's finished range is kept (`part-K/result.json` with a fingerprint of its inputs): a re-run after
a failure or Ctrl-C redoes only the ranges that are missing. `python -m reap.parallel SPEC.json` is the
worker's entry point.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reap.checkpoint import Checkpoint, layer_index
from reap.errors import InputError, ReapError, StageError
from reap.recipe import Recipe
import psutil

from reap.rundir import RunDir, atomic_write_text, digest
from reap.stats import GB, Clock, ResourceSampler, gpu_inventory, log, visible_gpu_ids

PARALLEL_DIR = ".parallel"
# Bytes of GPU memory per parameter of the largest block while AutoRound tunes it (weights, their fp32
# rounding parameters and gradients); measured: a 3.5 B-parameter block of the 212B model's width took
# 67-70 GB at iters 200 on an H100 (issue #8) and 85 GB NVML peak at iters 20 on an H200. RTN needs far less.
TUNE_BYTES_PER_PARAM, RTN_BYTES_PER_PARAM = 20, 4
PREFIX_STEPS = 25  # tuning steps that cost as much as one untuned block: see prefix_cost()


def prefix_cost(iters: int) -> float:
    """What running one block untuned (the full-precision prefix) costs, in tuned blocks: a block's fixed
    part (forward passes over the calibration set, wrapping, packing) against `iters` tuning steps. Measured
    on the 212B width: ~23 s fixed and ~0.9 s per step (41 s at iters 20 on H200, 206 s at iters 200 on H100),
    i.e. the fixed part is worth ~25 steps."""
    return PREFIX_STEPS / (PREFIX_STEPS + iters)


def split_blocks(n_blocks: int, workers: int, cost: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous ranges [start, stop), at least one block each, sized so that the workers finish together:
    worker k first runs its `start` earlier blocks untuned at `cost` each (in tuned blocks), so the later
    ranges are shorter. With cost 0 the ranges are equal, the earlier ones taking the remainder."""
    if cost <= 0:
        base, extra = divmod(n_blocks, workers)
        sizes = [base + (1 if k < extra else 0) for k in range(workers)]
    else:
        def starts(t: float) -> list[float]:  # worker k's share is t - cost * start_k
            out = [0.0]
            for _ in range(workers):
                out.append(out[-1] + max(t - cost * out[-1], 0.0))
            return out

        lo, hi = 0.0, float(n_blocks)
        for _ in range(60):  # the t whose shares add up to n_blocks
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if starts(mid)[-1] < n_blocks else (lo, mid)
        bounds = [round(b) for b in starts(hi)[:-1]] + [n_blocks]
        for k in range(1, workers + 1):  # every worker keeps at least one block
            bounds[k] = min(max(bounds[k], bounds[k - 1] + 1), n_blocks - (workers - k))
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def gpus_for(recipe: Recipe) -> tuple[list[str], list[float]]:
    """The GPUs the workers would use (none when the recipe quantizes on the CPU) and their memory in GB."""
    if recipe.quantize.device_map == "cpu":
        return [], []
    ids = visible_gpu_ids()
    memory = {str(g["index"]): g["memory_gb"] for g in gpu_inventory()}
    return ids, [memory.get(i, 0.0) for i in ids]


def block_params(src: Checkpoint) -> int:
    """Parameters of the largest decoder block of the source (from the shard headers)."""
    sizes: dict[int, int] = {}
    for name, info in src.tensors.items():
        i = layer_index(name)
        if i is not None:
            sizes[i] = sizes.get(i, 0) + math.prod(info.shape)
    return max(sizes.values(), default=0)


def block_memory_estimate(src: Checkpoint, recipe: Recipe) -> int:
    """Bytes of GPU memory one worker needs for the largest block: weights and tuning state, plus the
    calibration activations (input, reference output and quantized output, fp32)."""
    q = recipe.quantize
    per_param = TUNE_BYTES_PER_PARAM if q.iters > 0 else RTN_BYTES_PER_PARAM
    hidden = int(src.text_config.get("hidden_size", 0))
    return block_params(src) * per_param + 3 * q.nsamples * q.seqlen * hidden * 4


def check_parallel(src: Checkpoint, recipe: Recipe, gpus: list[str], gpu_memory_gb: list[float]) -> None:
    """Refuse, before any weight is read, what cannot run: more workers than blocks, more GPUs asked for than
    visible, a GPU too small for one block."""
    n = recipe.quantize.parallel
    blocks = int(src.text_config.get("num_hidden_layers", 0))
    if n > blocks:
        raise InputError(f"quantize.parallel is {n} but the model has {blocks} decoder blocks; "
                         f"use at most {blocks} workers")
    if recipe.quantize.device_map == "cpu":
        return
    if gpus and n > len(gpus):
        raise InputError(f"{n} workers (--gpus / quantize.parallel) but {len(gpus)} GPUs are visible; "
                         f"use at most {len(gpus)}")
    if gpus:
        need = block_memory_estimate(src, recipe)
        smallest = min(gpu_memory_gb[:n])
        if need > smallest * GB:
            raise InputError(
                f"one block needs about {need / GB:.1f} GB of GPU memory (largest block {block_params(src) / 1e9:.2f} B "
                f"parameters, iters={recipe.quantize.iters}, nsamples={recipe.quantize.nsamples}, "
                f"seqlen={recipe.quantize.seqlen}) but the smallest GPU has {smallest:.1f} GB; lower "
                "quantize.nsamples/seqlen or use larger GPUs")


# --- the workers' inputs -------------------------------------------------------------------------------

VIEW_KEYS = ("num_hidden_layers", "layer_types", "use_cache")


def write_view(src: Path, dest: Path, stop: int) -> None:
    """A folder of links to `src` whose config ends the decoder after block `stop` (the shards keep every
    tensor; transformers leaves out the blocks the config does not have). `use_cache` is off: transformers'
    Qwen3.5 cache fails the forward pass of a model whose blocks are all DeltaNet (e.g. blocks 0-1)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config", config)
    text["num_hidden_layers"] = stop
    text["use_cache"] = False
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:stop]
    atomic_write_text(dest / "config.json", json.dumps(config, indent=2) + "\n")


def source_fingerprint(src: Checkpoint, recipe: Recipe, part: tuple[int, int]) -> str:
    """What a worker's output depends on: the recipe's model and quantize sections (but not the worker
    count), the source files (names, sizes, mtimes) and the block range."""
    return digest([recipe.model.model_dump(mode="json"), recipe.quantize.model_dump(mode="json", exclude={"parallel"}),
                   src.file_signature(), list(part)])


@dataclass
class Part:
    index: int
    start: int
    stop: int
    device: str  # the CUDA_VISIBLE_DEVICES entry, or "cpu"
    root: Path

    @property
    def view(self) -> Path:
        return self.root / "source"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def result_path(self) -> Path:
        return self.root / "result.json"

    @property
    def log_path(self) -> Path:
        return self.root / "worker.log"

    def result(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return None

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"GPU {self.device}"
        return f"worker {self.index} ({where}, blocks {self.start}-{self.stop - 1})"


def plan_parts(run: RunDir, n_blocks: int, recipe: Recipe, gpus: list[str]) -> list[Part]:
    ranges = split_blocks(n_blocks, recipe.quantize.parallel, prefix_cost(recipe.quantize.iters))
    return [Part(k, a, b, gpus[k] if gpus else "cpu", run.root / PARALLEL_DIR / f"part-{k}")
            for k, (a, b) in enumerate(ranges)]


def _worker_env(part: Part, workers: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if part.device == "cpu":  # share the cores: oversubscribed OpenMP threads make every worker crawl
        threads = max(1, (os.cpu_count() or 1) // workers)
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    else:
        env["CUDA_VISIBLE_DEVICES"] = part.device
    return env


def _worker_alive(pid: int | None) -> bool:
    """Whether `pid` is a reap worker still running (a parent killed with SIGKILL leaves its workers behind)."""
    try:
        return pid is not None and "reap.parallel" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _worker_recipe(recipe: Recipe, part: Part) -> dict[str, Any]:
    """The recipe a worker runs: the build's, on its one device (a GPU worker sees only its GPU, as 0)."""
    data = recipe.model_dump(mode="json")
    data["quantize"]["device_map"] = "cpu" if part.device == "cpu" else 0
    return data


def run_workers(src: Checkpoint, recipe: Recipe, run: RunDir, parts: list[Part]) -> list[dict[str, Any]]:
    """Start one process per missing part, wait for all; returns every part's result. A part already done
    with the same fingerprint is kept. Raises StageError naming each worker that failed."""
    from reap.serve import stop_group

    fingerprints = {part.index: source_fingerprint(src, recipe, (part.start, part.stop)) for part in parts}
    kept: set[int] = set()
    for part in parts:  # decide for every part before any worker starts
        done = part.result() or {}
        if done.get("status") == "done" and done.get("fingerprint") == fingerprints[part.index] and part.model.is_dir():
            log(f"{part.describe()}: kept from an earlier attempt")
            kept.add(part.index)
        elif done.get("status") == "running" and _worker_alive(done.get("pid")):
            raise InputError(f"{part.describe()} of an earlier attempt is still running (pid {done['pid']}, "
                             f"log {part.log_path}); wait for it to end or stop it, then re-run")
    procs: dict[int, subprocess.Popen] = {}
    try:
        for part in (p for p in parts if p.index not in kept):
            shutil.rmtree(part.root, ignore_errors=True)
            write_view(src.root, part.view, part.stop)
            spec = {"recipe": _worker_recipe(recipe, part), "view": str(part.view), "out": str(part.model),
                    "start": part.start, "stop": part.stop, "index": part.index, "device": part.device,
                    "fingerprint": fingerprints[part.index], "result": str(part.result_path), "log": str(part.log_path)}
            atomic_write_text(part.root / "spec.json", json.dumps(spec, indent=2))
            log(f"{part.describe()}: started (log {part.log_path})")
            with open(part.root / "stdout.log", "w") as out:
                procs[part.index] = subprocess.Popen(
                    [sys.executable, "-m", "reap.parallel", str(part.root / "spec.json")],
                    env=_worker_env(part, len(parts)), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        for index, proc in procs.items():
            proc.wait()
            log(f"{parts[index].describe()}: {(parts[index].result() or {}).get('status') or f'died (exit {proc.returncode})'}")
    except BaseException:
        for proc in procs.values():
            if proc.poll() is None:
                stop_group(proc.pid, grace=10, child=proc)
        raise
    results = [part.result() or {} for part in parts]
    failed = [f"{part.describe()} failed: {res.get('error') or f'exit {procs[part.index].returncode}, no result written'}"
              f" (log: {part.log_path}, output: {part.root / 'stdout.log'})"
              for part, res in zip(parts, results) if res.get("status") != "done"]
    if failed:
        raise StageError("; ".join(failed) + "; finished ranges are kept, re-run the build to redo only the rest")
    return [dict(res, kept=part.index in kept) for part, res in zip(parts, results)]


# --- merging -------------------------------------------------------------------------------------------

def _owner(layer: int, parts: list[Part]) -> int:
    return next(p.index for p in parts if p.start <= layer < p.stop)


def merge_quantization_configs(configs: list[dict[str, Any]], parts: list[Part]) -> dict[str, Any]:
    """One config as a sequential build writes it: per-layer entries (`dynamic`, `extra_config`, ...) of
    each block from the worker that owns it, lists of module names joined."""
    merged = dict(configs[-1])
    for key, value in merged.items():
        if isinstance(value, dict):
            merged[key] = {k: v for cfg, part in zip(configs, parts) for k, v in cfg.get(key, {}).items()
                           if (layer := layer_index(k.replace("\\", ""))) is None or part.start <= layer < part.stop}
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            names = {n for cfg in configs for group in cfg.get(key) or [] for n in group}
            merged[key] = [sorted(names)]
    return merged


def merge_parts(parts: list[Part], dest: Path, src_config: dict[str, Any]) -> dict[str, Any]:
    """Write the merged checkpoint into `dest`: each block from its owner, the rest from the last part, whose
    config gets back what its view changed (`VIEW_KEYS`, from the source's `src_config`)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    last = parts[-1]
    sources = [Checkpoint.open(p.model) for p in parts]
    jobs: list[tuple[Path, list[str]]] = []  # (source shard, tensor names taken from it)
    for part, ckpt in zip(parts, sources):
        by_shard: dict[str, list[str]] = {}
        for name, shard in ckpt.weight_map.items():
            layer = layer_index(name)
            mine = part is last if layer is None else _owner(layer, parts) == part.index
            if mine:
                by_shard.setdefault(shard, []).append(name)
        jobs += [(part.model / shard, names) for shard, names in sorted(by_shard.items())]
    weight_map, total = {}, 0
    single = len(jobs) == 1
    for i, (shard, names) in enumerate(jobs, 1):
        out_name = "model.safetensors" if single else f"model-{i:05d}-of-{len(jobs):05d}.safetensors"
        with safe_open(str(shard), "pt") as f:
            tensors = {n: f.get_tensor(n) for n in names}
        save_file(tensors, str(dest / out_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: out_name for n in names})
        del tensors
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(dest / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    for f in last.model.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dest / f.name)
    qconfigs = [s.quantization_config or {} for s in sources]
    merged = merge_quantization_configs(qconfigs, parts)
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = merged
    text, src_text = config.get("text_config", config), src_config.get("text_config", src_config)
    for key in VIEW_KEYS:
        if key in src_text:
            text[key] = src_text[key]
        else:
            text.pop(key, None)
    atomic_write_text(dest / "config.json", json.dumps(config, indent=2) + "\n")
    if (dest / "quantization_config.json").is_file():
        atomic_write_text(dest / "quantization_config.json", json.dumps(merged, indent=2) + "\n")
    return {"tensors": len(weight_map), "shards": len(jobs)}


# --- the build stage's entry -----------------------------------------------------------------------------

def quantize_parallel(src: Checkpoint, recipe: Recipe, work: Path, run: RunDir, clock: Clock,
                      sampler: ResourceSampler) -> dict[str, Any]:
    """Run the workers, merge their checkpoints into `work`; returns what `build._quantize` returns, plus
    the per-worker record (each worker's peak GPU memory from the build's `sampler`, which NVML numbers as
    CUDA does by default)."""
    from reap.build import keep_16bit_layers

    gpus, _ = gpus_for(recipe)
    n_blocks = int(src.text_config["num_hidden_layers"])
    parts = plan_parts(run, n_blocks, recipe, gpus)
    log(f"{len(parts)} workers: " + ", ".join(p.describe() for p in parts))
    if recipe.quantize.iters == 0:
        log("note: with iters 0 (RTN) running the earlier blocks untuned costs about as much as quantizing them: "
            "workers beyond the first save little time")
    with clock.span("parallel_quantization"):
        results = run_workers(src, recipe, run, parts)
    with clock.span("merge"):
        merged = merge_parts(parts, work, src.config)
    sampler.sample()
    peak_vram = sampler.summary()["peak_vram_gb"] or {}
    blocks, workers = [], []
    for part, res in zip(parts, results):
        own = res["blocks"][part.start:part.stop]
        blocks += [dict(b, worker=part.index) for b in own]
        workers.append({"index": part.index, "device": part.device, "blocks": [part.start, part.stop - 1],
                        "wall_s": res["wall_s"], "prefix_s": round(sum(b["wall_s"] for b in res["blocks"][:part.start]), 3),
                        "block_wall_s": [b["wall_s"] for b in own], "substages": res["substages"],
                        "peak_rss_gb": res["peak_rss_gb"], "peak_vram_gb": peak_vram.get(part.device),
                        "kept_from_earlier_attempt": res["kept"], "log": str(part.log_path)})
    summaries = [r["autoround_summary"] for r in results if r.get("autoround_summary")]
    kept = keep_16bit_layers(src, recipe)
    return {"blocks": blocks, "fixes_applied": sorted({f for r in results for f in r["fixes_applied"]}),
            "autoround_summary": ({"quantized": sum(s["quantized"] for s in summaries), "total": summaries[-1]["total"]}
                                  if len(summaries) == len(results) else None),
            "kept_16bit_requested": sorted(set(kept.values())), "layer_config_16bit": len(kept),
            "parallel": {"workers": workers, "merged": merged, "prefix_cost": round(prefix_cost(recipe.quantize.iters), 3)}}


def finish(run: RunDir) -> None:
    """The merged checkpoint is in place: the workers' outputs are no longer needed."""
    shutil.rmtree(run.root / PARALLEL_DIR, ignore_errors=True)


def worker_main(spec_path: Path) -> int:
    """One worker: quantize blocks [start, stop) of the view with AutoRound, write result.json."""
    from reap.build import _quantize

    spec = json.loads(spec_path.read_text())
    result: dict[str, Any] = {"status": "running", "fingerprint": spec["fingerprint"], "pid": os.getpid(),
                              "range": [spec["start"], spec["stop"]], "device": spec["device"]}
    result_path = Path(spec["result"])
    atomic_write_text(result_path, json.dumps(result))
    clock, t0 = Clock(), time.perf_counter()
    try:
        recipe = Recipe.model_validate(spec["recipe"])
        with ResourceSampler() as sampler:
            out = _quantize(Checkpoint.open(Path(spec["view"])), recipe, Path(spec["out"]), Path(spec["log"]), clock,
                            block_range=(spec["start"], spec["stop"]))
        result.update(out, status="done", substages=clock.spans, wall_s=round(time.perf_counter() - t0, 3),
                      peak_rss_gb=sampler.summary()["peak_rss_gb"])
    except ReapError as exc:
        result.update(status="failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the parent reports it in one line with the log's path
        result.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    atomic_write_text(result_path, json.dumps(result, indent=2))
    return 0 if result["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1])))
