"""Where the GPU time of profiled decode steps goes, from the traces vLLM's torch profiler wrote.

    python benchmarks/decode_profile.py TRACE_DIR --steps N

TRACE_DIR is the server's `torch_profiler_dir` (`--profiler-config '{"profiler": "torch", ...}'`), after a
`vllm bench serve --profile` pass; N the engine steps the pass ran (requests x output tokens at concurrency 1).
Reads the trace with the most GPU kernels (the engine's worker), and prints one JSON object: the time from the
first kernel to the last, the time some kernel ran (union of the kernels' intervals) and their sum, per step;
kernels grouped by kind (int4 GEMM, MoE, attention, DeltaNet, 16-bit GEMM, sampling, other), and the 15 kernels
with the most time, each with launches and microseconds per step.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

KINDS = [  # first match wins: kernel name -> kind
    ("moe", re.compile(r"moe|topk_softmax|align_block|expert", re.I)),
    ("int4_gemm", re.compile(r"marlin|machete|gptq|wna16|awq|exllama", re.I)),
    ("attention", re.compile(r"flash|fmha|attn|paged|reshape_and_cache", re.I)),
    ("deltanet", re.compile(r"chunk|recurrent|gated_delta|fused_gdn|causal_conv|conv1d|l2norm|fla_", re.I)),
    ("gemm_16bit", re.compile(r"gemm|nvjet|cutlass|sm90_xmma|cublas|splitk", re.I)),
    ("sampling", re.compile(r"sampl|argmax|argsort|sort|cumsum|softmax|multinomial|gumbel|topk", re.I)),
    ("norm_rope_act", re.compile(r"norm|rotary|rope|silu|act_and_mul|gelu", re.I)),
]


def kind(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other")


def load(folder: Path) -> list[dict]:
    best: list[dict] = []
    for f in folder.rglob("*.json*"):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            events = json.load(fh).get("traceEvents", [])
        kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
        if len(kernels) > len(best):
            best = kernels
    return best


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summary(kernels: list[dict], steps: int) -> dict:
    if not kernels:
        raise SystemExit("no GPU kernel in the traces (was the pass profiled, and the server's profiler on?)")
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e["name"]].append(float(e["dur"]))
    by_kind: dict[str, float] = defaultdict(float)
    for name, durs in by_name.items():
        by_kind[kind(name)] += sum(durs)
    total = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {
        "steps": steps,
        "kernels": len(kernels),
        "per_step_us": {
            "first_to_last_kernel": round((last - first) / steps, 1),
            "some_kernel_running": round(union(spans) / steps, 1),
            "kernel_time_sum": round(total / steps, 1),
            "launches": round(len(kernels) / steps, 1),
        },
        "by_kind_us_per_step": {k: round(v / steps, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "by_kind_share": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {
                "name": name[:120],
                "kind": kind(name),
                "launches_per_step": round(len(durs) / steps, 2),
                "us_per_step": round(sum(durs) / steps, 1),
                "share": round(sum(durs) / total, 3),
            }
            for name, durs in top
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace_dir", type=Path)
    ap.add_argument("--steps", type=int, required=True, help="engine steps in the profiled pass")
    args = ap.parse_args()
    print(json.dumps(summary(load(args.trace_dir), args.steps), indent=2))


if __name__ == "__main__":
    main()
