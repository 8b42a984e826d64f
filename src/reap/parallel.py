"""Block-parallel AutoRound: `reap build --gpus N` (recipe `quantize.parallel: N`), one torch.distributed job.

The decoder blocks are split into N contiguous ranges, sized by the cost model (reap.costmodel) so that all
ranges finish together. The ranges are quantized by the ranks of one torch.distributed job (gloo: what the
ranks hand on lives in host memory), one process per GPU (on a host without GPUs, CPU processes sharing the
cores), launched by reap on one host, or by `reap build --nodes H --node-rank I --master ADDR:PORT` on each
of several hosts that share the source and the run folder. With fewer ranks than ranges (more ranges than
GPUs, or `quantize.workers_at_once`) rank r takes ranges r, r + W, ... in turn.

Each range is quantized by real AutoRound on a *range view* (its blocks renumbered from 0 beside the
source's other tensors, written by the rank itself while the other ranks start). Its first block's inputs
are the full-precision hidden states of the calibration set: range 0 gets them from AutoRound's
calibration pass; every rank, as soon as it has its range's inputs, runs its blocks once in full
precision (streamed from the shards) and sends the result to the rank of the next range before it starts
tuning, so no process loads earlier blocks only to compute later ranges' inputs. Inside a range the
quantized outputs feed the next block, exactly as in a sequential build. `merge_parts` numbers the blocks
back and joins the quantization configs into the layout of a sequential build; the usual gates then run.

A finished range is kept (the `worker` stage record in the part's own `manifest.json`, with a fingerprint
of its inputs), and so are the inputs handed on (`inputs-N.pt`): a re-run after a failure, a killed rank
or Ctrl-C redoes only what is missing. `python -m reap.parallel JOB.json` is a rank's entry point; it
reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment, as torchrun sets them.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from reap import compat, costmodel, engine, procs, samples
from reap.checkpoint import Checkpoint, layer_index, read_header_and_offset, shift_layer
from reap.errors import InputError, ReapError, StageError
from reap.prune import decoder_layer, moe_layout, text_config
from reap.recipe import Recipe
from reap.rundir import RunDir, atomic_write_text, digest
from reap.stats import GB, Clock, ResourceSampler, gpu_inventory, log, visible_gpu_ids

PARALLEL_DIR = ".parallel"
# Bytes of GPU memory per parameter of the largest block while AutoRound tunes it (weights, their fp32
# rounding parameters and gradients); measured: a 3.5 B-parameter block of the 212B model's width took
# 67-70 GB at iters 200 on an H100 (issue #8) and 85 GB NVML peak at iters 20 on an H200. RTN needs far less.
TUNE_BYTES_PER_PARAM, RTN_BYTES_PER_PARAM = 20, 4
# How long a rank waits for its inputs or the others: the longest full-precision pass and tuning of a range;
# a rank that dies is noticed at once (gloo: "connection closed by peer"), not after this.
RANK_TIMEOUT = datetime.timedelta(hours=12)


def split_blocks(n_blocks: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges [start, stop) of equal size, the earlier ones taking the remainder."""
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


def params_per_block(src: Checkpoint) -> list[int]:
    """Parameters of each decoder block of the source (from the shard headers), by block index."""
    sizes = [0] * int(src.text_config.get("num_hidden_layers", 0))
    for name, info in src.tensors.items():
        i = layer_index(name)
        if i is not None and i < len(sizes):
            sizes[i] += math.prod(info.shape)
    return sizes


def block_params(src: Checkpoint) -> int:
    """Parameters of the largest decoder block of the source."""
    return max(params_per_block(src), default=0)


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
    visible GPUs queues its ranges.)"""
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


# --- the ranges' checkpoints ---------------------------------------------------------------------------

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


def _link_files(src: Path, dest: Path) -> None:
    """`dest` anew, with links to the files of `src` but its config and its weights."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in src.iterdir():
        is_weights = f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json"
        if f.name != "config.json" and not is_weights:
            (dest / f.name).symlink_to(f.resolve())


