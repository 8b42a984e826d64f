"""`reap eval`: lm-eval against the served endpoint, results into the run folder, the manifest and the card.

Multiple-choice (loglikelihood) tasks go to `/v1/completions` (`local-completions`: chat endpoints cannot
return prompt logprobs); the tokenizer is the local model folder (not a Hub lookup by the served name);
`max_length` is the server's max model length (lm-eval's default 2048 silently truncates); requests run
concurrently. Each task is saved as soon as it finishes, so a failure keeps what was done (the record then
says `failed` or `interrupted`, and the card marks the results partial).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from reap import compat
from reap.errors import InputError, ReapError
from reap.resources import data_dir
from reap.rundir import RunDir, atomic_write_text, existing_run
from reap.serve import ServeOptions, ServerPool, Target, http_request, serving
from reap.stats import log

MC_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")


class EvalError(ReapError):
    """lm-eval could not finish; what finished is kept and marked partial."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    metric: str
    model_type: str = "local-completions"
    num_fewshot: int | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[TaskSpec, ...]
    include_paths: tuple[Path, ...]
    offline: bool


def load_suite(name: str | None, tasks: str | None, include_path: Path | None) -> Suite:
    """A suite from evals/suites/NAME.yaml, or explicit comma-separated tasks (metric `acc` unless given
    as task:metric), plus the user's own task folder."""
    extra = (Path(include_path),) if include_path else ()
    for p in extra:
        if not p.is_dir():
            raise InputError(f"--include-path {p} is not a folder of lm-eval task YAMLs")
    if tasks:
        specs = []
        for item in tasks.split(","):
            task, _, metric = item.strip().partition(":")
            specs.append(TaskSpec(task, metric or "acc"))
        return Suite("custom", tuple(specs), extra, offline=bool(extra))
    suites = data_dir("evals") / "suites"
    path = suites / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in suites.glob("*.yaml")))
        raise InputError(f"unknown suite {name!r}; known suites: {known} (or pass --tasks a,b)")
    data = yaml.safe_load(path.read_text())
    fewshot = data.get("num_fewshot")
    specs = tuple(
        TaskSpec(t["name"], t["metric"], t.get("model_type", "local-completions"), t.get("num_fewshot", fewshot))
        for t in data["tasks"]
    )
    own = ((path.parent / data["include_path"]).resolve(),) if data.get("include_path") else ()
    return Suite(name, specs, own + extra, offline=bool(data.get("offline")))


