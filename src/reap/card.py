"""The model card: `templates/*.md.j2` rendered with a strict Jinja environment (a missing value is an
error, never an empty cell) into a huggingface_hub `ModelCard`. A pure function of the run's manifest.

Only records of the current checkpoint are shown (`rundir.current`: same `model_id` as the build): an
evaluation or a serve record of an earlier build is left out, from the tables and from `model-index`. A
quantized score is paired with a source score only when both were measured the same way (task, metric,
limit, few-shot count, request type, documents) and the source is the build's (its `model_id`); so are the
paired interval and the token-level agreement with the source."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from reap import charts as reap_charts
from reap import quality
from reap.errors import CardError
from reap.recipe import METADATA_FIELDS, RECIPE_FILE
from reap.resources import data_dir
from reap.rundir import RunDir, atomic_write_text, current
from reap.secrets import LOCAL_PATH, hide_local_paths, mask_argv

REQUIRED_METADATA = ("base_model_relation", "library_name", "license", "pipeline_tag", "tags")


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n} B"


def serve_argv(manifest: dict[str, Any]) -> list[str]:
    """The GPU command of `reap serve` as recorded in the run (model path replaced by the published name),
    else the one reap would build for this checkpoint on GPUs. A CPU serve record is not a recipe for users."""
    target = manifest.get("stages", {}).get("publish", {}).get("repo") or manifest["name"]
    recorded = (current(manifest, "serve") or {}).get("argv")
    if recorded and "serve" in recorded[:4]:  # `vllm serve MODEL ...` or `python -m vllm... serve MODEL ...`
        i = recorded.index("serve")
        return ["vllm", "serve", target, *mask_argv(recorded[i + 2 :])]
    recipe = manifest["recipe"]
    argv = [
        "vllm",
        "serve",
        target,
        "--tensor-parallel-size",
        str(recipe["serve"]["tensor_parallel_size"]),
        "--dtype",
        "bfloat16",
        "--language-model-only",
    ]
    if recipe["serve"].get("max_model_len"):
        argv += ["--max-model-len", str(recipe["serve"]["max_model_len"])]
    if recipe["serve"].get("enforce_eager"):
        argv.append("--enforce-eager")
    return argv


def hardware_line(hw: dict[str, Any]) -> str:
    """CPU, RAM and GPUs of a hardware inventory (stats.hardware_inventory) in one line."""
    line = f"{hw['cpu']['model']} ({hw['cpu']['logical_cores']} threads), {hw['ram_gb']} GB RAM"
    if hw["gpus"]:
        g = hw["gpus"][0]
        line += f", {len(hw['gpus'])}x {g['name']} {g['memory_gb']} GB (driver {g['driver']}, CUDA {g['cuda']})"
    return line


def _where(device: str) -> str:
    return "CPU" if device == "cpu" else f"GPU {device}"


def _runtime(build: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any] | None:
    if "substages" not in build:
        return None
    labels = {
        "weight_loading": "weight loading",
        "calibration_caching": "calibration caching",
        "quantization": "quantization",
        "saving": "saving",
        "parallel_quantization": "quantization by the workers (wall)",
        "merge": "merging the workers' outputs",
        "verification": "verification",
    }
    stages = [(label, fmt_seconds(build["substages"][k])) for k, label in labels.items() if k in build["substages"]]
    blocks = build.get("blocks") or []
    per_block = None
    if blocks:
        times = [b["wall_s"] for b in blocks]
        per_block = (
            f"{len(times)} blocks: mean {fmt_seconds(sum(times) / len(times))}, "
            f"min {fmt_seconds(min(times))}, max {fmt_seconds(max(times))}"
        )
    vram = build.get("peak_vram_gb")
    peak_vram = ", ".join(f"GPU{i} {v:.1f} GB" for i, v in vram.items()) if vram else None
    workers = []
    par = build.get("parallel") or {}
    for w in par.get("workers", []):
        times = w["block_wall_s"]
        line = f"{_where(w['device'])}, blocks {w['blocks'][0]}-{w['blocks'][1]}: {fmt_seconds(w['wall_s'])} in all"
        if times:  # AutoRound logs no per-block line in RTN mode (iters 0)
            line += f", {len(times)} blocks of mean {fmt_seconds(sum(times) / len(times))}"
        if w["blocks"][0] > 0 and w.get("inputs_after_s") is not None and not w.get("kept_from_earlier_attempt"):
            line += (
                f", its inputs after {fmt_seconds(w['inputs_after_s'])} (full precision, from worker {w['index'] - 1})"
            )
        if w.get("peak_vram_gb") is not None:
            line += f", peak GPU memory {w['peak_vram_gb']:.1f} GB"
        workers.append((f"worker {w['index']}", line))
    v = build["versions"]
    software = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "auto-round") if k in v)
    return {
        "stages": stages,
        "per_block": per_block,
        "workers": workers,
        "total": fmt_seconds(build["wall_s"]),
        "peak_rss_gb": f"{build['peak_rss_gb']:.2f}",
        "peak_vram": peak_vram,
        "software": software,
    }


def public_recipe_yaml(recipe: dict[str, Any]) -> str:
    """The recipe as the card and the Hub show it: local paths (model.path, a calibration file) hidden."""
    return hide_local_paths(yaml.safe_dump(recipe, sort_keys=False, width=1000))


def card_context(manifest: dict[str, Any], charts: list[str] | None = None) -> dict[str, Any]:
    """Everything the template shows, derived from the manifest alone; `charts`: the chart files beside the
    card (default: every chart the manifest has figures for)."""
    shown = reap_charts.available(manifest) if charts is None else charts
    build = manifest["stages"]["build"]
    recipe = manifest["recipe"]
    verification = build["verification"]
    qcfg = verification["quantization_config"]
    q = recipe["quantize"]
    per_block = verification["quantized_linear_per_block"]
    predicted = verification["predicted_linear_per_block"]
    blocks_summary = ", ".join(sorted({f"{a}/{b}" for a, b in zip(per_block, predicted, strict=False)}))
    argv = list(build["argv"])
    argv[0] = "reap" if Path(argv[0]).name in ("reap", "cli.py", "__main__.py") else argv[0]
    notes = [
        "no `--quantization` flag: vLLM detects the AutoRound/GPTQ checkpoint and picks its Marlin-family kernels",
        "bfloat16 only: float16 overflows in the DeltaNet layers of Qwen3.5",
        "`--language-model-only` serves the text model of the vision-language checkpoint",
    ]
    return {
        "name": manifest["name"],
        "summary": (
            f"W{q['bits']}A16 (int{q['bits']} weights, 16-bit activations) quantization of "
            + (f"`{lineage(manifest)['base']}`" if lineage(manifest)["base"] else "its source checkpoint")
            + " made with `reap` and Intel AutoRound, "
            "checked by reap's gates against what vLLM needs to load it (see Verification)."
        ),
        "lineage": lineage(manifest),
        "quant": dict(q, quant_method=qcfg.get("quant_method"), dataset=hide_local_paths(q["dataset"])),
        "versions": build["versions"],
        "blocks_summary": blocks_summary,
        "autoround_summary": build.get("autoround_summary"),
        "expert_tuning": build.get("expert_tuning"),  # absent in builds made before quantize.expert_tuning
        "size": fmt_bytes(verification["size_bytes"]),
        "kept_16bit": verification["kept_16bit"],
        "verification": verification,
        "hardware": hardware_line(manifest["hardware"]),
        "runtime": _runtime(build, manifest["hardware"]),
        "serving": _serving(manifest),
        "charts": {name: reap_charts.alt_text(name) for name in shown},
        # the card is published: local absolute paths and secrets stay on this machine
        "build_command": hide_local_paths(shlex.join(mask_argv(argv))),
        "recipe_yaml": public_recipe_yaml(recipe),
        "serve_command": hide_local_paths(shlex.join(serve_argv(manifest))),
        "serve_notes": notes,
        "evaluation": _evaluation(manifest),
        "pruning": pruning_context(build["pruning"]) if build.get("pruning") else None,
    }


def pruning_context(p: dict[str, Any]) -> dict[str, Any]:
    """The `reap prune` settings a card shows, from a prune record's summary (reap.prune.pruning_summary)."""
    cal = p["calibration"]
    requested = f"ratio {p['ratio']}" if p["ratio"] is not None else f"keep {p['keep']}"
    return {
        "method": p["method"],
        "description": p["method_description"],
        "requested": requested,
        "experts_before": p["experts_before"],
        "experts_after": p["experts_after"],
        "dropped": f"{100 * p['dropped_fraction']:.1f} %",
        "moe_layers": p["moe_layers"],
        "top_k": p["top_k"],
        "calibration": (
            f"`{Path(cal['path']).name}`: {cal['samples']} samples of up to {cal['seqlen']} tokens, "
            f"{cal['tokens']} tokens"
            if cal
            else f"none (seed {p['seed']})"
        ),
        "mtp": p["mtp"],
        "source": Path(p["source"]).name,
        "reap_version": p["reap_version"],
        "wall": fmt_seconds(p["wall_s"]),
        "peak_rss_gb": f"{p['peak_rss_gb']:.2f}",
    }