def _copy_tensors(shard: Path, names: list[str], offset: int, out: Path) -> int:
    """Write the tensors `names` of the safetensors file `shard` into the new file `out`, block numbers moved
    by `offset`: a new header, then each tensor's bytes copied file to file by the kernel (copy_file_range),
    never decoded into memory. Returns the bytes of tensor data written."""
    header, data_start = read_header_and_offset(shard)
    ordered = sorted(names, key=lambda n: header[n]["data_offsets"][0])  # file order: sequential reads
    entries, position = {}, 0
    for name in ordered:
        begin, end = header[name]["data_offsets"]
        entries[shift_layer(name, offset)] = dict(header[name], data_offsets=[position, position + end - begin])
        position += end - begin
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(shard, "rb") as src, open(out, "wb") as dst:
        dst.write(struct.pack("<Q", len(text)) + text)
        dst.flush()  # the kernel copies after it, at the descriptor's position
        for name in ordered:
            begin, end = header[name]["data_offsets"]
            left, at = end - begin, data_start + begin
            while left:
                done = os.copy_file_range(src.fileno(), dst.fileno(), left, at)
                if not done:
                    raise OSError(f"{shard} ended before tensor {name}'s data; rebuild it")
                left, at = left - done, at + done
    return position


def _write_shards(jobs: list[tuple[Path, list[str], int]], dest: Path) -> int:
    """Copy tensors into `dest`, one output file per (source file, tensor names, block offset) job, the block
    numbers moved by the offset: `model.safetensors`, or numbered shards and their index. Returns the number
    of tensors written."""
    weight_map, total = {}, 0
    single = len(jobs) == 1
    for i, (shard, names, offset) in enumerate(jobs, 1):
        out_name = "model.safetensors" if single else f"model-{i:05d}-of-{len(jobs):05d}.safetensors"
        total += _copy_tensors(shard, names, offset, dest / out_name)
        weight_map.update(dict.fromkeys((shift_layer(n, offset) for n in names), out_name))
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(dest / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return len(weight_map)


def write_range_view(src: Checkpoint, dest: Path, start: int, stop: int) -> None:
    """A range's checkpoint: decoder blocks [start, stop) renumbered from 0, and every tensor outside the
    decoder blocks, so that its rank loads nothing else. (A rename at load time instead of the copy does not
    reach AutoRound 0.16.1: with low_cpu_mem_usage it reads each block's weights by name from the folder's
    shards itself; measured: the source's block 0 tuned in place of the range's first block.)"""
    _link_files(src.root, dest)
    by_shard: dict[str, list[str]] = {}
    for name, shard in src.weight_map.items():
        layer = layer_index(name)
        if layer is None or start <= layer < stop:
            by_shard.setdefault(shard, []).append(name)
    _write_shards([(src.root / shard, names, -start) for shard, names in sorted(by_shard.items())], dest)
    _write_view_config(src.root, dest, start, stop)


def source_fingerprint(src: Checkpoint, recipe: Recipe, blocks: list[int]) -> str:
    """What a range's output (or the inputs handed to a block) depends on: the recipe's model and quantize
    sections (but not how many workers there are or run at once), the source files (names, sizes, mtimes)
    and its blocks."""
    return digest(
        [
            recipe.model.model_dump(mode="json"),
            recipe.quantize.model_dump(mode="json", exclude={"parallel", "workers_at_once"}),
            src.file_signature(),
            blocks,
        ]
    )


@dataclass(frozen=True)
class Topology:
    """Where the ranks run: `nodes` hosts, this one `node_rank`; rank 0 (on node 0) listens at
    `master_addr:master_port` for the others to join (torch.distributed's env:// rendezvous)."""

    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port of this host (one host only)


@dataclass
class Part:
    """One range, blocks [start, stop), quantized by rank `rank`. Its inputs come from AutoRound's calibration
    pass (range 0), from the rank of the range before it ("recv"), or from the file an earlier attempt or the
    same rank saved ("file"). With `forward` it runs its blocks in full precision for the next range and, with
    `send`, hands the result to that range's rank."""

    index: int
    start: int
    stop: int
    rank: int
    device: str  # the CUDA_VISIBLE_DEVICES entry, or "cpu"
    root: Path
    fingerprint: str
    inputs_fingerprint: str  # of the full-precision inputs of block `start` (what `inputs_file` must hold)
    inputs: str = "calibration"  # "calibration" | "recv" | "file"
    forward: bool = False
    send: bool = False
    kept: bool = False

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

    @property
    def inputs_file(self) -> Path:
        return self.root.parent / f"inputs-{self.start}.pt"

    @property
    def outputs_file(self) -> Path:
        return self.root.parent / f"inputs-{self.stop}.pt"

    def result(self) -> dict[str, Any] | None:
        try:
            return self.run.read_manifest()["stages"].get("worker")
        except (OSError, ReapError):
            return None

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"GPU {self.device}"
        return f"worker {self.index} (rank {self.rank}, {where}, blocks {self.start}-{self.stop - 1})"

    def spec(self) -> dict[str, Any]:
        return dict(asdict(self), root=str(self.root))


def handed_inputs_valid(file: Path, fingerprint: str) -> bool:
    """Whether `file` holds the full-precision inputs of its block for this source and recipe (its sidecar
    `.json` names the fingerprint; it is written after the tensors)."""
    try:
        return file.is_file() and json.loads(file.with_suffix(".json").read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def ranks_at_once(recipe: Recipe, gpus: list[str], topology: Topology) -> int:
    """How many ranks run together: `quantize.workers_at_once`, else one per GPU of every host (all ranges at
    once on CPUs); never more than the ranges."""
    n = recipe.quantize.parallel
    default = n if not gpus else len(gpus) * topology.nodes
    return min(recipe.quantize.workers_at_once or default, default, n)


def plan_ranges(src: Checkpoint, recipe: Recipe, ranks: int, device: str) -> list[tuple[int, int]]:
    """The ranges: from the cost model when every range has its own rank, else equal ones (ranges that queue
    on a rank start one after the other anyway)."""
    n, blocks = recipe.quantize.parallel, params_per_block(src)
    if ranks < n:
        return split_blocks(len(blocks), n)
    q = recipe.quantize
    costs = costmodel.costs_for(device)
    return costmodel.plan_ranges([p / 1e9 for p in blocks], n, costs, q.iters, q.nsamples * q.seqlen)


def plan_parts(root: Path, src: Checkpoint, recipe: Recipe, gpus: list[str], topology: Topology) -> list[Part]:
    """Every range with its rank and device, and from what an earlier attempt left in `root`: which ranges
    are kept, where each range's inputs come from, which ranges run their blocks in full precision for the
    next. Every host computes the same plan from the shared run folder (the ranks check it)."""
    world = ranks_at_once(recipe, gpus, topology)
    if world % topology.nodes:
        raise InputError(
            f"{world} ranks do not divide among {topology.nodes} hosts; give each host the same number of GPUs "
            "(or set quantize.parallel / quantize.workers_at_once to a multiple of --nodes)"
        )
    per_node = world // topology.nodes
    device_kind = gpus[0] if gpus else "cpu"
    ranges = plan_ranges(src, recipe, world, device_kind)
    parts = []
    for k, (a, b) in enumerate(ranges):
        rank = k % world
        device = gpus[(rank % per_node) % len(gpus)] if gpus else "cpu"
        fingerprints = source_fingerprint(src, recipe, [a, b]), source_fingerprint(src, recipe, [a])
        parts.append(Part(k, a, b, rank, device, root / f"part-{k}", *fingerprints))
    valid = {p.start for p in parts if p.start and handed_inputs_valid(p.inputs_file, p.inputs_fingerprint)}
    for k, part in enumerate(parts):
        done = part.result() or {}
        part.kept = (
            done.get("status") == "done"
            and done.get("fingerprint") == part.fingerprint
            and part.model.is_dir()
            and (k == len(parts) - 1 or parts[k + 1].start in valid)
        )
    for k, part in enumerate(parts):
        if k and not part.kept:
            part.inputs = "file" if part.start in valid or parts[k - 1].rank == part.rank else "recv"
    for k, part in enumerate(parts):
        nxt = parts[k + 1] if k + 1 < len(parts) else None
        part.forward = bool(nxt and not nxt.kept and nxt.start not in valid)
        part.send = bool(part.forward and nxt and nxt.inputs == "recv")
    return parts


def node_of(rank: int, world: int, topology: Topology) -> int:
    return rank // (world // topology.nodes)


# --- a rank ---------------------------------------------------------------------------------------------


def _send(obj: Any, dst: int) -> list[Any]:
    """Hand `obj` (tensors and plain values) to rank `dst` without waiting for it: its size, then its bytes.
    Returns what must stay alive until the sends complete (their works first)."""
    import torch
    import torch.distributed as dist

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    return [dist.isend(size, dst), dist.isend(data, dst), size, data]


def _in_background(call: Any) -> Any:
    """`call()` (a blocking torch.distributed operation) in a thread while this one waits in Python, so that
    SIGTERM and Ctrl-C are taken meanwhile (a blocking gloo call holds them off until it returns, and its
    asynchronous works do not report completion before `wait`); its result is returned, its failure raised."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # handed to the waiting thread
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _recv(src: int) -> Any:
    import torch
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64)
    _in_background(lambda: dist.recv(size, src))
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    _in_background(lambda: dist.recv(data, src))
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


def full_precision_pass(src: Checkpoint, saved: dict[str, Any], start: int, stop: int) -> list[Any]:
    """The hidden states after blocks [start, stop) in full precision, from the inputs of block `start`
    (`saved`, as AutoRound caches them: per-sample hidden states and keyword arguments). Each block is streamed
    from the source's shards (`reap prune`'s loader), run on the GPU when there is one, and dropped after, in
    the dtype AutoRound cached the inputs in (float32 where this CPU has no bf16 support). The samples run as
    one batch when they have one shape and the same keyword arguments (calibration samples of one length):
    measured on an H200 at the 212B width, 0.5-0.8 s a block against 6.4-13 s one sample at a time, the same
    values up to rounding; otherwise one at a time with their own keyword arguments, as AutoRound runs them."""
    import torch
    from auto_round.utils import to_device

    hidden = list(saved["inputs"]["hidden_states"])
    others = {k: v for k, v in saved["inputs"].items() if k not in ("hidden_states", "positional_inputs")}
    per_sample = {k: v if isinstance(v, list) else [v] * len(hidden) for k, v in others.items()}
    batched = samples.batchable(hidden, per_sample)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout, config = moe_layout(src), text_config(src)
    with torch.inference_mode():
        for i in range(start, stop):
            layer = decoder_layer(src, layout, config, i, device).to(hidden[0].dtype)
            if batched:
                kwargs = {k: samples.repeated(to_device(v[0], device), len(hidden)) for k, v in per_sample.items()}
                out = layer(torch.cat(hidden).to(device), **kwargs)
                hidden = [h.clone() for h in (out[0] if isinstance(out, tuple) else out).to("cpu").split(1)]
            else:
                for j, h in enumerate(hidden):
                    kwargs = {k: to_device(v[j], device) for k, v in per_sample.items()}
                    out = layer(h.to(device), **kwargs)
                    hidden[j] = (out[0] if isinstance(out, tuple) else out).to("cpu")
            del layer
    return hidden


class _BlockInputsTaken(Exception):
    """Stops AutoRound once it has cached block 0's inputs (`calibration_inputs`)."""


def calibration_inputs(src: Checkpoint, recipe: Recipe, work: Path) -> dict[str, Any]:
    """Block 0's inputs in the form a range hands them on, from AutoRound's own calibration pass over `src`
    with the recipe's settings, AutoRound stopped right after (a range view of block 0 is written into
    `work`): what checks and profiles of the full-precision pass start from."""
    write_range_view(src, work / "view", 0, 1)
    view, saved = Checkpoint.open(work / "view"), {}

    def handed(inputs: dict[str, Any]) -> None:
        saved.update(inputs)
        raise _BlockInputsTaken

    kept = engine.keep_16bit_layers(view, recipe)
    try:
        with engine.autoround_session(view, recipe, kept, work / "autoround.log", Clock(), []) as (ar, _, _):
            with compat.autoround_block_inputs(lambda: None, handed):
                ar.quantize_and_save(str(work / "unused"), format=recipe.quantize.format)
    except StageError:  # the session reports the stop as AutoRound's failure; any other failure left no inputs
        if not saved:
            raise
    return saved


class _Handoff:
    """A part's first block's inputs (`provide`: None for AutoRound's own calibration pass) and what it hands
    on once it has them (`handed`: the full-precision pass through its blocks, sent to the next range's rank
    and saved for a re-run), as `compat.autoround_block_inputs` calls them."""

    def __init__(self, part: Part, parts: list[Part], src: Checkpoint, clock: Clock):
        self.part, self.src, self.clock = part, src, clock
        self.prev = parts[part.index - 1] if part.index else None
        self.next = parts[part.index + 1] if part.index + 1 < len(parts) else None
        self.pending: list[Any] = []
        self.inputs_at: float | None = None

    def provide(self) -> dict[str, Any] | None:
        import torch

        if self.part.inputs == "calibration":
            return None
        t0 = time.time()
        try:
            if self.part.inputs == "file":
                return torch.load(self.part.inputs_file, weights_only=True)
            try:
                return _recv(self.prev.rank)
            except RuntimeError as exc:  # gloo: "Connection closed by peer": that rank's process ended
                raise StageError(
                    f"its inputs from {self.prev.describe()} did not arrive: that rank stopped "
                    f"({str(exc).splitlines()[0][:120]}; its log: {self.prev.log_path})"
                ) from None
        finally:
            self.clock.spans["waiting_for_inputs"] = round(time.time() - t0, 3)

    def handed(self, saved: dict[str, Any]) -> None:
        self.inputs_at = time.time()
        if not self.part.forward:
            return
        import torch

        with self.clock.span("full_precision_pass"):
            hidden = full_precision_pass(self.src, saved, self.part.start, self.part.stop)
        out = dict(saved, inputs=dict(saved["inputs"], hidden_states=hidden))
        if self.part.send:
            self.pending = _send(out, self.next.rank)
        file = self.part.outputs_file
        tmp = file.with_name(file.name + ".tmp")
        torch.save(out, tmp)
        tmp.replace(file)
        sidecar = {"fingerprint": self.next.inputs_fingerprint, "by": self.part.describe()}
        atomic_write_text(file.with_suffix(".json"), json.dumps(sidecar) + "\n")

    def wait(self) -> None:
        """The sends have reached the next rank (or failed: then that rank reports it)."""
        for work in self.pending[:2]:
            with contextlib.suppress(RuntimeError):
                work.wait()
        self.pending = []


def _part_recipe(recipe: Recipe, part: Part) -> Recipe:
    """The recipe a range runs: the build's, on its rank's one device (a GPU rank sees only its GPU, as 0)."""
    data = recipe.model_dump(mode="json")
    data["quantize"]["device_map"] = "cpu" if part.device == "cpu" else 0
    return Recipe.model_validate(data)


def run_part(part: Part, parts: list[Part], src: Checkpoint, recipe: Recipe, job: dict[str, Any]) -> bool:
    """Quantize one range as the `worker` stage of its part folder; False when it did not end done (the
    stage recorded why in one line)."""
    clock = Clock()
    handoff = _Handoff(part, parts, src, clock)
    started = time.time()
    try:
        shutil.rmtree(part.root, ignore_errors=True)
        part.root.mkdir(parents=True)
        with part.run.stage(
            "worker",
            fingerprint=part.fingerprint,
            pid=os.getpid(),
            host=socket.gethostname(),
            rank=part.rank,
            device=part.device,
        ) as rec:
            with clock.span("range_view"):
                write_range_view(src, part.view, part.start, part.stop)
            with compat.autoround_without_ddp() as no_ddp:
                out = engine.quantize(
                    Checkpoint.open(part.view), _part_recipe(recipe, part), part.model, part.log_path, clock, handoff
                )
            if no_ddp:
                out["fixes_applied"].append("autoround_without_ddp")
            shutil.rmtree(part.view, ignore_errors=True)
            rec.update(
                out,
                substages=clock.spans,
                started_after_s=round(started - job["t0"], 3),
                inputs_after_s=round(handoff.inputs_at - job["t0"], 3) if handoff.inputs_at else None,
                finished_after_s=round(time.time() - job["t0"], 3),
            )
    except (Exception, KeyboardInterrupt):  # recorded in one line by the stage; the launcher reports it
        return False
    finally:
        handoff.wait()
    return True


def rank_main(job_path: Path) -> int:
    """One rank of the job: join the others (torch.distributed, gloo, env:// rendezvous), check that every
    host planned the same, quantize this rank's ranges in turn, then wait for all ranks. Exit 1 unless every
    range of this rank is done."""
    import torch.distributed as dist

    job = json.loads(job_path.read_text())
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=RANK_TIMEOUT)
    plans: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(plans, job["digest"])
    recipe = Recipe.model_validate(job["recipe"])
    src = Checkpoint.open(Path(job["source"]))
    parts = [Part(**dict(p, root=Path(p["root"]))) for p in job["parts"]]
    ok = True
    if len(set(plans)) > 1:
        log(f"rank {rank}: the hosts planned different ranges (a run folder changed while they started); stopping")
        ok = False
    for part in (p for p in parts if p.rank == rank and not p.kept):
        ok = ok and run_part(part, parts, src, recipe, job)
    try:  # rank 0's host merges once every rank is done; a rank that died ends this at once
        _in_background(dist.barrier)
    except RuntimeError:
        ok = False
    dist.destroy_process_group()
    return 0 if ok else 1


