"""Wall time of one suite with lm-eval's default endpoint settings vs `reap eval`'s, against one server.

lm-eval's defaults for `local-completions`: one request at a time (num_concurrent=1), max_length 2048.
reap's: num_concurrent=CONCURRENCY and max_length from the server. Scores must be identical (greedy).

    reap serve runs/demo --detach --port 8000
    python benchmarks/eval_speed.py runs/demo --endpoint http://127.0.0.1:8000/v1 [--limit 100] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--suite", default="demo")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    import lm_eval

    from reap.evaluate import load_suite, model_args, normalize_endpoint, preflight
    from reap.rundir import existing_run

    run = existing_run(args.run)
    served = run.read_manifest()["name"]
    base, _ = normalize_endpoint(args.endpoint)
    suite = load_suite(args.suite, None, None)
    manager, max_length = preflight(suite, base, served, None, run.root / "eval" / "bench")
    tasks = [t.name for t in suite.tasks]
    settings = {
        "lm-eval defaults": {
            "model": served,
            "base_url": base + "/completions",
            "tokenizer": str(run.model_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": False,
        },
        "reap eval": model_args("local-completions", base, served, run.model_dir, max_length, args.concurrency),
    }
    times, scores = {}, {}
    for label, margs in settings.items():
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=margs,
            tasks=tasks,
            limit=args.limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
        times[label] = time.perf_counter() - t0
        scores[label] = {
            t: {k: v for k, v in res["results"][t].items() if "stderr" not in k and k != "alias"} for t in tasks
        }
        print(f"{label:<17} {times[label]:8.1f} s  {scores[label]}", flush=True)
    a, b = times["lm-eval defaults"], times["reap eval"]
    print(
        f"speed-up: {a / b:.2f}x ({a:.1f} s -> {b:.1f} s); identical scores: "
        f"{scores['lm-eval defaults'] == scores['reap eval']}"
    )


if __name__ == "__main__":
    main()