def prepare_include(paths: tuple[Path, ...], dest: Path) -> Path | None:
    """Copy task YAMLs into `dest` with relative `data_files` made absolute (lm-eval reads them relative to
    the current directory, not to the YAML)."""
    if not paths:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for folder in paths:
        for f in folder.glob("*.yaml"):
            cfg = yaml.safe_load(f.read_text())
            files = (cfg.get("dataset_kwargs") or {}).get("data_files")
            if isinstance(files, dict):
                cfg["dataset_kwargs"]["data_files"] = {
                    k: str((folder / v).resolve()) if not os.path.isabs(v) else v for k, v in files.items()
                }
            (dest / f.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def normalize_endpoint(url: str) -> tuple[str, str | None]:
    """(base URL ending in /v1, the API path the user gave if any). Refuses what is not an http(s) URL."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InputError(f"--endpoint {url!r} is not an http(s) URL; give the server's, e.g. http://127.0.0.1:8000/v1")
    url = url.strip().rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            return url[: -len(suffix)], suffix
    return url, None


def endpoint_models(base_url: str, api_key: str | None) -> list[dict[str, Any]]:
    code, body = http_request(f"{base_url}/models", timeout=10, api_key=api_key)
    if code == 401:
        raise EvalError(
            f"the server at {base_url} refused the API key (HTTP 401); set VLLM_API_KEY to the key it was started with"
        )
    try:
        models = json.loads(body)["data"]
        if isinstance(models, list) and all(isinstance(m, dict) for m in models):
            return models
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        pass
    raise EvalError(
        f"no OpenAI-compatible server answers at {base_url}/models (HTTP {code or 'no answer'}); "
        "start one with `reap serve RUN --detach` or leave --endpoint out"
    )


def model_args(
    model_type: str, base_url: str, served: str, tokenizer: Path, max_length: int, concurrency: int
) -> dict[str, Any]:
    path = "/chat/completions" if model_type == "local-chat-completions" else "/completions"
    return {
        "model": served,
        "base_url": base_url + path,
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": False,
        "num_concurrent": concurrency,
        "max_retries": 3,
        "timeout": 600,
        "max_length": max_length,
    }


def _metric(results: dict[str, Any], task: str, metric: str) -> tuple[float, float | None]:
    row = results["results"][task]
    for key, value in row.items():
        name, _, _filter = key.partition(",")
        if name == metric:
            stderr = row.get(f"{metric}_stderr,{_filter}")
            return float(value), (float(stderr) if isinstance(stderr, (int, float)) else None)
    raise EvalError(f"lm-eval gave no {metric!r} for {task}; metrics there: {sorted(row)}")


def check_endpoint(
    suite: Suite, base_url: str, served: str, given_path: str | None, api_key: str | None
) -> dict[str, Any]:
    """The endpoint answers, serves `served`, and can score the suite (chat vs loglikelihood); returns what
    /v1/models says of the served model."""
    for spec in suite.tasks:
        if given_path == "/chat/completions" and spec.model_type == "local-completions":
            raise EvalError(
                f"{spec.name} is scored by loglikelihood, which chat endpoints cannot return; pass the "
                f"server's /v1 URL (or /v1/completions) as --endpoint"
            )
    return require_served(base_url, served, api_key)


def require_served(base_url: str, served: str, api_key: str | None) -> dict[str, Any]:
    """What /v1/models says of `served`; refused in one line when nothing answers or another model is served."""
    models = endpoint_models(base_url, api_key)
    info = next((m for m in models if m.get("id") == served), None)
    if info is None:
        raise EvalError(f"the server at {base_url} serves {[m.get('id') for m in models]}, not {served!r}")
    return info


def preflight(suite: Suite, base_url: str, served: str, given_path: str | None, out_dir: Path, api_key: str | None):
    """Everything that can be refused before a request is scored: the endpoint, the served name, chat vs
    loglikelihood, unknown tasks. Returns (TaskManager, max_length)."""
    info = check_endpoint(suite, base_url, served, given_path, api_key)
    from lm_eval.tasks import TaskManager

    include = prepare_include(suite.include_paths, out_dir / "tasks")
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [s.name for s in suite.tasks if s.name not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {unknown}; check the name or pass --include-path with its YAML")
    return manager, int(info.get("max_model_len") or 2048)


def run_suite(
    suite: Suite,
    base_url: str,
    served: str,
    tokenizer: Path,
    out_dir: Path,
    *,
    limit: int | None,
    num_fewshot: int | None,
    concurrency: int,
    given_path: str | None,
    api_key: str | None = None,
    on_task=None,
) -> dict[str, Any]:
    """Evaluate every task of the suite against one endpoint; returns {task: summary}. An offline suite runs
    with the Hub offline, and a protected server gets `api_key`, both for this call only (compat.scoped_env):
    a later stage of the same process (publish) sees neither."""
    with (
        compat.hub_offline() if suite.offline else contextlib.nullcontext(),
        compat.scoped_env({"OPENAI_API_KEY": api_key} if api_key else {}),  # lm-eval's local-completions reads it
    ):
        return _run_suite(
            suite,
            base_url,
            served,
            tokenizer,
            out_dir,
            limit=limit,
            num_fewshot=num_fewshot,
            concurrency=concurrency,
            given_path=given_path,
            api_key=api_key,
            on_task=on_task,
        )


def _run_suite(
    suite: Suite,
    base_url: str,
    served: str,
    tokenizer: Path,
    out_dir: Path,
    *,
    limit: int | None,
    num_fewshot: int | None,
    concurrency: int,
    given_path: str | None,
    api_key: str | None,
    on_task,
) -> dict[str, Any]:
    manager, max_length = preflight(suite, base_url, served, given_path, out_dir, api_key)
    import lm_eval

    summary: dict[str, Any] = {}
    for spec in suite.tasks:
        t0 = time.perf_counter()
        shots = num_fewshot if num_fewshot is not None else spec.num_fewshot
        log(
            f"eval: {spec.name} ({spec.model_type}, {shots or 0}-shot{f', limit {limit}' if limit else ''}) on {served}"
        )
        try:
            res = lm_eval.simple_evaluate(
                model=spec.model_type,
                model_args=model_args(spec.model_type, base_url, served, tokenizer, max_length, concurrency),
                tasks=[spec.name],
                num_fewshot=shots,
                limit=limit,
                log_samples=True,
                task_manager=manager,
                apply_chat_template=spec.model_type == "local-chat-completions",
                bootstrap_iters=0,
            )
        except Exception as exc:  # lm-eval raises plain exceptions (connection refused, retries exhausted)
            raise EvalError(
                f"{spec.name} failed against {base_url}: {type(exc).__name__}: "
                + (str(exc).splitlines()[0] if str(exc) else "")
            ) from exc
        value, stderr = _metric(res, spec.name, spec.metric)
        samples = res.pop("samples", {})
        atomic_write_text(out_dir / f"{spec.name}.json", json.dumps(res, indent=2, default=str) + "\n")
        atomic_write_text(
            out_dir / f"{spec.name}.samples.jsonl",
            "".join(json.dumps(s, default=str) + "\n" for s in samples.get(spec.name, [])),
        )
        task_cfg = (res.get("configs") or {}).get(spec.name) or {}
        summary[spec.name] = {
            "metric": spec.metric,
            "value": value,
            "stderr": stderr,
            "split": task_cfg.get("test_split") or task_cfg.get("validation_split"),  # the one lm-eval scored
            "num_fewshot": shots or 0,
            "limit": limit,
            "model_type": spec.model_type,
            "n": len(samples.get(spec.name, [])),
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        log(f"eval: {spec.name} {spec.metric} = {value:.4f} ({summary[spec.name]['wall_s']} s)")
        if on_task:
            on_task(summary)
    return summary


def targets(run: RunDir, manifest: dict[str, Any], baseline: bool) -> list[tuple[str, Any]]:
    """(label, what is served) for the quantized build and, with `baseline`, its bf16 source: both served with
    the recipe's `serve:` section (tensor parallel size, max_model_len, ...)."""
    name, build = manifest["name"], manifest["stages"]["build"]
    out = [("quantized", Target(run.model_dir, name, run, manifest))]
    if baseline:
        serve_only = {"recipe": {"serve": manifest.get("recipe", {}).get("serve", {})}}
        out.append(("baseline", Target(Path(build["source"]), f"{name}-source", run, serve_only)))
    return out


def evaluate(
    run_path: Path,
    *,
    endpoint: str | None = None,
    suite_name: str | None = "demo",
    tasks: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    concurrency: int = 8,
    include_path: Path | None = None,
    baseline: bool = False,
    port: int = 8000,
    pool: ServerPool | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint (and with `baseline`, its bf16 source) as the run's `eval` stage: the record
    names the checkpoint measured (`model_id`; the baseline's, the source's). A baseline measured before on
    the same source is kept when `baseline` is not asked for again. `pool`: `reap run`'s servers, kept for
    its bench stage."""
    run = existing_run(run_path)
    manifest = run.read_manifest()
    build = manifest.get("stages", {}).get("build", {})
    if build.get("status") != "done":
        raise InputError(f"{run.root} has no finished build; run `reap build` first")
    given_endpoint = normalize_endpoint(endpoint) if endpoint else None
    suite = load_suite(suite_name, tasks, include_path)
    if given_endpoint:  # a server that is not there, or serves another model, is refused before the stage opens
        check_endpoint(suite, given_endpoint[0], manifest["name"], given_endpoint[1], os.environ.get("VLLM_API_KEY"))
    previous = (manifest.get("stages", {}).get("eval") or {}).get("baseline") or {}
    with run.stage(
        "eval",
        checkpoint=run.model_id(),
        suite=suite.name,
        lm_eval_version=metadata.version("lm_eval"),
        concurrency=concurrency,
        results={},
    ) as record:
        if baseline:
            record["baseline"] = {"model_id": build.get("source_id"), "results": {}}
        elif previous.get("results") and previous.get("model_id") == build.get("source_id"):
            record["baseline"] = previous  # the source did not change: keep its scores

        def save(label: str):
            def on_task(summary: dict[str, Any]) -> None:
                (record["baseline"] if label == "baseline" else record)["results"] = dict(summary)
                record.save()

            return on_task

        for label, target in targets(run, manifest, baseline):
            out_dir = run.root / "eval" / label
            if given_endpoint and label == "quantized":
                base, given = given_endpoint
                record["endpoint"] = base
                run_suite(
                    suite,
                    base,
                    target.served_name,
                    target.model_dir,
                    out_dir,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    concurrency=concurrency,
                    given_path=given,
                    api_key=os.environ.get("VLLM_API_KEY"),
                    on_task=save(label),
                )
                continue
            with serving(target, ServeOptions(port=port), f"serve-{label}.log", pool) as srv:
                (record["baseline"] if label == "baseline" else record)["server"] = srv.record()  # kernels, start-up
                record.save()
                run_suite(
                    suite,
                    srv.base_url,
                    target.served_name,
                    target.model_dir,
                    out_dir,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    concurrency=concurrency,
                    given_path=None,
                    api_key=srv.api_key,
                    on_task=save(label),
                )
    return record
