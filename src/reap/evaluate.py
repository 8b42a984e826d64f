"""`reap eval`: lm-eval against the served endpoint, results into the run folder, the manifest and the card.

Multiple-choice (loglikelihood) tasks go to `/v1/completions` (`local-completions`: chat endpoints cannot
return prompt logprobs); the tokenizer is the local model folder (not a Hub lookup by the served name);
`max_length` is the server's max model length (lm-eval's default 2048 silently truncates); requests run
concurrently. Each task is saved as soon as it finishes, so a failure keeps what was done (the record then
says `failed` or `interrupted`, and the card marks the results partial).

Beyond the scores (reap.quality says how each is estimated): every metric's standard error; per-document
samples, whose hashes decide whether a source result is the same measurement and which give the paired
recovery; truncated and empty answers of generation tasks; and, with a suite's `agreement` text, the top-k
prompt logprobs of each side served, stored when that side is done and compared once both are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from reap import compat, quality
from reap.errors import InputError, ReapError
from reap.resources import data_dir
from reap.rundir import RunDir, atomic_write_text, existing_run
from reap.serve import ServeOptions, ServerPool, Target, http_request
from reap.stats import log

MC_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
# Standard errors: lm-eval computes them analytically for mean metrics (acc, exact_match: no cost) and by this
# many bootstrap resamples for the others (f1, mcc, ...; bleu/chrf/ter at most 100); 0 would give none.
BOOTSTRAP_ITERS = 1000
MAX_GEN_TOKS = 256  # the generation limit of a task that sets none (lm-eval's default for API models)
# Prompts per completions request (lm-eval's batch_size; chat requests take one): fewer HTTP round trips for the
# same scores, the demo suite on one 2-core CPU server 20.5 s -> 14.9 s with identical responses.
PROMPTS_PER_REQUEST = 16
LOGPROBS_FILE = "logprobs.jsonl"


class EvalError(ReapError):
    """lm-eval could not finish; what finished is kept and marked partial."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    metric: str
    model_type: str = "local-completions"
    num_fewshot: int | None = None


@dataclass(frozen=True)
class Agreement:
    """Held-out text (a .jsonl of {"text": ...} rows) on which both sides' next-token distributions are compared,
    from the top `top_k` prompt logprobs per position."""

    data: Path
    top_k: int = 20

    def texts(self) -> list[str]:
        return [json.loads(line)["text"] for line in self.data.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[TaskSpec, ...]
    include_paths: tuple[Path, ...]
    offline: bool
    agreement: Agreement | None = None


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
    agree = data.get("agreement")
    agreement = Agreement((path.parent / agree["data"]).resolve(), int(agree.get("top_k", 20))) if agree else None
    if agreement and not agreement.data.is_file():
        raise InputError(f"suite {name}: its agreement text {agreement.data} is missing; reinstall reap")
    return Suite(name, specs, own + extra, offline=bool(data.get("offline")), agreement=agreement)


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
        "batch_size": 1 if model_type == "local-chat-completions" else PROMPTS_PER_REQUEST,
        "max_retries": 3,
        "timeout": 600,
        "max_length": max_length,
        "max_gen_toks": MAX_GEN_TOKS,
    }


def _metric(results: dict[str, Any], task: str, metric: str) -> tuple[float, float | None, str]:
    """(value, standard error or None, the filter lm-eval scored it under)."""
    row = results["results"][task]
    for key, value in row.items():
        name, _, _filter = key.partition(",")
        if name == metric:
            stderr = row.get(f"{metric}_stderr,{_filter}")
            return float(value), (float(stderr) if isinstance(stderr, (int, float)) else None), _filter
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


