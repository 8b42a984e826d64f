"""REAP against its baselines on the demo model, same ratio, same eval.

Prunes the demo source at each ratio with every method (`random` with several seeds) through `reap.prune.prune`,
the code path of `reap prune`, then scores each pruned checkpoint on the held-out split of the demo tasks in
transformers (`reap.demo.score_heldout`: `larger` by loglikelihood, `reverse` by greedy exact match, the scoring
`reap demo-model` reports). The suite score is the mean of the two tasks; "kept" is that score over the
unpruned source's. Prints a Markdown table; `--json` also writes every number.

    python benchmarks/prune_compare.py runs/demo-source --out runs/prune-compare [--ratios 0.25 0.5]
        [--random-seeds 5] [--limit N] [--json FILE] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean


def score(model_dir: Path, limit: int | None) -> dict[str, float]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from reap.demo import score_heldout

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    acc = score_heldout(model, AutoTokenizer.from_pretrained(str(model_dir)), limit=limit)
    return dict(acc, suite=mean(acc.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for the pruned checkpoints")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["reap", "frequency", "ean"])
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--limit", type=int, help="held-out rows per task (default: all 300)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a busy 2-core machine, 2 threads made scoring ~40x slower)",
    )
    args = ap.parse_args()

    from reap.compat import ensure_torchvision_importable
    from reap.prune import prune
    from reap.resources import data_dir

    ensure_torchvision_importable()
    import torch

    torch.set_num_threads(args.threads)
    calibration = data_dir("evals") / "demo" / "data" / "calibration.jsonl"
    source = score(args.source, args.limit)
    rows = []
    for ratio in args.ratios:
        runs = [(m, 0) for m in args.methods] + [("random", s) for s in range(args.random_seeds)]
        for method, seed in runs:
            out = args.out / (f"{method}-{ratio}" + (f"-seed{seed}" if method == "random" else ""))
            record = prune(
                args.source, out, ratio=ratio, method=method, calibration=calibration, seed=seed, overwrite=True
            )
            acc = score(out / "model", args.limit)
            rows.append(
                {
                    "ratio": ratio,
                    "method": method,
                    "seed": seed,
                    **acc,
                    "kept": acc["suite"] / source["suite"],
                    "experts_after": record["experts_after"],
                    "dropped": {r["layer"]: r["dropped"] for r in record["layers"]},
                }
            )
            print(f"ratio {ratio} {method:<9} seed {seed}: {acc}", flush=True)
    summary = {
        str(ratio): {
            m: mean(r["suite"] for r in rows if r["ratio"] == ratio and r["method"] == m)
            for m in [*args.methods, "random"]
        }
        for ratio in args.ratios
    }

    lines = [
        f"unpruned source: larger {source['larger']:.3f}, reverse {source['reverse']:.3f}, suite {source['suite']:.3f}",
        "",
        "| dropped | method | larger | reverse | suite score | kept of source |",
        "|---|---|---|---|---|---|",
    ]
    for ratio in args.ratios:
        for method in [*args.methods, "random"]:
            sel = [r for r in rows if r["ratio"] == ratio and r["method"] == method]
            label = (
                method
                if method != "random"
                else f"random (mean of {len(sel)} seeds, min-max suite "
                f"{min(r['suite'] for r in sel):.3f}-{max(r['suite'] for r in sel):.3f})"
            )
            lines.append(
                f"| {ratio:.0%} | {label} | {mean(r['larger'] for r in sel):.3f} | "
                f"{mean(r['reverse'] for r in sel):.3f} | {mean(r['suite'] for r in sel):.3f} | "
                f"{mean(r['kept'] for r in sel):.1%} |"
            )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps({"source": source, "rows": rows, "summary": summary, "limit": args.limit}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