def lineage(manifest: dict[str, Any]) -> dict[str, Any]:
    """Base model and pruned-from, from the recipe's metadata fields (card inputs, not build inputs)."""
    model = manifest["recipe"]["model"]
    return {"base": model.get("base_model"), "pruned_from": model.get("pruned_from")}


def source_is_the_builds(manifest: dict[str, Any], ev: dict[str, Any]) -> bool:
    source_id = manifest["stages"]["build"].get("source_id")
    return source_id is not None and (ev.get("baseline") or {}).get("model_id") == source_id


def paired_baseline(manifest: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """{task: source result} for the tasks whose source score was measured like the quantized one (same task,
    metric, limit, few-shot count, request type and documents), on the build's source checkpoint."""
    if not source_is_the_builds(manifest, ev):
        return {}
    return {
        task: b
        for task, b in (ev["baseline"].get("results") or {}).items()
        if task in ev["results"] and all(b.get(k) == ev["results"][task].get(k) for k in quality.MEASURE)
    }


def comparisons(manifest: dict[str, Any], ev: dict[str, Any]) -> tuple[dict, dict, dict | None]:
    """(source results, paired statistics, token-level agreement) that compare this checkpoint with the build's
    source: only those, so that the card and the published results never compare with another model."""
    base = paired_baseline(manifest, ev)
    stats = {task: p for task, p in (ev.get("paired") or {}).items() if task in base}
    agreement = ev.get("agreement") or {}  # none: no logprobs of both sides
    return base, stats, agreement if source_is_the_builds(manifest, ev) and agreement.get("docs") else None


def _score(r: dict[str, Any]) -> str:
    return f"{r['value']:.4f}" + (f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else "")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _recovery(r: dict[str, Any], b: dict[str, Any] | None, p: dict[str, Any] | None) -> tuple[str, str]:
    """(recovery with its 95 % interval, the paired difference and whether it is within noise)."""
    if p is None:
        return (_pct(r["value"] / b["value"]) if b and b["value"] else "n/a"), "n/a"
    recovery = "n/a"
    if p["recovery"] is not None:
        lo, hi = p["recovery_ci95"]
        recovery = f"{_pct(p['recovery'])} [{100 * lo:.1f}, {100 * hi:.1f}]"
    verdict = "within noise" if p["within_noise"] else ("loss" if p["diff"] < 0 else "gain") + " beyond noise"
    return recovery, f"{p['diff']:+.4f} ± {quality.Z95 * p['diff_se']:.4f}: {verdict}"


def _rate(g: dict[str, Any] | None, key: str) -> str:
    if not g:
        return "n/a"
    return f"{g[key]}/{g['n']} ({_pct(g[f'{key}_rate'])})" + (
        " **over 1 %**" if g[f"{key}_rate"] > quality.FLAG_RATE else ""
    )


def _evaluation(manifest: dict[str, Any]) -> dict[str, Any] | None:
    ev = current(manifest, "eval")
    if not ev or not ev.get("results"):
        return None
    base, stats, agreement = comparisons(manifest, ev)
    rows, generation = [], []
    for task, r in ev["results"].items():
        b = base.get(task)
        recovery, difference = _recovery(r, b, stats.get(task))
        rows.append(
            {
                "task": task,
                "metric": r["metric"],
                "num_fewshot": r["num_fewshot"],
                "n": r.get("n", "n/a"),
                "value": _score(r),
                "source": _score(b) if b else "n/a",
                "recovery": recovery,
                "difference": difference,
            }
        )
        if r.get("generation"):
            g, bg = r["generation"], (b or {}).get("generation")
            generation.append(
                {
                    "task": task,
                    "limit": g["max_gen_toks"],
                    "truncated": _rate(g, "truncated"),
                    "empty": _rate(g, "empty"),
                    "source_truncated": _rate(bg, "truncated"),
                    "source_empty": _rate(bg, "empty"),
                    "flagged": quality.flagged(g) or quality.flagged(bg),
                }
            )
    return {
        "rows": rows,
        "has_baseline": bool(base),
        "has_paired": bool(stats),
        "generation": generation,
        "flagged": [g["task"] for g in generation if g["flagged"]],
        "agreement": _agreement(agreement) if agreement else None,
        "suite": ev["suite"],
        "lm_eval_version": ev["lm_eval_version"],
        "partial": ev.get("status") != "done",
        "error": ev.get("error", ev.get("status", "")),
        "limit": next(iter(ev["results"].values())).get("limit"),
    }


def _agreement(a: dict[str, Any]) -> dict[str, Any]:
    def pm(value: float, se: float | None, scale: float = 1.0, digits: int = 4) -> str:
        return f"{scale * value:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")

    return {
        "data": a["data"],
        "docs": a["docs"],
        "positions": a["positions"],
        "top_k": a["top_k"],
        "mismatched_docs": a["mismatched_docs"],
        "held_out_checked": a["held_out_checked"],
        "kl": pm(a["kl_mean"], a["kl_se"], digits=5),
        "kl_max": f"{a['kl_max']:.4f}",
        "top1": pm(a["top1_agreement"], a["top1_agreement_se"], 100, 1) + " %",
        "ppl_source": f"{a['perplexity_source']:.4f}",
        "ppl_quantized": f"{a['perplexity_quantized']:.4f}",
    }


