"""The AutoRound engine: one AutoRound run on a checkpoint (`quantize`), the watcher of its per-block log,
which layers stay 16-bit, and the compatibility fixes around its output. The sequential build (`reap.build`)
and the block-parallel workers (`reap.parallel`) both run AutoRound through this module only."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reap import compat, fastround, serve
from reap.checkpoint import Checkpoint, segment_match
from reap.errors import ReapError, StageError
from reap.recipe import Recipe
from reap.stats import Clock

BLOCK_RE = re.compile(
    r"quantized (\d+)/(\d+) layers in the block(?:, loss iter 0: ([\d.e+-]+) -> iter \d+: ([\d.e+-]+))?"
)
SUMMARY_RE = re.compile(r"Summary: quantized (\d+)/(\d+) in the model")


class AutoRoundWatcher(logging.Handler):
    """Timestamps AutoRound's own log lines to measure calibration caching, each block and the summary,
    and copies them into logs/build.log."""

    def __init__(self, logfile: Path):
        super().__init__(level=logging.INFO)
        self.cache_start: float | None = None
        self.cache_done: float | None = None
        self.blocks: list[dict[str, Any]] = []
        self.summary: dict[str, int] | None = None
        self.saved_at: float | None = None
        self.stacked: dict[str, int] = {}  # blocks / expert Linears tuned by reap.fastround
        self._last = 0.0
        self._file = open(logfile, "a")

    def emit(self, record: logging.LogRecord) -> None:
        msg, t = record.getMessage(), record.created
        self._file.write(
            f"{datetime.fromtimestamp(t, timezone.utc).isoformat(timespec='seconds')} {record.levelname} {msg}\n"
        )
        self._file.flush()
        if msg.startswith("start to cache block inputs") and self.cache_start is None:
            self.cache_start = t
        elif msg.startswith("caching done") and self.cache_done is None:
            self.cache_done = self._last = t
        elif m := BLOCK_RE.search(msg):
            block = {
                "index": len(self.blocks),
                "quantized": int(m.group(1)),
                "total": int(m.group(2)),
                "wall_s": round(t - self._last, 3),
            }
            if m.group(3):
                block["loss_iter0"], block["loss_best"] = float(m.group(3)), float(m.group(4))
            self.blocks.append(block)
            self._last = t
        elif m := SUMMARY_RE.search(msg):
            self.summary = {"quantized": int(m.group(1)), "total": int(m.group(2))}
            self.saved_at = self.saved_at or t
        elif msg.startswith("model has been saved"):
            self.saved_at = t

    def __enter__(self) -> AutoRoundWatcher:
        logging.getLogger("autoround").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("autoround").removeHandler(self)
        self._file.close()


def keep_patterns(recipe: Recipe) -> dict[str, str]:
    """quantize.keep_16bit, plus the routed experts where `quantize.routed_experts` keeps them; pattern -> why."""
    keep = dict(recipe.quantize.keep_16bit)
    choice = recipe.quantize.routed_experts
    if choice == "keep_16bit":
        keep.setdefault("mlp.experts", "routed experts kept in 16-bit by the recipe")
    elif choice == "auto":
        if serve.visible_gpus() == 0 and serve.cpu_int4_moe_kernel() is None:
            keep.setdefault(
                "mlp.experts",
                "routed_experts: auto, and no GPU here while vLLM's CPU build has no int4 "
                "MoE kernel on this processor (it needs Intel AMX, or AMD with zentorch)",
            )
    return keep


def keep_16bit_layers(src: Checkpoint, recipe: Recipe) -> dict[str, str]:
    """Linear modules of the source matched by the recipe's keep_16bit patterns, plus the DeltaNet
    projections that Marlin could not run at the recipe's TP; name -> reason."""
    keep = keep_patterns(recipe)
    tp = recipe.serve.tensor_parallel_size
    rows = 2 * src.text_config.get("linear_num_value_heads", 0)
    if rows and (rows % tp or (rows // tp) % 64):
        for p in ("linear_attn.in_proj_a", "linear_attn.in_proj_b"):
            keep.setdefault(
                p,
                f"forced: vLLM fuses in_proj_a/b into in_proj_ba with {rows // tp} rows per shard "
                f"at TP={tp}, below Marlin's 64",
            )
    out = {}
    for mod, tensors in src.modules.items():
        w = tensors.get("weight")
        if (
            w is None
            or len(w.shape) != 2
            or segment_match("mlp.gate", mod)
            or mod.endswith(("embed_tokens", "pos_embed"))
        ):
            continue  # routers are not nn.Linear: AutoRound keeps them 16-bit itself, verify checks it
        pattern = next((p for p in keep if segment_match(p, mod)), None)
        if pattern:
            out[mod] = keep[pattern]
    return out


def _autoround_kwargs(recipe: Recipe, layer_config: dict[str, Any]) -> dict[str, Any]:
    q = recipe.quantize
    return dict(
        scheme=f"W{q.bits}A16",
        bits=q.bits,
        group_size=q.group_size,
        sym=q.sym,
        iters=q.iters,
        nsamples=q.nsamples,
        seqlen=q.seqlen,
        batch_size=q.batch_size,
        dataset=q.dataset,
        seed=q.seed,
        device_map=q.device_map,
        low_gpu_mem_usage=q.low_gpu_mem_usage,
        low_cpu_mem_usage=q.low_cpu_mem_usage,
        enable_torch_compile=q.enable_torch_compile,
        layer_config=layer_config,
        trust_remote_code=recipe.model.trust_remote_code,
    )


@contextlib.contextmanager
def autoround_session(
    src: Checkpoint, recipe: Recipe, kept: dict[str, str], logfile: Path, clock: Clock, fixes: list[str]
) -> Iterator[tuple[Any, AutoRoundWatcher, dict[str, Any]]]:
    """AutoRound set up on `src` with the recipe's settings, the modules in `kept` (keep_16bit_layers) in
    16-bit, and its log watched; yields (AutoRound, watcher, layer_config). With `quantize.expert_tuning:
    stacked` its SignRound tunes the routed experts through reap.fastround (counted in `watcher.stacked`).
    Its failures inside the block become StageError; the compatibility fixes applied are appended to `fixes`."""
    layer_config = {name: {"bits": 16, "data_type": "float"} for name in kept}
    with AutoRoundWatcher(logfile) as watch:
        compat.ensure_torchvision_importable()
        from auto_round import AutoRound

        stacked = recipe.quantize.expert_tuning == "stacked"
        with (
            compat.autoround_text_only(src) as text_only,
            fastround.stacked_expert_tuning(watch.stacked) if stacked else contextlib.nullcontext(),
        ):
            if text_only:
                fixes.append("autoround_text_only")
                layer_config = compat.text_only_layer_names(layer_config)
            kwargs = _autoround_kwargs(recipe, layer_config)
            try:
                with clock.span("weight_loading"):
                    ar = AutoRound(model=str(src.root), **kwargs)
                yield ar, watch, layer_config
            except (KeyboardInterrupt, ReapError):
                raise
            except SystemExit as exc:  # AutoRound calls sys.exit() on some failures (e.g. no calibration data)
                raise StageError(f"AutoRound stopped (exit {exc.code}); its last error is in {logfile}") from None
            except Exception as exc:  # AutoRound raises plain exceptions; keep the cause in one line
                raise StageError(
                    f"AutoRound failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    f" (full log: {logfile})"
                ) from exc


def quantize(
    src: Checkpoint, recipe: Recipe, work: Path, logfile: Path, clock: Clock, handoff: Any = None
) -> dict[str, Any]:
    """Run AutoRound into `work`; returns what it reported. Raises StageError on its failures. A
    block-parallel range passes its `handoff` (reap.parallel): where its first block's inputs come from and
    what it hands on to the next range (`compat.autoround_block_inputs`)."""
    fixes: list[str] = []
    kept = keep_16bit_layers(src, recipe)
    raw = work.with_name(work.name + ".autoround")
    shutil.rmtree(raw, ignore_errors=True)
    with autoround_session(src, recipe, kept, logfile, clock, fixes) as (ar, watch, layer_config):
        t_quant = time.time()
        with compat.autoround_block_inputs(handoff.provide, handoff.handed) if handoff else contextlib.nullcontext():
            ar.quantize_and_save(str(raw), format=recipe.quantize.format)
        t_end = time.time()
    cache_done = watch.cache_done or t_quant
    clock.spans["calibration_caching"] = round(cache_done - (watch.cache_start or t_quant), 3)
    clock.spans["quantization"] = round((watch.saved_at or t_end) - cache_done, 3)
    clock.spans["saving"] = round(t_end - (watch.saved_at or t_end), 3)
    if compat.flatten_autoround_output(raw, work):
        fixes.append("flatten_output_subfolder")
    shutil.rmtree(raw, ignore_errors=True)
    for name, applied in (
        ("restore_vl_config", lambda: compat.restore_vl_config(src.root, work)),
        ("gptq_skip_16bit_moe", lambda: compat.gptq_skip_16bit_moe(work)),
        ("restore_bf16_dtype", lambda: compat.restore_bf16_dtype(src.root, work)),
        ("carry_tokenizer_and_processor_files", lambda: compat.carry_tokenizer_and_processor(src.root, work)),
    ):
        if applied():  # each fix detects whether it is needed and says so
            fixes.append(name)
    return {
        "blocks": watch.blocks,
        "autoround_summary": watch.summary,
        "fixes_applied": fixes,
        "kept_16bit_requested": sorted(set(kept.values())),
        "layer_config_16bit": len(layer_config),
        "expert_tuning": expert_tuning(recipe, [watch.stacked]),
    }


def expert_tuning(recipe: Recipe, counts: list[dict[str, int]]) -> dict[str, Any]:
    """Which path tuned the routed experts (the recipe's `quantize.expert_tuning`) and, for `stacked`, in how
    many blocks reap.fastround took them over (the others were not eligible and AutoRound tuned them)."""
    out: dict[str, Any] = {"path": recipe.quantize.expert_tuning}
    if recipe.quantize.expert_tuning == "stacked":
        for key in ("blocks", "expert_layers"):
            out[f"stacked_{key}"] = sum(c.get(key, 0) for c in counts)
    return out