def task_manager(suite: Suite, tasks_dir: Path):
    """lm-eval's TaskManager for the suite: its own task folder alone where it defines every task of the suite
    (indexing lm-eval's ~14,000 built-in task YAMLs costs ~10 s on a small CPU host), else that folder and
    lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    include = prepare_include(suite.include_paths, tasks_dir)
    if include:
        own = TaskManager(include_path=str(include), include_defaults=False)
        if all(s.name in own.all_tasks for s in suite.tasks):
            return own
    return TaskManager(include_path=str(include) if include else None)


def preflight(suite: Suite, base_url: str, served: str, given_path: str | None, out_dir: Path, api_key: str | None):
    """Everything that can be refused before a request is scored: the endpoint, the served name, chat vs
    loglikelihood, unknown tasks. Returns (TaskManager, max_length)."""
    info = check_endpoint(suite, base_url, served, given_path, api_key)
    manager = task_manager(suite, out_dir / "tasks")
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
    count_tokens = token_counter(tokenizer)
    for spec in suite.tasks:
        t0 = time.perf_counter()
        shots = num_fewshot if num_fewshot is not None else spec.num_fewshot
        log(
            f"eval: {spec.name} ({spec.model_type}, {shots or 0}-shot{f', limit {limit}' if limit else ''}) on {served}"
        )
        try:
            with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints its bootstrap progress; stdout is reap's
                res = lm_eval.simple_evaluate(
                    model=spec.model_type,
                    model_args=model_args(spec.model_type, base_url, served, tokenizer, max_length, concurrency),
                    tasks=[spec.name],
                    num_fewshot=shots,
                    limit=limit,
                    log_samples=True,
                    task_manager=manager,
                    apply_chat_template=spec.model_type == "local-chat-completions",
                    bootstrap_iters=BOOTSTRAP_ITERS,
                )
        except Exception as exc:  # lm-eval raises plain exceptions (connection refused, retries exhausted)
            raise EvalError(
                f"{spec.name} failed against {base_url}: {type(exc).__name__}: "
                + (str(exc).splitlines()[0] if str(exc) else "")
            ) from exc
        value, stderr, filter_ = _metric(res, spec.name, spec.metric)
        samples = res.pop("samples", {}).get(spec.name, [])
        atomic_write_text(out_dir / f"{spec.name}.json", json.dumps(res, indent=2, default=str) + "\n")
        samples_text = "".join(json.dumps(s, default=str) + "\n" for s in samples)
        atomic_write_text(out_dir / f"{spec.name}.samples.jsonl", samples_text)
        scored = quality.of_filter(samples, filter_)
        task_cfg = (res.get("configs") or {}).get(spec.name) or {}
        summary[spec.name] = {
            "metric": spec.metric,
            "value": value,
            "stderr": stderr,
            "filter": filter_,
            "split": task_cfg.get("test_split") or task_cfg.get("validation_split"),  # the one lm-eval scored
            "num_fewshot": shots or 0,
            "limit": limit,
            "model_type": spec.model_type,
            "n": len(scored),
            "items": quality.items_digest(scored),  # the documents, prompts and targets scored
            "samples_sha256": sha256(samples_text),
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        if task_cfg.get("output_type") == "generate_until":
            summary[spec.name]["generation"] = quality.generation_checks(scored, count_tokens, MAX_GEN_TOKS)
        log(f"eval: {spec.name} {spec.metric} = {value:.4f} ({summary[spec.name]['wall_s']} s)")
        if on_task:
            on_task(summary)
    return summary


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def token_counter(tokenizer: Path):
    """Length in tokens of a text, with the model's tokenizer (loaded on first use)."""
    loaded = []

    def count(text: str) -> int:
        if not loaded:
            from transformers import AutoTokenizer

            loaded.append(AutoTokenizer.from_pretrained(str(tokenizer)))
        return len(loaded[0](text, add_special_tokens=False)["input_ids"])

    return count