def _ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _latency(ms: dict[str, float]) -> str:
    return " / ".join(_ms(ms[k]) for k in ("mean", "median", "p99"))


def _serving_row(r: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any]:
    """One concurrency level of the serving table: W4A16 (`r`) and, when measured, the bf16 source (`b`)."""
    ratio = b and b["output_throughput"] and r["output_throughput"] / b["output_throughput"]
    return {
        "concurrency": r["concurrency"],
        "requests": f"{r['completed']}/{r['num_prompts']}" + (f", {b['completed']}/{b['num_prompts']}" if b else ""),
        "tps": f"{r['output_throughput']:.1f}",
        "base_tps": f"{b['output_throughput']:.1f}" if b else "n/a",
        "ratio": f"{ratio:.2f}x" if ratio else "n/a",
        "tpot": _latency(r["tpot_ms"]),
        "base_tpot": _latency(b["tpot_ms"]) if b else "n/a",
        "ttft": _latency(r["ttft_ms"]),
        "base_ttft": _latency(b["ttft_ms"]) if b else "n/a",
    }


BENCH_BOOKKEEPING = {"--save-result": 0, "--result-dir": 1, "--result-filename": 1}  # flag -> values it takes


def public_command(argv: list[str], model: str) -> str:
    """A recorded vLLM command as the card shows it: `vllm` for vLLM's CLI run through the interpreter, other
    modules as `python -m`, the local checkpoint (the served model, or the benchmark's tokenizer) as `model`,
    the benchmark's result-file flags left out, secrets masked, any other local path hidden."""
    out, skip, argv = [], 0, mask_argv(argv)
    if argv[1:3] == ["-m", "vllm.entrypoints.cli.main"]:  # vLLM's CLI through the interpreter: `vllm` itself
        argv = ["vllm", *argv[3:]]
    checkpoint_at = ("--tokenizer",) if "bench" in argv else ("serve", "--model")  # (`--model`: the served name)
    for i, arg in enumerate(argv):
        if skip:
            skip -= 1
        elif arg in BENCH_BOOKKEEPING:
            skip = BENCH_BOOKKEEPING[arg]
        elif i == 0 and Path(arg).name.startswith("python"):
            out.append("python")
        elif i and argv[i - 1] in checkpoint_at and not arg.startswith("-"):
            out.append(model)
        else:
            out.append(arg if arg.startswith("/v1/") else hide_local_paths(arg))  # an API path is no local path
    return shlex.join(out)


