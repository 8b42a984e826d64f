"""Block-parallel AutoRound: `reap build --gpus N` (recipe `quantize.parallel: N`).

The decoder blocks are split into N contiguous ranges, one worker process each (one GPU each; on a host
without GPUs, CPU processes sharing the cores). Each worker runs real AutoRound on a *range view*: a
checkpoint of its own blocks only, renumbered from 0, beside the source's other tensors (embeddings, norm,
head), so it loads and holds its blocks and nothing else. Inside its range the quantized outputs feed the
next block, exactly as in a sequential build. Its first block's inputs come from the *input capture*,
computed once for all workers: AutoRound's calibration pass gives block 0's inputs, then the blocks before the
last range run in full precision one at a time, streamed from the shards, and the inputs of every range's
first block are saved as the pass reaches it; each worker starts as soon as its inputs are there (worker 0
needs none). More workers than GPUs queue, one per GPU; `quantize.workers_at_once` bounds how many run.
`merge_parts` numbers each worker's blocks back and joins the workers' quantization configs into one, so
the result has the tensor names and `quantization_config` of a sequential build. The usual gates then run.

A finished range, and the capture, are kept (the `worker` stage record in the part's own `manifest.json`,
written by the same stage lifecycle as every command, with a fingerprint of their inputs): a re-run
after a failure or Ctrl-C redoes only what is missing. `python -m reap.parallel SPEC.json` is the entry
point of the worker and capture processes.
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

import psutil

from reap import compat, engine, procs
from reap.checkpoint import Checkpoint, layer_index, shift_layer
from reap.errors import InputError, ReapError, StageError
from reap.prune import decoder_layer, moe_layout, text_config
from reap.recipe import Recipe
from reap.rundir import RunDir, atomic_write_text, digest
from reap.stats import GB, Clock, ResourceSampler, gpu_inventory, log, visible_gpu_ids

PARALLEL_DIR = ".parallel"
CAPTURE = -1  # the Part index of the input capture
# Bytes of GPU memory per parameter of the largest block while AutoRound tunes it (weights, their fp32
# rounding parameters and gradients); measured: a 3.5 B-parameter block of the 212B model's width took
# 67-70 GB at iters 200 on an H100 (issue #8) and 85 GB NVML peak at iters 20 on an H200. RTN needs far less.
TUNE_BYTES_PER_PARAM, RTN_BYTES_PER_PARAM = 20, 4


def split_blocks(n_blocks: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges [start, stop) of equal size, the earlier ones taking the remainder (worker 0 starts
    at once; the others wait for the input capture)."""
    base, extra = divmod(n_blocks, workers)
    ranges, start = [], 0
    for k in range(workers):
        size = base + (1 if k < extra else 0)
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
    """Refuse, before any weight is read, what cannot run: more workers than blocks, a GPU too small for one
    block. (More GPUs asked for than visible is refused by the CLI's --gpus; a recipe's `parallel` above the
    visible GPUs queues its workers.)"""
    n = recipe.quantize.parallel
    blocks = int(src.text_config.get("num_hidden_layers", 0))
    if n > blocks:
        raise InputError(
            f"quantize.parallel is {n} but the model has {blocks} decoder blocks; use at most {blocks} workers"
        )
    if recipe.quantize.device_map == "cpu":
        return
    if gpus:
        need = block_memory_estimate(src, recipe)
        smallest = min(gpu_memory_gb[:n])
        if need > smallest * GB:
            raise InputError(
                f"one block needs about {need / GB:.1f} GB of GPU memory "
                f"(largest block {block_params(src) / 1e9:.2f} B "
                f"parameters, iters={recipe.quantize.iters}, nsamples={recipe.quantize.nsamples}, "
                f"seqlen={recipe.quantize.seqlen}) but the smallest GPU has {smallest:.1f} GB; lower "
                "quantize.nsamples/seqlen or use larger GPUs"
            )


# --- the workers' inputs -------------------------------------------------------------------------------

VIEW_KEYS = ("num_hidden_layers", "layer_types", "use_cache")


def _write_view_config(src: Path, dest: Path, start: int, stop: int) -> None:
    """The source's config for decoder blocks [start, stop) only. `use_cache` is off: transformers' Qwen3.5
    cache fails the forward pass of a model whose blocks are all DeltaNet (e.g. blocks 0-1)."""
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config", config)
    text["num_hidden_layers"] = stop - start
    text["use_cache"] = False
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][start:stop]
    atomic_write_text(dest / "config.json", json.dumps(config, indent=2) + "\n")


