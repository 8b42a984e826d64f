"""Where the full-precision pass of a block-parallel rank spends its time (docs/benchmarks.md): for each block
of a slice, reading its tensors from the shards (host), moving the layer to the GPU, and running the
calibration samples through it one at a time (as AutoRound runs them) or as one batch (as
reap.parallel.full_precision_pass does when they share a shape and keyword arguments).

    python benchmarks/fp_pass_profile.py SLICE_DIR [--blocks 2] [--nsamples 64] [--seqlen 512]

Block 0's inputs come from AutoRound's own calibration pass (the slice's calibration.jsonl), as in a build.
Prints one JSON line per block and one for the sum.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("slice", type=Path)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from auto_round.utils import to_device

    from reap.checkpoint import Checkpoint
    from reap.parallel import calibration_inputs
    from reap.prune import ARCHS, _load_layer, layer_state, moe_layout, text_config
    from reap.recipe import load_recipe
    from reap.samples import repeated

    src = Checkpoint.open(args.slice)
    recipe = load_recipe(
        "recipes/demo.yaml",
        {
            "model.path": str(args.slice),
            "quantize.nsamples": args.nsamples,
            "quantize.seqlen": args.seqlen,
            "quantize.dataset": str(args.slice / "calibration.jsonl"),
            "quantize.device_map": 0 if args.device == "cuda" else "cpu",
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = calibration_inputs(src, recipe, Path(tmp))
    hidden = list(saved["inputs"]["hidden_states"])
    others = {k: v for k, v in saved["inputs"].items() if k not in ("hidden_states", "positional_inputs")}
    layout, config = moe_layout(src), text_config(src)
    import importlib

    module_name, layer_cls, _ = ARCHS[layout.model_type]
    total: dict[str, float] = {}
    for i in range(args.blocks):
        dev = args.device
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        state = layer_state(src, layout, i)
        t1 = time.perf_counter()
        with torch.device("meta"):
            layer = getattr(importlib.import_module(module_name), layer_cls)(config, i)
        _load_layer(layer, state, "profile")
        layer = layer.to(dev).eval().to(hidden[0].dtype)
        sync()
        t2 = time.perf_counter()
        outs = []
        with torch.inference_mode():
            for j, h in enumerate(hidden):
                kwargs = {k: to_device(v[j] if isinstance(v, list) else v, dev) for k, v in others.items()}
                out = layer(h.to(dev), **kwargs)
                outs.append((out[0] if isinstance(out, tuple) else out).to("cpu"))
            sync()
            t3 = time.perf_counter()
            kw = {
                k: repeated(to_device(v[0] if isinstance(v, list) else v, dev), len(hidden)) for k, v in others.items()
            }
            batch = torch.cat(hidden).to(dev)
            out_b = layer(batch, **kw)
            out_b = (out_b[0] if isinstance(out_b, tuple) else out_b).to("cpu")
            sync()
            t4 = time.perf_counter()
        same = all(out_b[j : j + 1].equal(outs[j]) for j in range(len(outs)))
        close = max(float((out_b[j : j + 1].float() - outs[j].float()).abs().max()) for j in range(len(outs)))
        row = {
            "block": i,
            "read_s": round(t1 - t0, 2),
            "to_gpu_s": round(t2 - t1, 2),
            "samples_one_at_a_time_s": round(t3 - t2, 2),
            "one_batch_s": round(t4 - t3, 2),
            "batch_bit_identical": same,
            "batch_max_abs_diff": close,
            "params_b": round(sum(p.numel() for p in layer.parameters()) / 1e9, 3),
        }
        print(json.dumps(row), flush=True)
        for k in ("read_s", "to_gpu_s", "samples_one_at_a_time_s", "one_batch_s"):
            total[k] = total.get(k, 0) + row[k]
        hidden = outs
        del layer, state
    print(json.dumps({"total": total, "samples": len(hidden)}))


if __name__ == "__main__":
    main()
