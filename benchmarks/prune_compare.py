"""REAP against its baselines, same ratio, same eval, over several trained models.

Prunes each source at each ratio with every method (`random` with several seeds) through `reap.prune.prune`,
the code path of `reap prune`, then scores each pruned checkpoint on the held-out split of the demo tasks in
transformers (`reap.demo.score_heldout`: `larger` by loglikelihood, `reverse` by greedy exact match, the scoring
`reap demo-model` reports). The suite score is the mean of the two tasks; "kept" is that score over the
unpruned source's. Give several sources (demo models trained with different seeds) to see how much of an
ordering is the model and how much the method: the summary gives, per ratio and method, the mean and spread of
"kept" over the sources, and each method's paired difference to REAP (same source, same ratio) with its spread.
Prints Markdown tables; `--json` also writes every number.

    python benchmarks/prune_compare.py runs/demo-source [MORE_SOURCES...] --out runs/prune-compare
        [--ratios 0.25 0.5] [--random-seeds 5] [--limit N] [--json FILE] [--threads 1]
    python benchmarks/prune_compare.py --merge a.json b.json     # one summary over earlier runs

docs/benchmarks.md's wide-MoE table comes from benchmarks/gpu_prune_compare.sh (three 32-expert top-4 demo
models trained with a load-balancing loss, one GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean, stdev


def score(model_dir: Path, limit: int | None, device: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from reap.demo import score_heldout

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
    acc = score_heldout(model, AutoTokenizer.from_pretrained(str(model_dir)), limit=limit)
    return dict(acc, suite=mean(acc.values()))


def spread(values: list[float]) -> str:
    """`mean ± sd (min-max, n)` of a list of fractions, in percent."""
    sd = stdev(values) if len(values) > 1 else 0.0
    return f"{mean(values):.1%} ± {sd:.1%} ({min(values):.1%}-{max(values):.1%}, n={len(values)})"


def summarize(rows: list[dict], sources: list[str], ratios: list[float], methods: list[str]) -> dict:
    """Per ratio and method: every `kept` value (random: every seed of every source), and the paired difference
    to REAP per source (random: its mean over seeds)."""
    out: dict[str, dict] = {}
    for ratio in ratios:
        per: dict[str, dict] = {}
        for method in methods:
            kept = [r["kept"] for r in rows if r["ratio"] == ratio and r["method"] == method]
            by_source = [
                mean(r["kept"] for r in rows if r["ratio"] == ratio and r["method"] == method and r["source"] == s)
                for s in sources
            ]
            per[method] = {"kept": kept, "kept_per_source": by_source}
        for method in methods:
            per[method]["reap_minus_this"] = [
                a - b for a, b in zip(per["reap"]["kept_per_source"], per[method]["kept_per_source"], strict=True)
            ]
        out[str(ratio)] = per
    return out


def report(unpruned: dict[str, dict], rows: list[dict]) -> tuple[dict, str]:
    """The summary and its Markdown table, for rows of any number of sources."""
    sources = list(unpruned)
    ratios = sorted({r["ratio"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = summarize(rows, sources, ratios, methods)
    lines = [f"unpruned {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in unpruned[s].items()) for s in sources]
    lines += ["", "| dropped | method | kept of source: mean ± sd (min-max, n) | REAP minus it, per source |"]
    lines.append("|---|---|---|---|")
    for ratio in ratios:
        for method in methods:
            s = summary[str(ratio)][method]
            diff = "" if method == "reap" else spread(s["reap_minus_this"]).replace("%", " pt")
            lines.append(f"| {ratio:.0%} | {method} | {spread(s['kept'])} | {diff} |")
    return summary, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", type=Path, nargs="*", help="demo checkpoints (reap demo-model), e.g. several seeds")
    ap.add_argument("--merge", type=Path, nargs="+", help="instead: one summary of the --json files of earlier runs")
    ap.add_argument("--out", type=Path, help="folder for the pruned checkpoints")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["reap", "frequency", "ean"])
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--limit", type=int, help="held-out rows per task (default: all 300)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--device", help="cuda or cpu (default: cuda where visible)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a busy 2-core machine, 2 threads made scoring ~40x slower)",
    )
    args = ap.parse_args()
    if args.merge:
        unpruned, rows = {}, []
        for f in args.merge:
            data = json.loads(f.read_text())
            unpruned.update(data["sources"])
            rows += data["rows"]
        print(report(unpruned, rows)[1])
        return
    if not args.sources or not args.out:
        ap.error("give one or more sources and --out (or --merge FILES)")
    if "reap" not in args.methods:
        ap.error("--methods must include reap (the others are compared with it)")

    from reap.compat import ensure_torchvision_importable
    from reap.prune import prune
    from reap.resources import data_dir

    ensure_torchvision_importable()
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    calibration = data_dir("evals") / "demo" / "data" / "calibration.jsonl"
    unpruned, rows = {}, []
    for n, src in enumerate(args.sources):
        name = f"{n}:{src.name}"
        unpruned[name] = score(src, args.limit, device)
        print(f"{name} unpruned: {unpruned[name]}", flush=True)
        for ratio in args.ratios:
            runs = [(m, 0) for m in args.methods] + [("random", s) for s in range(args.random_seeds)]
            for method, seed in runs:
                out = args.out / f"{n}-{method}-{ratio}" / (f"seed{seed}" if method == "random" else "")
                record = prune(
                    src,
                    out,
                    ratio=ratio,
                    method=method,
                    calibration=calibration,
                    seed=seed,
                    overwrite=True,
                    device=device,
                )
                acc = score(out / "model", args.limit, device)
                rows.append(
                    {
                        "source": name,
                        "ratio": ratio,
                        "method": method,
                        "seed": seed,
                        **acc,
                        "kept": acc["suite"] / unpruned[name]["suite"],
                        "experts_after": record["experts_after"],
                        "dropped": {r["layer"]: r["dropped"] for r in record["layers"]},
                    }
                )
                print(f"{name} ratio {ratio} {method:<9} seed {seed}: {acc}", flush=True)
                save(args.json, {"sources": unpruned, "rows": rows, "limit": args.limit, "device": device})
    summary, table = report(unpruned, rows)
    print(table)
    save(args.json, {"sources": unpruned, "rows": rows, "summary": summary, "limit": args.limit, "device": device})


def save(path: Path | None, data: dict) -> None:
    """Every number so far (written after each pruned model, so that a run cut short keeps what it measured)."""
    if path:
        path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
