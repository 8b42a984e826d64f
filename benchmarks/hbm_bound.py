"""Bytes of weights one decode step reads per token (batch 1), and the TPOT floor that sets on a GPU's HBM.

    python benchmarks/hbm_bound.py CHECKPOINT [CHECKPOINT ...] [--bandwidth-tbs 4.8] [--top-k K]

From the safetensors headers alone (no weight is loaded): every language-model tensor is read once per step,
except the routed experts (`mlp.experts.*`), of which a token reads its top-k of E (`num_experts_per_tok` of
`num_experts`, from config.json), the embedding (one row) and what `--language-model-only` does not load
(`model.visual.*`, `mtp.*`). KV-cache and DeltaNet-state reads are left out (small at short contexts).
Prints one JSON object per checkpoint: bytes per token, and the floor = bytes / bandwidth.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}
SKIPPED = re.compile(r"(^|\.)(visual|mtp)\.|embed_tokens")
EXPERT = re.compile(r"\.mlp\.experts\.")


def tensor_bytes(folder: Path) -> dict[str, int]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                size = DTYPE_BYTES[info["dtype"]]
                for d in info["shape"]:
                    size *= d
                out[name] = size
    return out


def per_token(folder: Path, top_k: int | None) -> dict[str, float]:
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    k, e = top_k or text["num_experts_per_tok"], text["num_experts"]
    dense = routed = 0
    for name, size in tensor_bytes(folder).items():
        if SKIPPED.search(name):
            continue
        if EXPERT.search(name):
            routed += size
        else:
            dense += size
    return {"dense_bytes": dense, "routed_bytes_all": routed, "bytes_per_token": dense + routed * k / e, "top_k": k}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8, help="HBM bandwidth, TB/s (H200 datasheet: 4.8)")
    ap.add_argument("--top-k", type=int)
    args = ap.parse_args()
    for ckpt in args.checkpoints:
        r = per_token(ckpt, args.top_k)
        r["tpot_floor_ms"] = round(r["bytes_per_token"] / (args.bandwidth_tbs * 1e12) * 1e3, 4)
        print(json.dumps({"checkpoint": ckpt.name, "bandwidth_tbs": args.bandwidth_tbs, **r}))


if __name__ == "__main__":
    main()