def _link_files(src: Path, dest: Path, weights: bool) -> None:
    """`dest` anew, with links to the files of `src` but its config (and its weights unless `weights`)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in src.iterdir():
        is_weights = f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json"
        if f.name != "config.json" and (weights or not is_weights):
            (dest / f.name).symlink_to(f.resolve())


def write_view(src: Path, dest: Path, stop: int) -> None:
    """The input capture's view: links to `src` with a config that ends the decoder after block `stop`
    (the shards keep every tensor; transformers leaves out the blocks the config does not have)."""
    _link_files(src, dest, weights=True)
    _write_view_config(src, dest, 0, stop)


def _write_shards(jobs: list[tuple[Path, list[str], int]], dest: Path) -> int:
    """Copy tensors into `dest`, one output file per (source file, tensor names, block offset) job, the block
    numbers moved by the offset: `model.safetensors`, or numbered shards and their index. Reads are
    memory-mapped and one job is in memory at a time. Returns the number of tensors written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    single = len(jobs) == 1
    for i, (shard, names, offset) in enumerate(jobs, 1):
        out_name = "model.safetensors" if single else f"model-{i:05d}-of-{len(jobs):05d}.safetensors"
        with safe_open(str(shard), "pt") as f:
            tensors = {shift_layer(n, offset): f.get_tensor(n) for n in names}
        save_file(tensors, str(dest / out_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, out_name))
        del tensors
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(dest / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return len(weight_map)


def write_range_view(src: Checkpoint, dest: Path, start: int, stop: int) -> None:
    """A worker's checkpoint: decoder blocks [start, stop) renumbered from 0, and every tensor outside the
    decoder blocks, so that a worker loads nothing else."""
    _link_files(src.root, dest, weights=False)
    by_shard: dict[str, list[str]] = {}
    for name, shard in src.weight_map.items():
        layer = layer_index(name)
        if layer is None or start <= layer < stop:
            by_shard.setdefault(shard, []).append(name)
    _write_shards([(src.root / shard, names, -start) for shard, names in sorted(by_shard.items())], dest)
    _write_view_config(src.root, dest, start, stop)


def source_fingerprint(src: Checkpoint, recipe: Recipe, blocks: list[int]) -> str:
    """What a worker's (or the capture's) output depends on: the recipe's model and quantize sections (but
    not how many workers there are or run at once), the source files (names, sizes, mtimes) and its blocks
    (range or starts)."""
    return digest(
        [
            recipe.model.model_dump(mode="json"),
            recipe.quantize.model_dump(mode="json", exclude={"parallel", "workers_at_once"}),
            src.file_signature(),
            blocks,
        ]
    )


@dataclass
class Part:
    """A worker's share, blocks [start, stop); or, with index CAPTURE, the input capture, which runs the
    blocks before `stop - 1` and saves the inputs of the first block of every other worker."""

    index: int
    start: int
    stop: int
    device: str  # the CUDA_VISIBLE_DEVICES entry, or "cpu"
    root: Path
    inputs: Path | None = None  # the first block's inputs, saved by the capture (worker 0: none needed)

    @property
    def view(self) -> Path:
        return self.root / "source"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def run(self) -> RunDir:
        """The part's folder as a run folder: its `manifest.json` holds the `worker` stage record."""
        return RunDir(self.root)

    @property
    def log_path(self) -> Path:
        return self.root / "worker.log"

    def result(self) -> dict[str, Any] | None:
        try:
            return self.run.read_manifest()["stages"].get("worker")
        except (OSError, ReapError):
            return None

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"GPU {self.device}"
        if self.index == CAPTURE:
            return f"input capture ({where}, full-precision pass through blocks 0-{self.stop - 2})"
        return f"worker {self.index} ({where}, blocks {self.start}-{self.stop - 1})"


def plan_parts(run: RunDir, n_blocks: int, recipe: Recipe, gpus: list[str]) -> list[Part]:
    """The workers' ranges and devices: worker k on GPU k modulo the GPUs (so more workers than GPUs queue)."""
    root = run.root / PARALLEL_DIR
    return [
        Part(
            k,
            a,
            b,
            gpus[k % len(gpus)] if gpus else "cpu",
            root / f"part-{k}",
            inputs=root / "capture" / f"inputs-{a}.pt" if a else None,
        )
        for k, (a, b) in enumerate(split_blocks(n_blocks, recipe.quantize.parallel))
    ]


def plan_capture(parts: list[Part]) -> Part:
    """The capture runs on the last worker's device (that worker waits for it anyway), up to its first block."""
    last = parts[-1]
    return Part(CAPTURE, 0, last.start + 1, last.device, last.root.parent / "capture")


def _worker_env(part: Part, workers: int) -> dict[str, str]:
    """Each process sees its one GPU (or none) and a share of the cores: OpenMP threads oversubscribed by
    every worker make CPU workers crawl (measured), and likely slowed the GPU workers' loading too (4 H200
    workers on 64 cores took 57 s to load 2 blocks each, where a sequential build loads 8 in 26 s)."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        CUDA_VISIBLE_DEVICES="" if part.device == "cpu" else part.device,
    )


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


def _workers_at_once(recipe: Recipe, parts: list[Part]) -> int:
    """How many workers run at the same time: `quantize.workers_at_once`, else one per GPU (all on the CPU)."""
    devices = {p.device for p in parts}
    default = len(parts) if devices == {"cpu"} else len(devices)
    return min(recipe.quantize.workers_at_once or default, default)


class _Launcher:
    """Starts worker and capture processes (`python -m reap.parallel SPEC`, own session), at most one per
    GPU and `at_once` in all, and stops them all."""

    def __init__(
        self, src: Checkpoint, recipe: Recipe, at_once: int, fingerprints: dict[int, str], captures: list[Part]
    ):
        self.src, self.recipe, self.at_once = src, recipe, at_once
        self.fingerprints, self.captures = fingerprints, captures
        self.procs: dict[int, subprocess.Popen] = {}
        self.parts: dict[int, Part] = {}  # prepared: folder written anew (what an earlier attempt left is gone)
        self.started_at: dict[int, float] = {}
        self.t0 = time.time()

    def running(self) -> list[Part]:
        return [self.parts[i] for i, proc in self.procs.items() if proc.returncode is None]

    def free(self, part: Part) -> bool:
        """Whether `part` may start now: its GPU is free and fewer than `at_once` processes run (the capture
        counts as one)."""
        running = self.running()
        return len(running) < self.at_once and (part.device == "cpu" or part.device not in {p.device for p in running})

    def poll(self, results: dict[int, dict[str, Any]]) -> Part | None:
        """A process that has ended (its result put into `results`), or None."""
        for part in self.running():
            if self.procs[part.index].poll() is not None:
                self._collect(part, results)
                return part
        return None

    def prepare(self, part: Part) -> None:
        """Write the part's view and spec: just before it starts, or while the capture runs. A worker's view
        (its blocks, copied) is removed once it is done."""
        captures = self.captures
        self.parts[part.index] = part
        shutil.rmtree(part.root, ignore_errors=True)
        spec: dict[str, Any] = {
            "recipe": _worker_recipe(self.recipe, part),
            "view": str(part.view),
            "index": part.index,
            "device": part.device,
            "fingerprint": self.fingerprints[part.index],
            "log": str(part.log_path),
        }
        if part.index == CAPTURE:  # AutoRound gives block 0's inputs: its view ends after block 0
            write_view(self.src.root, part.view, 1)
            spec.update(
                source=str(self.src.root), starts=[p.start for p in captures], files=[str(p.inputs) for p in captures]
            )
        else:
            write_range_view(self.src, part.view, part.start, part.stop)
            spec.update(
                out=str(part.model), range=[part.start, part.stop], inputs=str(part.inputs) if part.inputs else None
            )
        atomic_write_text(part.root / "spec.json", json.dumps(spec, indent=2))

    def launch(self, part: Part) -> None:
        if part.index not in self.parts:
            self.prepare(part)
        log(f"{part.describe()}: started (log {part.log_path})")
        self.started_at[part.index] = time.time()
        with open(part.root / "stdout.log", "w") as out:
            self.procs[part.index] = procs.start_group(
                [sys.executable, "-m", "reap.parallel", str(part.root / "spec.json")],
                env=_worker_env(part, self.at_once),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _collect(self, part: Part, results: dict[int, dict[str, Any]]) -> None:
        """The ended process's result (a failure as one line naming it) goes into `results`."""
        proc = self.procs[part.index]
        procs.release(proc)
        res = part.result() or {}
        log(f"{part.describe()}: {res.get('status') or f'died (exit {proc.returncode})'}")
        if res.get("status") == "done":
            shutil.rmtree(part.view, ignore_errors=True)
        else:
            res = {
                "status": "failed",
                "error": f"{part.describe()} failed: "
                f"{res.get('error') or f'exit {proc.returncode}, no result written'}"
                f" (log: {part.log_path}, output: {part.root / 'stdout.log'})",
            }
        results[part.index] = res

    def stop_all(self) -> None:
        for proc in self.procs.values():
            procs.stop(proc, grace=10)


def _reusable(part: Part, fingerprint: str, outputs: list[Path]) -> bool:
    """A part of an earlier attempt is kept when done with the same inputs and its outputs are there;
    one still running (left by a parent killed with SIGKILL) is refused."""
    done = part.result() or {}
    if done.get("status") == "done" and done.get("fingerprint") == fingerprint and all(o.exists() for o in outputs):
        log(f"{part.describe()}: kept from an earlier attempt")
        return True
    if done.get("status") == "running" and _worker_alive(done.get("pid")):
        raise InputError(
            f"{part.describe()} of an earlier attempt is still running (pid {done['pid']}, "
            f"log {part.log_path}); wait for it to end or stop it, then re-run"
        )
    return False


def run_workers(
    src: Checkpoint, recipe: Recipe, parts: list[Part]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run the missing parts: the input capture (when a waiting worker needs it) beside the workers that
    need no inputs; each waiting worker starts once the capture has saved its inputs, as far as GPUs and
    `workers_at_once` allow. Returns every part's result and the capture's (None when not needed).
    A part already done with the same fingerprint is kept. Raises StageError naming each part that failed."""
    fingerprints = {p.index: source_fingerprint(src, recipe, [p.start, p.stop]) for p in parts}
    kept = {p.index for p in parts if _reusable(p, fingerprints[p.index], [p.model])}
    todo = [p for p in parts if p.index not in kept]
    capture, captures = plan_capture(parts), [p for p in parts if p.inputs]
    capture_fp = source_fingerprint(src, recipe, [p.start for p in captures])
    need_capture = any(p.inputs for p in todo) and not _reusable(capture, capture_fp, [p.inputs for p in captures])
    at_once = _workers_at_once(recipe, parts)
    launcher = _Launcher(src, recipe, at_once, {**fingerprints, CAPTURE: capture_fp}, captures)
    results: dict[int, dict[str, Any]] = {}
    try:
        if need_capture:
            launcher.launch(capture)
        waiting = [p for p in todo if need_capture and p.inputs]
        queue = [p for p in todo if p not in waiting] + waiting
        for part in queue:  # the views of the first waiting workers are written while the capture runs
            if part not in waiting and launcher.free(part):
                launcher.launch(part)
            elif part in waiting[:at_once]:
                launcher.prepare(part)
        queue = [p for p in queue if p.index not in launcher.procs]
        while launcher.running():
            done = launcher.poll(results)
            if done and done.index == CAPTURE and results[CAPTURE]["status"] != "done":
                queue = [p for p in queue if p not in waiting]  # they cannot start: the capture's error says why
            for part in list(queue):  # a waiting worker starts as soon as the capture has saved its inputs
                if (part not in waiting or part.inputs.is_file()) and launcher.free(part):
                    launcher.launch(part)
                    queue.remove(part)
            if not done:
                time.sleep(0.5)
    except BaseException:
        launcher.stop_all()
        raise
    failed = [res["error"] for res in results.values() if res["status"] != "done"]
    if failed:
        raise StageError("; ".join(failed) + "; finished ranges are kept, re-run the build to redo only the rest")
    for index, res in results.items():
        res.update(started_after_s=round(launcher.started_at[index] - launcher.t0, 3), kept=False)
    out = [results.get(p.index) or dict(p.result() or {}, kept=True) for p in parts]
    if captures and CAPTURE not in results:
        results[CAPTURE] = dict(capture.result() or {}, kept=True)
    return out, results.get(CAPTURE)


# --- merging -------------------------------------------------------------------------------------------


def merge_quantization_configs(configs: list[dict[str, Any]], parts: list[Part]) -> dict[str, Any]:
    """One config as a sequential build writes it: each worker's per-layer entries (`dynamic`,
    `extra_config`, ...) and module lists, numbered back to the blocks it had, joined."""
    merged = dict(configs[-1])
    for key, value in merged.items():
        if isinstance(value, dict):
            merged[key] = {
                shift_layer(k, part.start): v
                for cfg, part in zip(configs, parts, strict=False)
                for k, v in cfg.get(key, {}).items()
            }
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            names = {
                shift_layer(n, part.start)
                for cfg, part in zip(configs, parts, strict=False)
                for group in cfg.get(key) or []
                for n in group
            }
            merged[key] = [sorted(names)]
    return merged


def merge_parts(parts: list[Part], dest: Path, src_config: dict[str, Any]) -> dict[str, Any]:
    """Write the merged checkpoint into `dest`: each worker's blocks numbered back, the rest from the last
    worker, whose config gets back what its view changed (`VIEW_KEYS`, from the source's `src_config`)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    last = parts[-1]
    sources = [Checkpoint.open(p.model) for p in parts]
    jobs: list[tuple[Path, list[str], int]] = []  # (source shard, tensor names taken from it, block offset)
    for part, ckpt in zip(parts, sources, strict=False):
        by_shard: dict[str, list[str]] = {}
        for name, shard in ckpt.weight_map.items():
            if part is last or layer_index(name) is not None:
                by_shard.setdefault(shard, []).append(name)
        jobs += [(part.model / shard, names, part.start) for shard, names in sorted(by_shard.items())]
    tensors = _write_shards(jobs, dest)
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
    return {"tensors": tensors, "shards": len(jobs)}


# --- the build stage's entry -----------------------------------------------------------------------------


def quantize_parallel(
    src: Checkpoint, recipe: Recipe, work: Path, run: RunDir, clock: Clock, sampler: ResourceSampler
) -> dict[str, Any]:
    """Run the workers, merge their checkpoints into `work`; returns what `engine.quantize` returns, plus
    the per-worker record (each worker's peak GPU memory from the build's `sampler`, which NVML numbers as
    CUDA does by default)."""
    gpus, _ = gpus_for(recipe)
    n_blocks = int(src.text_config["num_hidden_layers"])
    parts = plan_parts(run, n_blocks, recipe, gpus)
    log(f"{len(parts)} workers: " + ", ".join(p.describe() for p in parts))
    with clock.span("parallel_quantization"):
        results, captured = run_workers(src, recipe, parts)
    with clock.span("merge"):
        merged = merge_parts(parts, work, src.config)
    sampler.sample()
    peak_vram = sampler.summary()["peak_vram_gb"] or {}
    blocks, workers = [], []
    for part, res in zip(parts, results, strict=False):
        blocks += [dict(b, index=b["index"] + part.start, worker=part.index) for b in res["blocks"]]
        workers.append(
            {
                "index": part.index,
                "device": part.device,
                "blocks": [part.start, part.stop - 1],
                "wall_s": res["wall_s"],
                "started_after_s": res.get("started_after_s"),
                "block_wall_s": [b["wall_s"] for b in res["blocks"]],
                "substages": res["substages"],
                "peak_rss_gb": res["peak_rss_gb"],
                "peak_vram_gb": peak_vram.get(part.device),
                "kept_from_earlier_attempt": res["kept"],
                "log": str(part.log_path),
            }
        )
    capture = None
    if captured:
        cap = plan_capture(parts)
        capture = {
            "device": cap.device,
            "forward_blocks": [0, cap.stop - 2],
            "wall_s": captured["wall_s"],
            "substages": captured["substages"],
            "peak_rss_gb": captured["peak_rss_gb"],
            "kept_from_earlier_attempt": captured["kept"],
            "log": str(cap.log_path),
        }
    kept = engine.keep_16bit_layers(src, recipe)
    return {
        "blocks": blocks,
        "fixes_applied": sorted({f for r in results for f in r["fixes_applied"]}),
        "autoround_summary": _merged_summary(results, blocks),
        "kept_16bit_requested": sorted(set(kept.values())),
        "layer_config_16bit": len(kept),
        "expert_tuning": engine.expert_tuning(
            recipe,
            [
                {k.removeprefix("stacked_"): v for k, v in r.get("expert_tuning", {}).items() if k != "path"}
                for r in results
            ],
        ),
        "parallel": {"workers": workers, "input_capture": capture, "merged": merged},
    }


def _merged_summary(results: list[dict[str, Any]], blocks: list[dict[str, Any]]) -> dict[str, int] | None:
    """AutoRound's "quantized N/M layers in the model" for the merged model: every view has the layers
    outside the blocks (counted once, from the last worker) and its own blocks."""
    summaries = [r.get("autoround_summary") for r in results]
    if not all(summaries):
        return None
    outside = summaries[-1]["total"] - sum(b["total"] for b in results[-1]["blocks"])
    return {"quantized": sum(s["quantized"] for s in summaries), "total": sum(b["total"] for b in blocks) + outside}


def finish(run: RunDir) -> None:
    """The merged checkpoint is in place: the workers' outputs are no longer needed."""
    shutil.rmtree(run.root / PARALLEL_DIR, ignore_errors=True)


def capture_inputs(
    src: Checkpoint, view: Checkpoint, recipe: Recipe, starts: list[int], files: list[Path], logfile: Path, clock: Clock
) -> dict[str, Any]:
    """The input capture. Block 0's inputs come from AutoRound's calibration pass over `view` (the source cut
    after block 0: its embedding and first block), so they are exactly what a sequential build tunes on;
    then the blocks before the last start run in full precision one at a time, each streamed from the
    source's shards (`reap prune`'s loader) and dropped after, on the GPU when there is one; the inputs of
    each block in `starts` go to its file in `files`. Host RAM: one block and the activations."""
    import torch

    fixes: list[str] = []
    first = files[0].with_name("inputs-0.pt")
    unused = files[0].parent / "autoround-output"  # AutoRound is stopped before it writes anything
    kept = engine.keep_16bit_layers(view, recipe)
    with engine.autoround_session(view, recipe, kept, logfile, clock, fixes) as (ar, _, _):
        with clock.span("calibration_caching"), compat.autoround_captures_block_inputs(first):
            ar.quantize_and_save(str(unused), format=recipe.quantize.format)
    shutil.rmtree(unused, ignore_errors=True)
    from auto_round.utils import to_device  # importable once autoround_session made torchvision so

    if not first.is_file():
        raise StageError(f"AutoRound's calibration pass ended without caching block 0's inputs (log: {logfile})")
    saved = torch.load(first, weights_only=True)
    hidden = list(saved["inputs"]["hidden_states"])
    others = {k: v for k, v in saved["inputs"].items() if k not in ("hidden_states", "positional_inputs")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout, config = moe_layout(src), text_config(src)
    with clock.span("forward"), torch.inference_mode():
        for i in range(max(starts)):
            # in the dtype AutoRound cached the inputs in: bf16, or float32 where this CPU has no bf16 support
            # ("amp is set to FALSE"; AVX2-only CPUs), as the sequential build runs its blocks
            layer = decoder_layer(src, layout, config, i, device).to(hidden[0].dtype)
            for j, h in enumerate(hidden):  # one sample at a time, with its own keyword arguments, as AutoRound
                kwargs = {k: to_device(v[j] if isinstance(v, list) else v, device) for k, v in others.items()}
                out = layer(h.to(device), **kwargs)
                hidden[j] = (out[0] if isinstance(out, tuple) else out).to("cpu")
            del layer
            if i + 1 in starts:
                file = files[starts.index(i + 1)]
                tmp = file.with_name(file.name + ".tmp")
                torch.save(dict(saved, inputs=dict(saved["inputs"], hidden_states=hidden)), tmp)
                tmp.replace(file)
    return {"fixes_applied": fixes, "device": device}


def worker_main(spec_path: Path) -> int:
    """One worker (quantize its range view with AutoRound) or the input capture, as the `worker` stage of its
    part folder. SIGTERM (the parent stopping it) marks it interrupted; exit code 1 unless done."""
    spec = json.loads(spec_path.read_text())
    clock = Clock()
    try:
        with RunDir(spec_path.parent).stage(
            "worker", fingerprint=spec["fingerprint"], pid=os.getpid(), device=spec["device"]
        ) as rec:
            recipe = Recipe.model_validate(spec["recipe"])
            view, logfile = Checkpoint.open(Path(spec["view"])), Path(spec["log"])
            if spec["index"] == CAPTURE:
                out = capture_inputs(
                    Checkpoint.open(Path(spec["source"])),
                    view,
                    recipe,
                    spec["starts"],
                    [Path(f) for f in spec["files"]],
                    logfile,
                    clock,
                )
            else:
                out = engine.quantize(
                    view,
                    recipe,
                    Path(spec["out"]),
                    logfile,
                    clock,
                    block_inputs=Path(spec["inputs"]) if spec["inputs"] else None,
                )
            rec.update(out, substages=clock.spans)
    except (Exception, KeyboardInterrupt):  # recorded in one line by the stage; the parent reports it
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1])))