# --- the launcher (one per host) -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, local: int, local_ranks: int, device: str, master: tuple[str, int]) -> dict:
    """torchrun's variables, the rank's one GPU (or none), and a share of the cores: OpenMP threads
    oversubscribed by every worker make CPU workers crawl (measured), and slowed GPU workers' loading too."""
    threads = str(max(1, (os.cpu_count() or 1) // local_ranks))
    return dict(
        os.environ,
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local),
        LOCAL_WORLD_SIZE=str(local_ranks),
        MASTER_ADDR=master[0],
        MASTER_PORT=str(master[1]),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        CUDA_VISIBLE_DEVICES="" if device == "cpu" else device,
    )


def _alive(pid: int | None) -> bool:
    """Whether `pid` is a reap rank still running on this host (a launcher killed with SIGKILL leaves its
    ranks behind)."""
    try:
        return pid is not None and "reap.parallel" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _refuse_running(parts: list[Part]) -> None:
    """A range that an earlier attempt's rank is still quantizing on this host is not started twice."""
    for part in parts:
        done = part.result() or {}
        if done.get("status") == "running" and done.get("host") == socket.gethostname() and _alive(done.get("pid")):
            raise InputError(
                f"{part.describe()} of an earlier attempt is still running (pid {done['pid']}, "
                f"log {part.log_path}); wait for it to end or stop it, then re-run"
            )


def run_ranks(src: Checkpoint, recipe: Recipe, root: Path, gpus: list[str], topology: Topology) -> list[Part]:
    """Plan the ranges, start this host's ranks, wait for them. Returns the parts. Raises
    StageError naming every range of the job that is not done (when this host is node 0, or for this host's
    own ranges on the others)."""
    root.mkdir(parents=True, exist_ok=True)
    parts = plan_parts(root, src, recipe, gpus, topology)
    _refuse_running([p for p in parts if not p.kept])
    world = ranks_at_once(recipe, gpus, topology)
    master = (topology.master_addr, topology.master_port or _free_port())
    plan = [(p.start, p.stop, p.rank, p.kept, p.inputs, p.forward, p.send) for p in parts]
    job = {
        "recipe": recipe.model_dump(mode="json"),
        "source": str(src.root),
        "parts": [p.spec() for p in parts],
        "digest": digest(plan),
        "t0": time.time(),
    }
    job_path = root / f"job-node{topology.node_rank}.json"
    atomic_write_text(job_path, json.dumps(job, indent=2))
    for p in parts:
        if p.kept:
            log(f"{p.describe()}: kept from an earlier attempt")
    local = [r for r in range(world) if node_of(r, world, topology) == topology.node_rank]
    ranks: dict[int, subprocess.Popen] = {}
    try:
        for i, r in enumerate(local):
            device = next((p.device for p in parts if p.rank == r), "cpu")
            mine = [p for p in parts if p.rank == r and not p.kept]
            log(f"rank {r}: " + (", ".join(p.describe() for p in mine) or "nothing left to do"))
            with open(root / f"rank-{r}.log", "w") as out:
                ranks[r] = procs.start_group(
                    [sys.executable, "-m", "reap.parallel", str(job_path)],
                    env=_rank_env(r, world, i, len(local), device, master),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        while any(p.poll() is None for p in ranks.values()):
            time.sleep(0.5)
    except BaseException:
        for proc in ranks.values():
            procs.stop(proc, grace=10)
        raise
    for proc in ranks.values():
        procs.release(proc)
    mine = parts if topology.node_rank == 0 else [p for p in parts if p.rank in ranks]

    def done(part: Part) -> bool:
        # a rank that exits 0 finished all its ranges (and met every other rank at the end): on hosts other than
        # node 0 this is what counts, since node 0 may already have merged and removed the part records
        rank = ranks.get(part.rank)
        return part.kept or (rank is not None and rank.returncode == 0) or (part.result() or {}).get("status") == "done"

    failed = [_why_not_done(p, ranks) for p in mine if not done(p)]
    if failed:
        raise StageError("; ".join(failed) + "; finished ranges are kept, re-run the build to redo only the rest")
    return parts


def _why_not_done(part: Part, ranks: dict[int, subprocess.Popen]) -> str:
    res = part.result() or {}
    proc = ranks.get(part.rank)
    code = f"exit {proc.returncode}" if proc is not None and proc.returncode is not None else "on another host"
    if res.get("status") in ("failed", "interrupted"):
        why = res.get("error") or res["status"]
    elif res.get("status") == "running":
        why = f"its rank died while on it ({code}, no result written)"
    else:
        why = f"not started: its rank stopped before it ({code})"
    log_hint = part.log_path if part.log_path.exists() else part.root.parent / f"rank-{part.rank}.log"
    return f"{part.describe()} failed: {why} (log: {log_hint})"


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
    src: Checkpoint,
    recipe: Recipe,
    work: Path,
    run: RunDir,
    clock: Clock,
    sampler: ResourceSampler,
    topology: Topology = Topology(),
) -> dict[str, Any]:
    """Run the job (this host's ranks), merge the ranges' checkpoints into `work`; returns what
    `engine.quantize` returns, plus the per-range record (each local rank's peak GPU memory from the build's
    `sampler`, which NVML numbers as CUDA does by default) and the cost model's prediction beside it."""
    gpus, _ = gpus_for(recipe)
    with clock.span("parallel_quantization"):
        parts = run_ranks(src, recipe, run.root / PARALLEL_DIR, gpus, topology)
    with clock.span("merge"):
        merged = merge_parts(parts, work, src.config)
    sampler.sample()
    peak_vram = sampler.summary()["peak_vram_gb"] or {}
    results = [p.result() or {} for p in parts]
    q = recipe.quantize
    ranges = [(p.start, p.stop) for p in parts]
    sizes = [b / 1e9 for b in params_per_block(src)]
    predicted = costmodel.simulate(ranges, sizes, costmodel.costs_for(parts[0].device), q.iters, q.nsamples * q.seqlen)
    blocks, workers = [], []
    for part, res, guess in zip(parts, results, predicted, strict=True):
        blocks += [dict(b, index=b["index"] + part.start, worker=part.index) for b in res["blocks"]]
        workers.append(
            {
                "index": part.index,
                "rank": part.rank,
                "host": res.get("host"),
                "device": part.device,
                "blocks": [part.start, part.stop - 1],
                "inputs": part.inputs,
                "wall_s": res["wall_s"],
                "started_after_s": res.get("started_after_s"),
                "inputs_after_s": res.get("inputs_after_s"),
                "finished_after_s": res.get("finished_after_s"),
                "predicted": guess.record(),
                "block_wall_s": [b["wall_s"] for b in res["blocks"]],
                "substages": res["substages"],
                "peak_rss_gb": res["peak_rss_gb"],
                "peak_vram_gb": peak_vram.get(part.device) if res.get("host") == socket.gethostname() else None,
                "kept_from_earlier_attempt": part.kept,
                "log": str(part.log_path),
            }
        )
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
        "parallel": {
            "engine": "torch.distributed (gloo)",
            "ranks": ranks_at_once(recipe, gpus, topology),
            "nodes": topology.nodes,
            "workers": workers,
            "predicted_wall_s": round(max(g.finish_s for g in predicted), 1),
            "merged": merged,
        },
    }