def _server_line(label: str, srv: dict[str, Any], model: str) -> dict[str, Any]:
    """A server reap started for the benchmark: its command, start-up time and the kernels it logged."""
    kernels = [
        f"{k} {v}" for k, v in srv["kernels"].items() if v not in (None, "None") and k != "forced_quantization_warning"
    ]
    return {
        "label": label,
        "command": " ".join(
            [
                *(f"{k}={shlex.quote(v)}" for k, v in sorted((srv.get("settings_env") or {}).items())),
                public_command(srv["argv"], model),
            ]
        ),
        "startup": (fmt_seconds(srv["startup_s"]) if srv.get("startup_s") is not None else "not timed")
        + (f", started together with {', '.join(srv['started_with'])}" if srv.get("started_with") else ""),
        "kernels": ", ".join(kernels) or "none logged",
    }


def _serving(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The serving-performance section from the current bench record: W4A16 against its bf16 source (when
    that was measured on the build's source) per concurrency."""
    rec = current(manifest, "bench")
    if not rec or rec.get("status") != "done" or not rec.get("results"):
        return None
    base = rec.get("baseline") or {}
    source_id = manifest["stages"]["build"].get("source_id")
    measured = source_id is not None and base.get("model_id") == source_id
    base_rows = {r["concurrency"]: r for r in base.get("results") or []} if measured else {}
    s, sizes = rec["settings"], rec["sizes"]
    size = f"{fmt_bytes(sizes['quantized'])} (W4A16)" if sizes.get("quantized") else None
    if size and sizes.get("source"):
        q, src = sizes["quantized"], sizes["source"]
        size += f" vs {fmt_bytes(src)} (bf16 source): " + (
            f"{src / q:.2f}x smaller" if src >= q else f"{q / src:.2f}x larger (the 16-bit tensors dominate)"
        )
    target = manifest.get("stages", {}).get("publish", {}).get("repo") or manifest["name"]
    source = lineage(manifest)["base"] if not lineage(manifest)["pruned_from"] else None
    servers = [
        ("W4A16", rec.get("server"), target),
        ("bf16 source", base.get("server") if base_rows else None, source or LOCAL_PATH),
    ]
    return {
        "hardware": hardware_line(rec["hardware"]) if rec.get("hardware") else "another host (not recorded)",
        "vllm_version": rec.get("vllm_version") or "unknown",
        "workload": (
            f"random prompts of {s['input_len']} tokens made with the model's own tokenizer (seed {s['seed']}), "
            f"{s['output_len']} output tokens each (`--ignore-eos`)"
        ),
        "rows": [_serving_row(r, base_rows.get(r["concurrency"])) for r in rec["results"]],
        "has_baseline": bool(base_rows),
        "size": size,
        "servers": [_server_line(label, srv, model) for label, srv, model in servers if srv],
        "endpoint_given": "endpoint" in rec,
        "bench_commands": [public_command(r["argv"], target) for r in rec["results"]],
    }


def card_metadata(manifest: dict[str, Any]):
    from huggingface_hub import EvalResult, ModelCardData

    build = manifest["stages"]["build"]
    card = manifest["recipe"]["card"]
    ev = current(manifest, "eval") or {}
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            metric_type=r["metric"],
            metric_value=round(r["value"], 4),
            dataset_split=r.get("split"),  # the split lm-eval scored (validation for hellaswag, winogrande)
            dataset_args={"num_few_shot": r["num_fewshot"]},
        )
        for task, r in (ev.get("results") or {}).items()
    ]
    agreement = comparisons(manifest, ev)[2] if ev.get("results") else None
    if agreement:  # the checkpoint's own perplexity of the held-out text; KL and agreement compare two models
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=Path(agreement["data"]).stem,
                dataset_name=f"{agreement['data']} (held-out text)",
                metric_type="perplexity",
                metric_value=round(agreement["perplexity_quantized"], 4),
            )
        )
    data = ModelCardData(
        base_model=lineage(manifest)["base"],
        base_model_relation="quantized",
        library_name=card["library_name"],
        license=manifest["recipe"]["model"].get("license") or build["source_license"],
        pipeline_tag=card["pipeline_tag"],
        tags=list(card["tags"]),
        model_name=manifest["name"] if results else None,
        eval_results=results or None,
    )
    missing = [k for k in REQUIRED_METADATA if not data.to_dict().get(k)]
    if missing:
        raise CardError(f"card metadata lacks {', '.join(missing)}; set them in the recipe (model.license, card.*)")
    return data


