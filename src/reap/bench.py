"""`reap bench`: serving speed, measured with vLLM's own serving benchmark (`vllm bench serve`), into the
manifest and the card.

Random prompts made with the model's own tokenizer, a fixed seed, `--ignore-eos` (every request yields the
output length asked for), one pass per concurrency, against the server reap starts for the run (or a given
endpoint); with `baseline`, the bf16 source is served and measured the same way, and the ratio recorded.
The record (`stages.bench`) names the checkpoint it measured (`model_id`) and the server it measured (its
command, vLLM version, kernels, start-up time, GPU memory after load) and the hardware.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reap import procs
from reap.errors import InputError, ReapError
from reap.evaluate import normalize_endpoint, require_served, targets
from reap.rundir import existing_run
from reap.secrets import mask_argv
from reap.serve import CPU_SITE, ServeOptions, ServerPool, Target, log_cause, visible_gpus, vllm_version
from reap.stats import hardware_inventory, log

# Per device: (concurrency levels, input tokens, output tokens, prompts per pass at least, prompts per slot).
# The CPU values finish the demo model's passes in well under a minute on 2 cores.
GPU_DEFAULTS = ((1, 8, 32), 256, 128, 16, 4)
CPU_DEFAULTS = ((1, 4), 32, 16, 4, 2)
METRICS = ("ttft", "tpot", "itl")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BenchError(ReapError):
    """vLLM's benchmark could not run, or its requests failed."""


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    input_len: int
    output_len: int
    num_prompts: int | None = None  # None: per concurrency, `min_prompts` or `per_slot` x concurrency
    seed: int = 0
    min_prompts: int = 16
    per_slot: int = 4

    def prompts(self, concurrency: int) -> int:
        return self.num_prompts or max(self.min_prompts, self.per_slot * concurrency)


def settings_for(
    gpu: bool,
    concurrency: tuple[int, ...] | None = None,
    input_len: int | None = None,
    output_len: int | None = None,
    num_prompts: int | None = None,
) -> Settings:
    """The device's defaults with the given values in their place."""
    levels, inp, out, least, per_slot = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    concurrency = tuple(concurrency or levels)
    if any(c < 1 for c in concurrency):
        raise InputError(f"concurrency {','.join(map(str, concurrency))}: every level must be at least 1")
    return Settings(
        tuple(sorted(set(concurrency))),
        input_len or inp,
        output_len or out,
        num_prompts,
        min_prompts=least,
        per_slot=per_slot,
    )


def pass_args(base_url: str, served: str, tokenizer: Path, s: Settings, concurrency: int, result: Path) -> list[str]:
    """The arguments of one pass of `vllm bench serve` against the server's completions API."""
    return [
        "--backend",
        "vllm",
        "--base-url",
        base_url.removesuffix("/v1"),
        "--endpoint",
        "/v1/completions",
        "--model",
        served,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(s.input_len),
        "--random-output-len",
        str(s.output_len),
        "--ignore-eos",
        "--seed",
        str(s.seed),
        "--num-prompts",
        str(s.prompts(concurrency)),
        "--max-concurrency",
        str(concurrency),
        "--percentile-metrics",
        ",".join(METRICS),
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(result.parent),
        "--result-filename",
        result.name,
    ]


def summarize(result: dict[str, Any], args: list[str]) -> dict[str, Any]:
    """The figures of one pass, from vLLM's result JSON; `argv`: the pass as the `vllm bench serve` command."""
    num_prompts = int(args[args.index("--num-prompts") + 1])
    completed = int(result.get("completed") or 0)
    row: dict[str, Any] = {
        "concurrency": int(args[args.index("--max-concurrency") + 1]),
        "num_prompts": num_prompts,
        "completed": completed,
        "failed": int(result.get("failed", num_prompts - completed) or 0),
        "duration_s": round(float(result["duration"]), 3),
        "request_throughput": round(float(result["request_throughput"]), 3),
        "output_throughput": round(float(result["output_throughput"]), 2),
        "total_token_throughput": round(float(result["total_token_throughput"]), 2),
    }
    for m in METRICS:
        row[f"{m}_ms"] = {
            "mean": round(float(result[f"mean_{m}_ms"]), 3),
            "median": round(float(result[f"median_{m}_ms"]), 3),
            "p99": round(float(result[f"p99_{m}_ms"]), 3),
        }
    row["argv"] = mask_argv(["vllm", "bench", "serve", *args])
    return row