def join(src: Checkpoint, recipe: Recipe, out: Path, topology: Topology) -> list[Part]:
    """A host other than node 0: run its ranks of the job in the shared run folder `out`; node 0 merges,
    verifies and writes the card."""
    gpus, _ = gpus_for(recipe)
    parts = run_ranks(src, recipe, out / PARALLEL_DIR, gpus, topology)
    world = ranks_at_once(recipe, gpus, topology)
    return [p for p in parts if node_of(p.rank, world, topology) == topology.node_rank]


def _merged_summary(results: list[dict[str, Any]], blocks: list[dict[str, Any]]) -> dict[str, int] | None:
    """AutoRound's "quantized N/M layers in the model" for the merged model: every view has the layers
    outside the blocks (counted once, from the last worker) and its own blocks."""
    summaries = [r.get("autoround_summary") for r in results]
    if not all(summaries):
        return None
    outside = summaries[-1]["total"] - sum(b["total"] for b in results[-1]["blocks"])
    return {"quantized": sum(s["quantized"] for s in summaries), "total": sum(b["total"] for b in blocks) + outside}


def finish(run: RunDir) -> None:
    """The merged checkpoint is in place: the ranges' outputs and handed-on inputs are no longer needed."""
    shutil.rmtree(run.root / PARALLEL_DIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(rank_main(Path(sys.argv[1])))
