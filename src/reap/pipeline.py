"""`reap run`: the whole release from one recipe, as a graph of stages, resumable.

Stages: prune (when the recipe has `prune:`), build, verify, eval, bench (on where a GPU is visible, opt-in
on CPUs), card, publish (with `--publish`). Each is the same library function the single command calls
(prune.prune, build.build, verify.verify_checkpoint, evaluate.evaluate, bench.bench, card.render_card_into,
publish.publish). A stage is done when its record in `manifest.json` under
`pipeline.stages` says `done` with the fingerprint of its current inputs (the recipe fields it reads and
the fingerprints of the stages it depends on) and its outputs exist. A re-run skips such stages and redoes
a stage whose inputs changed, and everything downstream of a stage that ran. The fingerprint is written
only after the stage finished (`RunDir.stage`), so an interrupted or failed stage is never mistaken for done;
an attempt that did not finish is kept beside an earlier done record (`last_attempt`), and that record still
counts for the inputs it was made with: a killed rebuild with changed settings leaves the earlier build done
for the recipe it was made from. A stage's record also names the checkpoint in model/ when it ended: a build
that `reap build` replaced since is not this pipeline's, and eval and verify count only for the checkpoint
there now.

The recipe is recorded as given, prune section and source path included (the build quantizes what the
prune stage wrote): the recipe saved with the model reproduces the release when run again. The model's
metadata fields (license, base_model, pruned_from) and the `card:` section are inputs of the card stage
only: changing them re-renders the card and quantizes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reap.bench import bench
from reap.build import build
from reap.card import render_card_into
from reap.checkpoint import Checkpoint
from reap.engine import keep_patterns
from reap.errors import InputError
from reap.evaluate import evaluate, load_suite
from reap.prune import prune
from reap.publish import publish
from reap.recipe import METADATA_FIELDS, Recipe
from reap.rundir import RunDir, check_output_dir, current, digest
from reap.serve import ServerPool
from reap.stats import log, visible_gpu_ids
from reap.verify import raise_on_failure, verify_checkpoint


@dataclass(frozen=True)
class Context:
    recipe: Recipe
    run: RunDir
    argv: list[str]
    servers: ServerPool  # eval's servers, kept for bench: each checkpoint is started once per run where it can be


@dataclass(frozen=True)
class Stage:
    name: str
    after: tuple[str, ...]  # stages whose results this one reads
    inputs: Callable[[Recipe], Any]  # the parts of the recipe it depends on (JSON-able)
    execute: Callable[[Context], None]
    outputs_exist: Callable[[RunDir], bool]
    wanted: Callable[[Recipe, bool], bool] = lambda recipe, publish: True  # (recipe, --publish given)
    unwanted_why: str = "not asked for by the recipe"
    how_to_want: str = ""  # what makes an unwanted stage run


def source_signature(path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of the source checkpoint's files: a changed source rebuilds."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(
            f"model.path {path} not found; build the demo source with `reap demo-model {path}` "
            "or point model.path at a checkpoint folder"
        )
    return Checkpoint(root).file_signature()


def _model_inputs(recipe: Recipe) -> dict[str, Any]:
    """The model section as the weights see it (its metadata fields are the card's inputs)."""
    return recipe.model.model_dump(mode="json", exclude=set(METADATA_FIELDS))


def _card_inputs(recipe: Recipe) -> dict[str, Any]:
    return {"card": recipe.card.model_dump(mode="json"), "model": recipe.model.model_dump(include=set(METADATA_FIELDS))}


def _build_inputs(recipe: Recipe) -> dict[str, Any]:
    return {
        "model": _model_inputs(recipe),
        "quantize": recipe.quantize.model_dump(mode="json"),
        "keep_16bit_resolved": keep_patterns(recipe),
        "tp": recipe.serve.tensor_parallel_size,
        "source": source_signature(recipe.model.path),
    }


def _pruned_dir(run: RunDir) -> Path:
    return run.root / "pruned"


def _prune(ctx: Context) -> None:
    p = ctx.recipe.prune
    prune(
        Path(ctx.recipe.model.path),
        _pruned_dir(ctx.run),
        ratio=p.ratio,
        keep=p.keep,
        method=p.method,
        calibration=Path(p.calibration) if p.calibration else None,
        nsamples=p.nsamples,
        seqlen=p.seqlen,
        seed=p.seed,
        overwrite=True,
        argv=ctx.argv,
    )


def _build(ctx: Context) -> None:
    pruned = _pruned_dir(ctx.run) / "model" if ctx.recipe.prune is not None else None  # what prune wrote
    build(ctx.recipe, ctx.run.root, overwrite=True, argv=ctx.argv, source=pruned, card=False)


def _verify(ctx: Context) -> None:
    q = ctx.recipe.quantize
    with ctx.run.stage("verify", checkpoint=ctx.run.model_id(), keep_done=False) as rec:
        report = verify_checkpoint(
            ctx.run.model_dir,
            tp=ctx.recipe.serve.tensor_parallel_size,
            expect={"bits": q.bits, "group_size": q.group_size, "sym": q.sym},
            reasons=keep_patterns(ctx.recipe),
        )
        rec.update(
            passed=report["passed"],
            tensor_parallel_size=report["tensor_parallel_size"],
            gates={k: g["passed"] for k, g in report["gates"].items()},
        )
        raise_on_failure(report, str(ctx.run.model_dir))


def _eval(ctx: Context) -> None:
    e = ctx.recipe.eval
    evaluate(
        ctx.run.root,
        suite_name=e.suite,
        tasks=",".join(e.tasks) if e.tasks else None,
        limit=e.limit,
        num_fewshot=e.num_fewshot,
        concurrency=e.concurrency,
        baseline=e.baseline,
        port=e.port,
        pool=ctx.servers,
    )


def _bench(ctx: Context) -> None:
    b = ctx.recipe.bench
    bench(
        ctx.run.root,
        baseline=b.baseline,
        concurrency=tuple(b.concurrency) if b.concurrency else None,
        input_len=b.input_len,
        output_len=b.output_len,
        num_prompts=b.num_prompts,
        port=b.port,
        pool=ctx.servers,
    )


def _bench_wanted(recipe: Recipe) -> bool:
    """On where a GPU is visible, opt-in on CPUs (`bench.enabled` decides when set)."""
    enabled = recipe.bench.enabled
    return enabled if enabled is not None else bool(visible_gpu_ids())


def _card(ctx: Context) -> None:
    render_card_into(ctx.run, ctx.recipe.model_dump(mode="json"))


def _publish(ctx: Context) -> None:
    p = ctx.recipe.publish
    publish(ctx.run.root, repo=p.repo, private=p.private, revision=p.revision, message=p.message)


def _stage_done(run: RunDir, name: str) -> bool:
    return run.read_manifest().get("stages", {}).get(name, {}).get("status") == "done"


def _built_here(run: RunDir) -> bool:
    """model/ holds the checkpoint this pipeline's build stage made (not one `reap build` put there since)."""
    built = run.read_manifest().get("pipeline", {}).get("stages", {}).get("build", {}).get("model_id")
    return built is not None and built == run.model_id()


def _current_done(run: RunDir, name: str) -> bool:
    """`stages.<name>` is done and describes the checkpoint in model/ now."""
    rec = current(run.read_manifest(), name) or {}
    return rec.get("status") == "done" and rec.get("model_id") == run.model_id()


STAGES: tuple[Stage, ...] = (
    Stage(
        "prune",
        (),
        lambda r: {
            "model": _model_inputs(r),
            "prune": r.prune.model_dump(mode="json"),
            "source": source_signature(r.model.path),
        },
        _prune,
        lambda run: (_pruned_dir(run) / "model" / "config.json").is_file(),
        wanted=lambda r, publish: r.prune is not None,
        how_to_want="add a prune: section to the recipe",
    ),
    Stage(
        "build",
        ("prune",),
        _build_inputs,
        _build,
        lambda run: _stage_done(run, "build") and _built_here(run),
    ),
    Stage(
        "verify",
        ("build",),
        lambda r: {"tp": r.serve.tensor_parallel_size},
        _verify,
        lambda run: _current_done(run, "verify"),
    ),
    Stage(
        "eval",
        ("build",),
        lambda r: r.eval.model_dump(mode="json", exclude={"port"}),
        _eval,
        lambda run: _current_done(run, "eval"),
        wanted=lambda r, publish: r.eval.enabled,
        how_to_want="set eval.enabled: true (or --set eval.enabled=true)",
    ),
    Stage(
        "bench",
        ("build",),
        lambda r: r.bench.model_dump(mode="json", exclude={"port"}),
        _bench,
        lambda run: _current_done(run, "bench"),
        wanted=lambda r, publish: _bench_wanted(r),
        unwanted_why="off (bench.enabled is false, or unset with no GPU visible)",
        how_to_want="set bench.enabled: true (or --set bench.enabled=true)",
    ),
    Stage(
        "card",
        ("build", "verify", "eval", "bench"),
        _card_inputs,
        _card,
        lambda run: run.card_path.is_file(),
    ),
    Stage(
        "publish",
        ("card",),
        lambda r: r.publish.model_dump(mode="json"),
        _publish,
        lambda run: _stage_done(run, "publish"),
        wanted=lambda r, publish: publish,
        unwanted_why="not asked for (--publish)",
        how_to_want="add --publish",
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def fingerprint_inputs(stage: Stage, recipe: Recipe, upstream: dict[str, str]) -> dict[str, Any]:
    """What a stage's fingerprint is a digest of: its recipe inputs and the fingerprints of the stages before it."""
    return {"stage": stage.name, "inputs": stage.inputs(recipe), "after": {u: upstream.get(u) for u in stage.after}}


def check_run_folder(run: RunDir, recipe: Recipe) -> None:
    """Refuse a run folder that another recipe made (another name or another source model)."""
    manifest = run.read_manifest()
    made_by = manifest.get("recipe") or {}
    theirs = (manifest.get("name"), (made_by.get("model") or {}).get("path"))
    if theirs[0] is None:
        return
    if theirs != (recipe.name, recipe.model.path):
        raise InputError(
            f"{run.root} was made by another recipe (name {theirs[0]!r}, model.path {theirs[1]!r}); "
            f"pass --out with a new folder, or remove {run.root}"
        )


def check_recipe(recipe: Recipe, publish: bool) -> None:
    """What contradicts itself or cannot run, refused before any stage starts."""
    from reap.build import check_calibration

    check_calibration(recipe.quantize.dataset)  # as the build itself would, so a dry run refuses alike
    if publish and not recipe.publish.repo:
        raise InputError("--publish needs publish.repo in the recipe (or --set publish.repo=ORG/NAME)")
    if recipe.eval.enabled:
        load_suite(recipe.eval.suite, ",".join(recipe.eval.tasks) if recipe.eval.tasks else None, None)


def select(wanted: list[str], only: str | None, start: str | None, until: str | None) -> tuple[list[str], bool]:
    """(stages selected, forced): --only/--from re-run their stages even when done."""
    names = [n for n in STAGE_NAMES if n in wanted]
    for opt, value in (("--only", only), ("--from", start), ("--until", until)):
        if value is not None and value not in names:
            stage = next((s for s in STAGES if s.name == value), None)
            if stage is not None:  # a stage of reap run that is not wanted this time: say why
                raise InputError(f"{opt} {value}: the {value} stage is {stage.unwanted_why}; {stage.how_to_want}")
            raise InputError(f"{opt} {value}: no such stage (the stages here: {', '.join(names)})")
    if only:
        return [only], True
    lo = names.index(start) if start else 0
    hi = names.index(until) + 1 if until else len(names)
    if lo >= hi:
        raise InputError(f"--from {start} comes after --until {until}")
    return names[lo:hi], start is not None


def plan(
    recipe: Recipe,
    run: RunDir,
    only: str | None = None,
    start: str | None = None,
    until: str | None = None,
    publish: bool = False,
) -> list[dict[str, Any]]:
    """What `reap run` would do, stage by stage: run (and why) or skip (and why). Refuses, as the run itself
    would, a run folder that cannot be made or that another recipe made."""
    check_output_dir(run.root)
    check_run_folder(run, recipe)
    check_recipe(recipe, publish)
    wanted = [s.name for s in STAGES if s.wanted(recipe, publish)]
    selected, forced = select(wanted, only, start, until)
    recorded = run.read_manifest().get("pipeline", {}).get("stages", {})
    fps: dict[str, str] = {}
    steps, ran = [], set()
    for stage in STAGES:
        if stage.name not in wanted:
            steps.append({"stage": stage.name, "action": "skip", "why": stage.unwanted_why})
            continue
        inputs = fingerprint_inputs(stage, recipe, fps)
        fp = fps[stage.name] = digest(inputs)
        rec = recorded.get(stage.name, {})
        done = rec.get("status") == "done" and rec.get("fingerprint") == fp and stage.outputs_exist(run)
        if stage.name not in selected:
            why = "done" if done else "not selected"
            if not done and any(s in selected for s in _downstream(stage.name)):
                raise InputError(f"stage {stage.name} is needed but not done; run without --only/--from")
            steps.append({"stage": stage.name, "action": "skip", "why": why, "fingerprint": fp})
            continue
        upstream_ran = any(u in ran for u in stage.after)
        if forced or upstream_ran or not done:
            why = (
                "forced"
                if forced
                else "upstream re-ran"
                if upstream_ran
                else "inputs changed"
                if rec.get("fingerprint") not in (None, fp) and "last_attempt" not in rec
                else {
                    "interrupted": "resumes (was interrupted)",
                    "failed": "retries (failed last time)",
                    "running": "resumes (the last attempt was killed)",
                }.get((rec.get("last_attempt") or rec).get("status"), "not done yet")
            )
            steps.append({"stage": stage.name, "action": "run", "why": why, "fingerprint": fp, "inputs": inputs})
            ran.add(stage.name)
        else:
            steps.append({"stage": stage.name, "action": "skip", "why": "done, inputs unchanged", "fingerprint": fp})
    return steps


def _downstream(name: str) -> set[str]:
    out: set[str] = set()
    for stage in STAGES:
        if name in stage.after or out & set(stage.after):
            out.add(stage.name)
    return out


def run_pipeline(
    recipe: Recipe,
    out: Path,
    *,
    only: str | None = None,
    start: str | None = None,
    until: str | None = None,
    publish: bool = False,
    argv: list[str] | None = None,
    on_plan: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the stages `plan` says to run; returns the summary rows (stage, status, wall_s, peak_rss_gb)."""
    run = RunDir(out)
    steps = plan(recipe, run, only, start, until, publish)
    if on_plan:
        on_plan(steps)
    run.root.mkdir(parents=True, exist_ok=True)
    with ServerPool() as servers:
        return _run_steps(steps, Context(recipe, run, argv or ["reap", *sys.argv[1:]], servers))


def _run_steps(steps: list[dict[str, Any]], ctx: Context) -> list[dict[str, Any]]:
    run = ctx.run
    by_name = {s.name: s for s in STAGES}
    rows = []
    for step in steps:
        name = step["stage"]
        if step["action"] == "skip":
            rows.append({"stage": name, "status": f"skipped ({step['why']})", "wall_s": None, "peak_rss_gb": None})
            continue
        if name not in ("eval", "bench"):
            ctx.servers.close()  # no later stage serves: the GPU (or the CPU) is free for what follows
        log(f"run: {name} started ({step['why']})")
        try:
            with run.stage(name, inputs=step["inputs"], section="pipeline.stages") as rec:
                by_name[name].execute(ctx)
                rec["model_id"] = run.model_id()  # the checkpoint in model/ once the stage ended
        except BaseException:
            log(f"run: {name} {rec['status']} after {rec['wall_s']:.1f} s")
            raise
        log(f"run: {name} done in {rec['wall_s']:.1f} s")
        rows.append({"stage": name, "status": "done", "wall_s": rec["wall_s"], "peak_rss_gb": rec["peak_rss_gb"]})
    return rows