@dataclass(frozen=True)
class Job:
    """The passes against one server: the side measured, its served name and tokenizer, where results go."""

    label: str
    base_url: str
    served: str
    tokenizer: Path
    out_dir: Path


def run_passes(jobs: list[Job], s: Settings, log_path: Path, api_key: str | None) -> dict[str, list[dict[str, Any]]]:
    """One pass per concurrency against each job's server, one server after the other, all in one child process
    group (reap.vllm_bench: vLLM's own benchmark, imported once, ~9 s on 2 cores; stopped with the stage on
    Ctrl-C); returns {label: the figures of each pass}."""
    passes = []
    for job in jobs:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        for c in s.concurrency:
            result = job.out_dir / f"c{c}.json"
            result.unlink(missing_ok=True)
            passes.append((job, c, result, pass_args(job.base_url, job.served, job.tokenizer, s, c, result)))
    spec = log_path.with_suffix(".passes.json")
    spec.write_text(json.dumps([args for *_, args in passes], indent=1) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the tokenizer is the local checkpoint's
    env["PYTHONPATH"] = os.pathsep.join([str(CPU_SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
    if api_key:
        env["OPENAI_API_KEY"] = api_key  # what vLLM's benchmark sends as bearer token
    levels = ", ".join(f"{c} ({s.prompts(c)} prompts)" for c in s.concurrency)
    for job in jobs:
        log(f"bench: {job.served} at concurrency {levels}, {s.input_len} tokens in, {s.output_len} out")
    with open(log_path, "a") as logf:
        proc = procs.start_group(
            [sys.executable, "-m", "reap.vllm_bench", str(spec)], stdout=logf, stderr=subprocess.STDOUT, env=env
        )
        try:
            code = proc.wait()
        finally:
            procs.stop(proc, grace=5)
    rows: dict[str, list[dict[str, Any]]] = {job.label: [] for job in jobs}
    for job, c, result, args in passes:
        if not result.is_file():
            raise BenchError(
                f"vLLM's benchmark exited with {code} before finishing concurrency {c} against {job.base_url}: "
                f"{log_cause(log_path)} (log: {log_path})"
            )
        row = summarize(json.loads(result.read_text()), args)
        if row["completed"] == 0 or row["failed"]:
            raise BenchError(
                f"{job.served}: {row['failed']} of {row['num_prompts']} requests failed at concurrency {c}; the "
                f"server's log says why (bench log: {log_path})"
            )
        log(
            f"bench: {job.served} c={c}: {row['output_throughput']:.1f} output tok/s, "
            f"TTFT {row['ttft_ms']['mean']:.1f} ms, TPOT {row['tpot_ms']['mean']:.2f} ms"
        )
        rows[job.label].append(row)
    return rows


def ratios(quantized: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """W4A16 / bf16 per concurrency measured on both: output throughput (higher is better) and mean TPOT
    and TTFT (lower is better)."""
    base = {r["concurrency"]: r for r in baseline}
    out = []
    for q in quantized:
        b = base.get(q["concurrency"])
        if b and b["output_throughput"]:
            out.append(
                {
                    "concurrency": q["concurrency"],
                    "output_throughput": round(q["output_throughput"] / b["output_throughput"], 3),
                    "mean_tpot_ms": round(q["tpot_ms"]["mean"] / b["tpot_ms"]["mean"], 3)
                    if b["tpot_ms"]["mean"]
                    else None,
                    "mean_ttft_ms": round(q["ttft_ms"]["mean"] / b["ttft_ms"]["mean"], 3)
                    if b["ttft_ms"]["mean"]
                    else None,
                }
            )
    return out


def checkpoint_bytes(folder: Path) -> int | None:
    files = list(Path(folder).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def bench(
    run_path: Path,
    *,
    endpoint: str | None = None,
    baseline: bool = False,
    concurrency: tuple[int, ...] | None = None,
    input_len: int | None = None,
    output_len: int | None = None,
    num_prompts: int | None = None,
    port: int = 8000,
    vllm_args: tuple[str, ...] = (),
    pool: ServerPool | None = None,
) -> dict[str, Any]:
    """Benchmark a run's checkpoint (and with `baseline`, its bf16 source) as the run's `bench` stage. `pool`:
    `reap run`'s servers: one its eval stage left running is measured first, not started again."""
    run = existing_run(run_path)
    manifest = run.read_manifest()
    build = manifest.get("stages", {}).get("build", {})
    if build.get("status") != "done":
        raise InputError(f"{run.root} has no finished build; run `reap build` first")
    settings = settings_for(bool(visible_gpus()), concurrency, input_len, output_len, num_prompts)
    given = None
    if endpoint:  # refused before the stage opens: nothing answers, or it serves another model
        if vllm_args and not baseline:
            raise InputError("flags after `--` go to the servers reap starts; with --endpoint alone it starts none")
        given = normalize_endpoint(endpoint)[0]
        require_served(given, manifest["name"], os.environ.get("VLLM_API_KEY"))
    source = Path(build["source"])
    if baseline and not (source / "config.json").is_file():
        raise InputError(f"the bf16 source of this build, {source}, is gone; restore it or leave --baseline out")
    host = urllib.parse.urlsplit(given).hostname if given else "127.0.0.1"
    with (
        contextlib.ExitStack() as own,
        run.stage(
            "bench",
            checkpoint=run.model_id(),
            settings=asdict(settings),
            vllm_version=vllm_version(),
            hardware=hardware_inventory() if host in LOOPBACK else None,  # an endpoint elsewhere: not this host
            sizes={"quantized": checkpoint_bytes(run.model_dir), "source": checkpoint_bytes(source)},
            results=[],
        ) as rec,
    ):
        opts = ServeOptions(port=port, extra_args=list(vllm_args))
        pool = pool or own.enter_context(ServerPool())  # `reap bench` alone: its own servers, stopped after
        entries = {"quantized": rec}
        if baseline:
            entries["baseline"] = rec["baseline"] = {"model_id": build.get("source_id"), "results": []}

        def measure(side: list[tuple[str, str, Target]], api_key: str | None) -> None:
            """The passes against the servers of `side`, (label, base URL, target) each, in one process."""
            log_path = run.logs_dir / f"bench-{'-'.join(label for label, _, _ in side)}.log"
            log_path.unlink(missing_ok=True)
            jobs = [Job(lb, url, t.served_name, t.model_dir, run.root / "bench" / lb) for lb, url, t in side]
            for label, rows in run_passes(jobs, settings, log_path, api_key).items():
                entries[label]["results"] = rows
            rec.save()

        sides = dict(targets(run, manifest, baseline))
        if given:
            rec["endpoint"] = given
            measure([("quantized", given, sides.pop("quantized"))], os.environ.get("VLLM_API_KEY"))
        # the checkpoint a pooled server serves now first: the other one replaces it after
        pairs = sorted(sides.items(), key=lambda lt: not pool.running(lt[1], opts))
        reused = {label for label, t in pairs if pool.running(t, opts)}  # started by `reap run`'s eval stage
        # CPU servers this host holds side by side start at once and are measured by one benchmark process;
        # else (GPUs) one server at a time, each its own process
        pool.prestart([(t, opts, f"serve-bench-{label}.log") for label, t in pairs])
        rounds = [pairs] if all(pool.running(t, opts) for _, t in pairs) else [[p] for p in pairs]
        for round_ in rounds:
            side: list[tuple[str, str, Target]] = []
            for label, target in round_:
                with pool.serving(target, opts, f"serve-bench-{label}.log") as srv:
                    entries[label]["server"] = {**srv.record(), "reused": label in reused}
                    rec.save()
                    side.append((label, srv.base_url, target))
            if side:  # the servers of one pool share their options, so their API key
                measure(side, srv.api_key)
        if baseline:
            rec["ratio"] = ratios(rec["results"], rec["baseline"]["results"])
    return rec


def describe(record: dict[str, Any]) -> str:
    """The figures as aligned text for the terminal."""
    lines = []
    for label, rows in (("W4A16", record["results"]), ("bf16", (record.get("baseline") or {}).get("results", []))):
        for r in rows:
            lines.append(
                f"{label:<6} c={r['concurrency']:<4} {r['output_throughput']:>10.1f} output tok/s  "
                f"TTFT {r['ttft_ms']['mean']:>9.1f} ms  TPOT {r['tpot_ms']['mean']:>8.2f} ms  "
                f"{r['completed']}/{r['num_prompts']} ok"
            )
    for r in record.get("ratio", []):
        lines.append(f"ratio  c={r['concurrency']:<4} W4A16 / bf16 output tok/s {r['output_throughput']:.2f}x")
    return "\n".join(lines)