def read_verified(path: Path, expected_sha256: str | None) -> list[dict[str, Any]] | None:
    """The JSON lines of a file this stage wrote, or None when it is missing or no longer what was recorded."""
    if not expected_sha256 or not path.is_file():
        return None
    text = path.read_text()
    if sha256(text) != expected_sha256:
        return None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def capture_logprobs(
    base_url: str, served: str, texts: list[str], top_k: int, *, api_key: str | None = None, concurrency: int = 8
) -> list[dict[str, Any]]:
    """Per text, from `/v1/completions` (echo, top-k logprobs, tokens as ids): its token ids, and for every
    token after the first its logprob and the top-k next tokens at its position as [id, logprob] pairs."""

    def one(text: str) -> dict[str, Any]:
        body = {
            "model": served,
            "prompt": text,
            "max_tokens": 0,  # with echo: the prompt's logprobs only, nothing generated
            "temperature": 0,
            "echo": True,
            "logprobs": top_k,
            "return_tokens_as_token_ids": True,
        }
        code, raw = http_request(f"{base_url}/completions", timeout=600, body=body, api_key=api_key)
        if code != 200:
            raise EvalError(
                f"{base_url}/completions gave no prompt logprobs (HTTP {code or 'no answer'}: "
                f"{raw.decode(errors='replace')[:300]}); the agreement text must fit the server's max_model_len "
                f"and top_k ({top_k}) its --max-logprobs"
            )
        out = json.loads(raw)
        n = out["usage"]["prompt_tokens"]
        lp = out["choices"][0]["logprobs"]
        return {
            "tokens": [_token_id(t) for t in lp["tokens"][:n]],
            "logprobs": lp["token_logprobs"][1:n],
            "top": [[[_token_id(t), v] for t, v in top.items()] for top in lp["top_logprobs"][1:n]],
        }

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, texts))


def record_logprobs(
    agreement: Agreement,
    base_url: str,
    served: str,
    out_dir: Path,
    *,
    limit: int | None,
    api_key: str | None,
    concurrency: int,
    held_out_checked: bool,
) -> dict[str, Any]:
    """Capture one side's prompt logprobs of the agreement text (its first `limit` rows, like a task's documents)
    into `out_dir`; returns what the record keeps."""
    t0 = time.perf_counter()
    texts = agreement.texts()[:limit]
    docs = capture_logprobs(base_url, served, texts, agreement.top_k, api_key=api_key, concurrency=concurrency)
    text = "".join(json.dumps(d) + "\n" for d in docs)
    atomic_write_text(out_dir / LOGPROBS_FILE, text)
    log(f"eval: prompt logprobs of {len(docs)} held-out texts from {served} ({time.perf_counter() - t0:.1f} s)")
    return {
        "data": agreement.data.name,
        "data_sha256": sha256(agreement.data.read_text()),
        "top_k": agreement.top_k,
        "docs": len(docs),
        "sha256": sha256(text),
        "held_out_checked": held_out_checked,
    }


def held_out_check(agreement: Agreement, manifest: dict[str, Any]) -> bool:
    """Whether the agreement text was compared with the build's calibration file (only a local .jsonl can be);
    refuses text that shares a row with it."""
    calibration = Path(manifest.get("recipe", {}).get("quantize", {}).get("dataset") or "")
    if calibration.suffix != ".jsonl" or not calibration.is_file():
        return False
    rows = {json.loads(line).get("text") for line in calibration.read_text().splitlines() if line.strip()}
    common = sum(t in rows for t in agreement.texts())
    if common:
        raise InputError(
            f"the suite's agreement text {agreement.data.name} shares {common} row(s) with the calibration data "
            f"{calibration.name}; token-level agreement must be measured on held-out text"
        )
    return True


def _scores(folder: Path, task: str, result: dict[str, Any]) -> dict[str, float] | None:
    samples = read_verified(folder / f"{task}.samples.jsonl", result.get("samples_sha256"))
    if samples is None:
        return None
    return quality.item_scores(quality.of_filter(samples, result["filter"]), result["metric"])


