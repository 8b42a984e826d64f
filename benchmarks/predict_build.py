"""The cost model's prediction of a block-parallel `reap build` (reap.costmodel), e.g. the seed's build:

    python benchmarks/predict_build.py --blocks 60 --params-b 3.45 --gpus 8 --iters 200 --tokens 32768

Prints the ranges the build would use, each rank's predicted start of tuning and finish, the predicted wall
time of the parallel quantization and of a sequential build on one GPU of the same kind, and the speed-up.
"""

from __future__ import annotations

import argparse

from reap import costmodel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=60)
    ap.add_argument("--params-b", type=float, default=3.45, help="billions of parameters per block")
    ap.add_argument("--gpus", type=int, default=8, help="ranks (one per GPU)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64 * 512, help="calibration tokens (nsamples x seqlen)")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    args = ap.parse_args()
    costs = costmodel.GPU if args.device == "gpu" else costmodel.CPU
    sizes = [args.params_b] * args.blocks
    ranges = costmodel.plan_ranges(sizes, args.gpus, costs, args.iters, args.tokens)
    ranks = costmodel.simulate(ranges, sizes, costs, args.iters, args.tokens)
    sequential = costmodel.simulate([(0, args.blocks)], sizes, costs, args.iters, args.tokens)[0].finish_s
    for r, rank in enumerate(ranks):
        tuning_from = rank.handed_s if rank.handed_s is not None else rank.inputs_s
        print(
            f"rank {r}: blocks {rank.start}-{rank.stop - 1} ({rank.stop - rank.start}), inputs at "
            f"{rank.inputs_s:.0f} s, tuning from {tuning_from:.0f} s, finished at {rank.finish_s:.0f} s"
        )
    wall = max(r.finish_s for r in ranks)
    print(
        f"parallel quantization: {wall / 60:.1f} min on {args.gpus} ranks; sequential: {sequential / 60:.1f} min; "
        f"speed-up {sequential / wall:.2f}x (before merge and verification)"
    )


if __name__ == "__main__":
    main()
