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

The sources of docs/benchmarks.md's wide-MoE table (on a GPU, where `reap demo-model` trains there):

    for s in 0 1 2; do reap demo-model runs/wide-$s --experts 32 --top-k 4 --aux-loss 0.01 --seed $s; done
    python benchmarks/prune_compare.py runs/wide-0 runs/wide-1 runs/wide-2 --out runs/prune-compare
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", type=Path, nargs="+", help="demo checkpoints (reap demo-model), e.g. several seeds")
    ap.add_argument("--out", type=Path, required=True, help="folder for the pruned checkpoints")
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
    methods = [*args.methods, "random"]
    sources, unpruned, rows = [], {}, []
    for n, src in enumerate(args.sources):
        name = f"{n}:{src.name}"
        sources.append(name)
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
    summary = summarize(rows, sources, args.ratios, methods)

    lines = [f"unpruned {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in unpruned[s].items()) for s in sources]
    lines += ["", "| dropped | method | kept of source: mean ± sd (min-max, n) | REAP minus it, per source |"]
    lines.append("|---|---|---|---|")
    for ratio in args.ratios:
        for method in methods:
            s = summary[str(ratio)][method]
            diff = "" if method == "reap" else spread(s["reap_minus_this"]).replace("%", " pt")
            lines.append(f"| {ratio:.0%} | {method} | {spread(s['kept'])} | {diff} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"sources": unpruned, "rows": rows, "summary": summary, "limit": args.limit, "device": device},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
