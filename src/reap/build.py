"""`reap build`: quantize a Qwen3.5-MoE checkpoint with AutoRound, fix up what it saves, verify, card.

Everything is measured: stage wall times (weight loading, calibration caching, quantization, saving) and
per block, peak RSS of the process tree, per-GPU peak memory. The new checkpoint appears as
`runs/<name>/model/` only after it passed verification; until then it lives in `model.partial/`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from reap import compat, parallel
from reap.card import render_card_into
from reap.checkpoint import Checkpoint, segment_match
from reap.errors import InputError, ReapError, StageError
from reap.prune import PRUNE_FILE, pruning_summary, read_calibration, read_pruning
from reap.recipe import RECIPE_FILE, Recipe, dump_recipe, looks_like_path
from reap.rundir import atomic_write_text, check_free_disk, check_output_dir, open_run, swap_into_place
from reap.secrets import hide_local_paths
from reap.stats import Clock, ResourceSampler, hardware_inventory, log, now, package_versions
from reap.verify import raise_on_failure, verify_checkpoint

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
        from reap.serve import cpu_int4_moe_kernel, visible_gpus

        if visible_gpus() == 0 and cpu_int4_moe_kernel() is None:
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


def check_calibration(dataset: str) -> None:
    """Before any weight is loaded: a local .jsonl file is read once; a dataset name must be one AutoRound
    registers under exactly that name (it otherwise matches names by substring, e.g. `pile` or a
    misspelt id becomes NeelNanda/pile-10k: the build would calibrate on data the recipe does not name)."""
    if looks_like_path(dataset):
        read_calibration(Path(dataset))  # the recipe stores it expanded
        return
    compat.ensure_torchvision_importable()
    from auto_round.calib_dataset import CALIB_DATASETS

    unknown = [n.split(":")[0] for n in dataset.split(",") if n.split(":")[0] not in CALIB_DATASETS]
    if unknown:
        known = ", ".join(sorted(k for k in CALIB_DATASETS if k != "local"))
        raise InputError(
            f"quantize.dataset {unknown[0]!r} is not a dataset AutoRound knows by that name (known: {known}); "
            'name one of them exactly, or give a local .jsonl of {"text": ...} rows'
        )


def source_license(root: Path) -> str | None:
    """The `license` of the source's own card (README.md front matter), carried into ours."""
    readme = root / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text()
    if not text.startswith("---"):
        return None
    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    return meta.get("license")


def estimated_output_bytes(src: Checkpoint, bits: int) -> int:
    return int(src.bytes_on_disk() * (bits / 16) * 1.25) + 50_000_000


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
    16-bit, and its log watched; yields (AutoRound, watcher, layer_config). Its failures inside the block
    become StageError; the compatibility fixes applied are appended to `fixes`."""
    layer_config = {name: {"bits": 16, "data_type": "float"} for name in kept}
    with AutoRoundWatcher(logfile) as watch:
        compat.ensure_torchvision_importable()
        from auto_round import AutoRound

        with compat.autoround_text_only(src) as text_only:
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


def _quantize(
    src: Checkpoint, recipe: Recipe, work: Path, logfile: Path, clock: Clock, block_inputs: Path | None = None
) -> dict[str, Any]:
    """Run AutoRound into `work`; returns what it reported. Raises StageError on its failures. A
    block-parallel worker passes `block_inputs`: its first block's inputs, computed by the capture."""
    fixes: list[str] = []
    kept = keep_16bit_layers(src, recipe)
    raw = work.with_name(work.name + ".autoround")
    shutil.rmtree(raw, ignore_errors=True)
    with autoround_session(src, recipe, kept, logfile, clock, fixes) as (ar, watch, layer_config):
        t_quant = time.time()
        with compat.autoround_block_inputs_from(block_inputs) if block_inputs else contextlib.nullcontext():
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
    }


