"""Compare a sequential `reap build` with a block-parallel one of the same recipe and source.

    python benchmarks/parallel_compare.py RUN_SEQUENTIAL RUN_PARALLEL [--json OUT.json] [--skip-identity]

Prints wall time and speed-up, peak host RAM and GPU memory, each worker's range and time, and per block
AutoRound's loss (first and best iteration) in both builds, and which blocks came out bit-identical.
AutoRound's loss of a block is measured against the full-precision block's output, on the block's input in
that build: in the sequential build that input carries the quantization error of every earlier block, in a
worker's first block it does not, so a lower loss there is expected and says nothing about quality; the
demo-suite score (tests/integration/test_parallel.py) or perplexity does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def block_identity(seq: Path, par: Path) -> dict[int, bool]:
    from safetensors import safe_open

    from reap.checkpoint import Checkpoint, layer_index

    a, b = Checkpoint.open(seq), Checkpoint.open(par)
    same: dict[int, bool] = {}
    for name in a.weight_map:
        i = layer_index(name)
        if i is None:
            continue
        with (
            safe_open(str(a.root / a.weight_map[name]), "pt") as fa,
            safe_open(str(b.root / b.weight_map[name]), "pt") as fb,
        ):
            same[i] = same.get(i, True) and fa.get_tensor(name).equal(fb.get_tensor(name))
    return same


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("seq", type=Path)
    ap.add_argument("par", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--skip-identity",
        action="store_true",
        help="do not compare the tensors (reads both checkpoints whole: minutes at the 212B width)",
    )
    args = ap.parse_args()
    builds = [json.loads((p / "manifest.json").read_text())["stages"]["build"] for p in (args.seq, args.par)]
    seq, par = builds
    same = {} if args.skip_identity else block_identity(args.seq / "model", args.par / "model")
    rows = []
    for s, p in zip(seq["blocks"], par["blocks"], strict=False):
        rows.append(
            {
                "block": s["index"],
                "worker": p.get("worker"),
                "seq_loss0": s.get("loss_iter0"),
                "seq_loss": s.get("loss_best"),
                "par_loss0": p.get("loss_iter0"),
                "par_loss": p.get("loss_best"),
                "seq_s": s["wall_s"],
                "par_s": p["wall_s"],
                "identical": same.get(s["index"]),
            }
        )
    report = {
        "wall_s": {"sequential": seq["wall_s"], "parallel": par["wall_s"]},
        "speedup": round(seq["wall_s"] / par["wall_s"], 2),
        "substages": {"sequential": seq["substages"], "parallel": par["substages"]},
        "peak_rss_gb": {"sequential": seq["peak_rss_gb"], "parallel": par["peak_rss_gb"]},
        "peak_vram_gb": {"sequential": seq.get("peak_vram_gb"), "parallel": par.get("peak_vram_gb")},
        "workers": par["parallel"]["workers"],
        "predicted_wall_s": par["parallel"].get("predicted_wall_s"),
        "blocks": rows,
        "verified": [seq["verification"]["passed"], par["verification"]["passed"]],
    }
    print(
        f"wall: sequential {seq['wall_s']:.1f} s, {len(report['workers'])} workers {par['wall_s']:.1f} s "
        f"-> {report['speedup']}x; peak RSS {seq['peak_rss_gb']:.1f} / {par['peak_rss_gb']:.1f} GB; "
        f"both verified: {all(report['verified'])}"
    )
    print(f"  cost model's prediction for the parallel quantization: {report['predicted_wall_s']} s")
    for w in report["workers"]:
        guess = w.get("predicted") or {}
        print(
            f"  worker {w['index']} (rank {w.get('rank')}, {w['device']}) blocks {w['blocks'][0]}-{w['blocks'][1]}: "
            f"started {w['started_after_s'] or 0:.1f} s, inputs at {w.get('inputs_after_s') or 0:.1f} s "
            f"(predicted {guess.get('inputs_s')}), finished {w.get('finished_after_s') or 0:.1f} s "
            f"(predicted {guess.get('finish_s')}), substages {w['substages']}, blocks {w['block_wall_s']}, "
            f"peak RSS {w['peak_rss_gb']:.1f} GB, peak VRAM {w.get('peak_vram_gb')}"
        )
    print("block worker  seq loss0 -> best    par loss0 -> best    seq s   par s  identical")
    for r in rows:
        print(
            f"{r['block']:>5} {r['worker']!s:>6}  {r['seq_loss0']!s:>9} -> {r['seq_loss']!s:<9} "
            f"{r['par_loss0']!s:>9} -> {r['par_loss']!s:<9} {r['seq_s']:>6.1f} {r['par_s']:>6.1f}  {r['identical']}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