def paired(eval_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """{task: paired recovery} for the tasks whose source result is the same measurement (quality.MEASURE:
    task, metric, limit, few-shot count, request type, documents), from both sides' samples."""
    base = (record.get("baseline") or {}).get("results") or {}
    out = {}
    for task, r in record["results"].items():
        b = base.get(task)
        if not b or any(r.get(k) != b.get(k) for k in quality.MEASURE):
            continue
        q, s = _scores(eval_dir / "quantized", task, r), _scores(eval_dir / "baseline", task, b)
        stats = quality.paired_recovery(q, s) if q and s else None
        if stats:
            out[task] = stats
    return out


def agreement_of(eval_dir: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """Token-level agreement of the two sides' captures of the same text with the same top-k, else None."""
    q, b = record.get("logprobs"), (record.get("baseline") or {}).get("logprobs")
    if not q or not b or any(q[k] != b[k] for k in ("data_sha256", "top_k", "docs")):
        return None
    mine = read_verified(eval_dir / "quantized" / LOGPROBS_FILE, q["sha256"])
    theirs = read_verified(eval_dir / "baseline" / LOGPROBS_FILE, b["sha256"])
    if mine is None or theirs is None or len(mine) != len(theirs):
        return None
    return {
        "data": q["data"],
        "top_k": q["top_k"],
        "held_out_checked": q.get("held_out_checked", False),
        **quality.compare_logprobs(theirs, mine),
    }


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
    checked = held_out_check(suite.agreement, manifest) if suite.agreement else False
    if given_endpoint:  # a server that is not there, or serves another model, is refused before the stage opens
        check_endpoint(suite, given_endpoint[0], manifest["name"], given_endpoint[1], os.environ.get("VLLM_API_KEY"))
    previous = (manifest.get("stages", {}).get("eval") or {}).get("baseline") or {}
    with (
        contextlib.ExitStack() as own,
        run.stage(
            "eval",
            checkpoint=run.model_id(),
            suite=suite.name,
            lm_eval_version=metadata.version("lm_eval"),
            concurrency=concurrency,
            prompts_per_request=PROMPTS_PER_REQUEST,
            results={},
        ) as record,
    ):
        if baseline:
            record["baseline"] = {"model_id": build.get("source_id"), "results": {}}
        elif previous.get("results") and previous.get("model_id") == build.get("source_id"):
            record["baseline"] = previous  # the source did not change: keep its scores (and its logprobs)
        eval_dir = run.root / "eval"
        # token-level agreement needs a source side: measured now, or kept with its logprobs
        compare_tokens = suite.agreement and (baseline or "logprobs" in (record.get("baseline") or {}))

        def measure(label: str, base_url: str, served: str, model_dir: Path, given_path, api_key) -> None:
            side = record["baseline"] if label == "baseline" else record

            def on_task(summary: dict[str, Any]) -> None:
                side["results"] = dict(summary)
                record.save()

            run_suite(
                suite,
                base_url,
                served,
                model_dir,
                eval_dir / label,
                limit=limit,
                num_fewshot=num_fewshot,
                concurrency=concurrency,
                given_path=given_path,
                api_key=api_key,
                on_task=on_task,
            )
            if compare_tokens:  # this side's logprobs are stored now; compared once both sides are
                side["logprobs"] = record_logprobs(
                    suite.agreement,
                    base_url,
                    served,
                    eval_dir / label,
                    limit=limit,
                    api_key=api_key,
                    concurrency=concurrency,
                    held_out_checked=checked,
                )
                record.save()

        pool = pool or own.enter_context(ServerPool())  # `reap eval` alone: its own servers, stopped after
        served = [
            (label, t, bool(given_endpoint and label == "quantized")) for label, t in targets(run, manifest, baseline)
        ]
        # where they fit side by side (CPU servers), all start at once: two start-ups take as long as one
        pool.prestart(
            [(t, ServeOptions(port=port), f"serve-{label}.log") for label, t, at_endpoint in served if not at_endpoint]
        )
        for label, target, at_endpoint in served:
            if at_endpoint:
                base, given = given_endpoint
                record["endpoint"] = base
                measure(label, base, target.served_name, target.model_dir, given, os.environ.get("VLLM_API_KEY"))
                continue
            with pool.serving(target, ServeOptions(port=port), f"serve-{label}.log") as srv:
                (record["baseline"] if label == "baseline" else record)["server"] = srv.record()  # kernels, start-up
                record.save()
                measure(label, srv.base_url, target.served_name, target.model_dir, None, srv.api_key)
        record["paired"] = paired(eval_dir, record)
        record["agreement"] = agreement_of(eval_dir, record)
    return record