def build(recipe: Recipe, out: Path, overwrite: bool = False, argv: list[str] | None = None) -> dict[str, Any]:
    """Quantize `recipe.model.path` into `out/model`, verify it and render its card. Returns the build record."""
    check_output_dir(out)
    src = Checkpoint.open(Path(recipe.model.path))
    src.require_supported_moe()
    src.tensors  # noqa: B018 - reads every shard's header and size before anything is written
    if src.problems:
        raise InputError(f"the source {src.root} is damaged: {'; '.join(src.problems[:3])}; restore it")
    check_calibration(recipe.quantize.dataset)
    if recipe.quantize.parallel > 1:
        parallel.check_parallel(src, recipe, *parallel.gpus_for(recipe))
    license_ = recipe.model.license or source_license(src.root)
    if not license_:
        raise InputError(f"{src.root} has no README.md with a `license`; set model.license in the recipe")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(out, estimated_output_bytes(src, recipe.quantize.bits))
    run = open_run(out, overwrite=overwrite)  # refuses an existing build before any weight is read
    atomic_write_text(run.recipe_path, dump_recipe(recipe))
    work = run.root / "model.partial"
    shutil.rmtree(work, ignore_errors=True)
    record: dict[str, Any] = {
        "status": "running",
        "started": now(),
        "argv": argv or sys.argv,
        "source": str(src.root.resolve()),
        "versions": package_versions(),
        "lineage": {"base": recipe.model.base_model, "pruned_from": recipe.model.pruned_from},
        "license": license_,
    }
    pruning = read_pruning(src.root)
    if pruning:  # the source was made by `reap prune`: its settings go into the lineage and the card
        record["pruning"] = pruning_summary(pruning)
    run.update_stage(
        "build", record, hardware=hardware_inventory(), name=recipe.name, recipe=recipe.model_dump(mode="json")
    )
    log(
        f"build {recipe.name}: {src.root} -> {run.model_dir} "
        f"(W{recipe.quantize.bits}A16 g{recipe.quantize.group_size}, "
        f"{recipe.quantize.format}, iters={recipe.quantize.iters}, nsamples={recipe.quantize.nsamples})"
    )
    clock = Clock()
    t0 = time.perf_counter()
    try:
        with ResourceSampler() as sampler:
            if recipe.quantize.parallel > 1:
                result = parallel.quantize_parallel(src, recipe, work, run, clock, sampler)
            else:
                result = _quantize(src, recipe, work, run.logs_dir / "build.log", clock)
            log("verifying the checkpoint")
            with clock.span("verification"):
                report = verify_checkpoint(
                    work,
                    tp=recipe.serve.tensor_parallel_size,
                    expect={
                        "bits": recipe.quantize.bits,
                        "group_size": recipe.quantize.group_size,
                        "sym": recipe.quantize.sym,
                    },
                    reported_blocks=result["blocks"] or None,
                    reasons=keep_patterns(recipe),
                )
        record.update(
            result,
            substages=clock.spans,
            wall_s=round(time.perf_counter() - t0, 3),
            verification=report,
            **sampler.summary(),
        )
        if not report["passed"]:
            rejected = run.root / "model.rejected"
            shutil.rmtree(rejected, ignore_errors=True)
            work.rename(rejected)
            record.update(status="failed", ended=now(), error="verification failed", rejected=str(rejected))
            run.update_stage("build", record)
            raise_on_failure(report, f"{rejected} (kept for inspection)")
        atomic_write_text(work / RECIPE_FILE, hide_local_paths(dump_recipe(recipe)))  # published as it is
        if pruning:
            shutil.copy2(src.root / PRUNE_FILE, work / PRUNE_FILE)
        swap_into_place(work, run.model_dir)
        parallel.finish(run)
        record.update(status="done", ended=now(), outputs={"model": str(run.model_dir)})
        run.update_stage("build", record)
        render_card_into(run)
    except KeyboardInterrupt:
        record.update(status="interrupted", ended=now())
        run.update_stage("build", record)
        shutil.rmtree(work, ignore_errors=True)
        raise
    except ReapError as exc:
        if record.get("status") != "failed":
            record.update(status="failed", ended=now(), error=str(exc))
            run.update_stage("build", record)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record
