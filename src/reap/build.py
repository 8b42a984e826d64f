"""`reap build`: quantize a Qwen3.5-MoE checkpoint with AutoRound, fix up what it saves, verify, card.

Everything is measured: stage wall times (weight loading, calibration caching, quantization, saving) and
per block, peak RSS of the process tree, per-GPU peak memory. The new checkpoint appears as
`runs/<name>/model/` only after it passed verification; until then it lives in `model.partial/`. Until then
the run's recipe.yaml, name and build record stay those of the earlier build, if any (a failed or
interrupted attempt is recorded as `stages.build.last_attempt`). The card is rendered after the build
stage ended: a card that does not render leaves the verified build in place.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from reap import compat, engine, parallel
from reap.card import render_card_into
from reap.checkpoint import Checkpoint, source_license
from reap.errors import InputError
from reap.prune import PRUNE_FILE, pruning_summary, read_calibration, read_pruning
from reap.recipe import RECIPE_FILE, Recipe, dump_recipe, looks_like_path
from reap.rundir import (
    atomic_write_text,
    check_free_disk,
    check_output_dir,
    checkpoint_id,
    open_run,
    swap_into_place,
    usual_modes,
)
from reap.secrets import hide_local_paths
from reap.stats import Clock, hardware_inventory, log, package_versions
from reap.verify import preload as preload_gates
from reap.verify import raise_on_failure, verify_checkpoint


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


def estimated_output_bytes(src: Checkpoint, bits: int) -> int:
    return int(src.bytes_on_disk() * (bits / 16) * 1.25) + 50_000_000


def checked_source(recipe: Recipe, source: Path | None = None) -> Checkpoint:
    """The source checkpoint, refused before anything is written when it is not a supported, intact MoE,
    the calibration file is missing, or the block-parallel settings cannot run."""
    src = Checkpoint.open(Path(source or recipe.model.path))
    src.require_supported_moe()
    src.tensors  # noqa: B018 - reads every shard's header and size before anything is written
    if src.problems:
        raise InputError(f"the source {src.root} is damaged: {'; '.join(src.problems[:3])}; restore it")
    check_calibration(recipe.quantize.dataset)
    if recipe.quantize.parallel > 1:
        parallel.check_parallel(src, recipe, *parallel.gpus_for(recipe))
    return src


def join_build(recipe: Recipe, out: Path, topology: parallel.Topology) -> list[parallel.Part]:
    """`reap build --nodes H --node-rank I` on a host other than node 0: run this host's ranks of the
    block-parallel job in the shared run folder `out`; node 0's `reap build` merges, verifies and writes
    the card. Returns this host's ranges."""
    if recipe.prune is not None:
        raise InputError("a recipe with prune: is built by `reap run`, on one host; remove prune: or use reap run")
    if recipe.quantize.parallel < 2:
        raise InputError("--node-rank above 0 is for block-parallel builds; pass --gpus N or quantize.parallel")
    src = checked_source(recipe)
    return parallel.join(src, recipe, out, topology)


def build(
    recipe: Recipe,
    out: Path,
    overwrite: bool = False,
    argv: list[str] | None = None,
    *,
    source: Path | None = None,
    card: bool = True,
    topology: parallel.Topology | None = None,
) -> dict[str, Any]:
    """Quantize `recipe.model.path` into `out/model`, verify it and (with `card`) render its card. `reap run`
    passes `source`, the checkpoint its prune stage made from `recipe.model.path`: the recipe is recorded
    as given (source path and `prune:` section), so that running it again reproduces the release.
    Returns the build record."""
    if source is None and recipe.prune is not None:
        raise InputError(
            "this recipe has a prune: section, which `reap build` does not run; use `reap run RECIPE` "
            "(prune, then quantize), or remove prune: to quantize model.path as it is"
        )
    check_output_dir(out)
    src = checked_source(recipe, source)
    license_ = source_license(src.root)
    if not (recipe.model.license or license_):
        raise InputError(f"{src.root} has no README.md with a `license`; set model.license in the recipe")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(out, estimated_output_bytes(src, recipe.quantize.bits))
    run = open_run(out, overwrite=overwrite)  # refuses an existing build before any weight is read
    work = run.root / "model.partial"
    shutil.rmtree(work, ignore_errors=True)
    pruning = read_pruning(src.root)
    log(
        f"build {recipe.name}: {src.root} -> {run.model_dir} "
        f"(W{recipe.quantize.bits}A16 g{recipe.quantize.group_size}, "
        f"{recipe.quantize.format}, iters={recipe.quantize.iters}, nsamples={recipe.quantize.nsamples})"
    )
    clock = Clock()
    with run.stage(
        "build",
        argv=argv or sys.argv,
        source=str(src.root.resolve()),
        source_id=checkpoint_id(src.root),
        source_license=license_,
        versions=package_versions(),
    ) as rec:
        if pruning:  # the source was made by `reap prune`: its settings go into the lineage and the card
            rec["pruning"] = pruning_summary(pruning)
        try:
            if recipe.quantize.parallel > 1:
                preload_gates()  # while the ranks quantize
                result = parallel.quantize_parallel(
                    src, recipe, work, run, clock, rec.sampler, topology or parallel.Topology()
                )
            else:
                result = engine.quantize(src, recipe, work, run.logs_dir / "build.log", clock)
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
                    reasons=engine.keep_patterns(recipe),
                )
            rec.update(result, substages=clock.spans, verification=report)
            if not report["passed"]:
                rejected = run.root / "model.rejected"
                shutil.rmtree(rejected, ignore_errors=True)
                work.rename(rejected)
                rec["rejected"] = str(rejected)
                raise_on_failure(report, f"{rejected} (kept for inspection)")
            atomic_write_text(work / RECIPE_FILE, hide_local_paths(dump_recipe(recipe)))  # published as it is
            if pruning:
                shutil.copy2(src.root / PRUNE_FILE, work / PRUNE_FILE)
            usual_modes(work)
            model_id = checkpoint_id(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        swap_into_place(work, run.model_dir)
        parallel.finish(run)
        atomic_write_text(run.recipe_path, dump_recipe(recipe))
        rec.update(model_id=model_id, outputs={"model": str(run.model_dir)})
        rec.top.update(name=recipe.name, recipe=recipe.model_dump(mode="json"), hardware=hardware_inventory())
    stale = run.mark_stale(model_id)
    if stale:
        log(f"the {', '.join(stale)} record(s) describe the earlier checkpoint: left out of the card until redone")
    if card:
        render_card_into(run)
    return rec