def _render(template: str, context: Callable[[], dict[str, Any]], templates: Path | None = None) -> str:
    """Render a template strictly: a missing value is a CardError naming it, never an empty cell."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates or data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        autoescape=False,
    )
    try:
        return env.get_template(template).render(**context())
    except KeyError as exc:
        raise CardError(f"the manifest lacks {exc.args[0]!r}, needed by the card; rebuild the run") from None
    except jinja2.UndefinedError as exc:
        raise CardError(f"card template needs a value the manifest lacks: {exc.message}") from None


def render_card(manifest: dict[str, Any], templates: Path | None = None, charts: list[str] | None = None):
    """Render the ModelCard for a manifest (`charts`: see card_context). Raises CardError naming the first
    missing value."""
    from huggingface_hub import ModelCard

    body = _render("model_card.md.j2", lambda: card_context(manifest, charts), templates)
    data = card_metadata(manifest)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def render_pruned_card(summary: dict[str, Any], license_: str | None) -> str:
    """The card of a `reap prune` output (a 16-bit checkpoint, not yet quantized): its pruning settings and
    the source's license, which `reap build` carries on."""
    from huggingface_hub import ModelCardData

    body = _render("pruned_card.md.j2", lambda: {"pruning": pruning_context(summary)})
    data = ModelCardData(license=license_, library_name="transformers", tags=["reap", "moe", "expert-pruning"])
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def adopt_metadata(run: RunDir, recipe: dict[str, Any]) -> None:
    """Take the card's inputs from `recipe` (a recipe as JSON): its `card:` section and the model's metadata
    fields (license, base_model, pruned_from), which change no weight. They go into the manifest's recipe, the
    run's recipe.yaml and the recipe saved beside the weights, so that all three stay the release's recipe."""
    manifest = run.read_manifest()
    kept = manifest["recipe"]
    model = recipe.get("model") or {}
    updated = dict(
        kept,
        card=recipe.get("card", kept["card"]),
        model=dict(kept["model"], **{k: model.get(k) for k in METADATA_FIELDS}),
    )
    if updated == kept:
        return
    text = yaml.safe_dump(updated, sort_keys=False)
    atomic_write_text(run.recipe_path, text)
    atomic_write_text(run.model_dir / RECIPE_FILE, hide_local_paths(text))  # published as it is
    run.write_manifest(dict(manifest, recipe=updated))


def render_card_into(run: RunDir, recipe: dict[str, Any] | None = None) -> Path:
    """Render the card into model/README.md from the manifest, after adopting the card section and metadata
    fields of `recipe` (a recipe as JSON) when given."""
    manifest = run.read_manifest()
    if manifest.get("stages", {}).get("build", {}).get("status") != "done":
        raise CardError(f"{run.root} has no finished build; run `reap build` first")
    if recipe is not None:
        adopt_metadata(run, recipe)
        manifest = run.read_manifest()
    card = render_card(manifest)  # refused before any chart is written when a value is missing
    written = reap_charts.write_into(run.model_dir, manifest)
    if written != reap_charts.available(manifest):  # matplotlib missing: the card names no absent file
        card = render_card(manifest, charts=written)
    atomic_write_text(run.card_path, str(card))
    return run.card_path
