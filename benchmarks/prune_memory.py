"""Peak memory of `reap prune` against the size of the model, on a CPU.

Writes a random-init Qwen3.5-MoE (the demo's layout and tokenizer, widened: hidden 1024, 64 experts of 512,
top-2, LAYERS layers), prunes it with REAP through `reap prune` (observation block by block, weights streamed
from the shards) and, for reference, loads the whole model with transformers in a separate process. Prints the
checkpoint size, one decoder layer's size, and each peak RSS.

    python benchmarks/prune_memory.py WORK_DIR [--layers 8] [--nsamples 8] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

LOAD = """
import resource, sys, torch
from reap.compat import ensure_torchvision_importable
ensure_torchvision_importable()
from transformers import AutoModelForImageTextToText
AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_model(out: Path, layers: int) -> None:
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from reap.demo import TASKS, answer_of, demo_config, prompt_of, read_task_rows, save_processor, train_tokenizer

    tok = train_tokenizer([prompt_of(t, r) + answer_of(t, r) + "\n" for t in TASKS for r in read_task_rows(t, "train")])
    small = demo_config(tok).to_dict()
    text = dict(
        small["text_config"],
        hidden_size=1024,
        num_hidden_layers=layers,
        num_experts=64,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        layer_types=[("full_attention" if i % 4 == 3 else "linear_attention") for i in range(layers)],
    )
    top = {k: v for k, v in small.items() if k not in ("text_config", "vision_config")}
    cfg = Qwen3_5MoeConfig(
        **dict(top, text_config=text, vision_config=dict(small["vision_config"], out_hidden_size=1024))
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen3_5MoeForConditionalGeneration(cfg)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out), max_shard_size="500MB")
    tok.save_pretrained(str(out))
    save_processor(tok, out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n# random-init Qwen3.5-MoE (memory benchmark)\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()

    from reap.checkpoint import Checkpoint
    from reap.resources import data_dir

    src = args.work / "source"
    if not (src / "config.json").is_file():
        make_model(src, args.layers)
    ckpt = Checkpoint.open(src)
    size = ckpt.bytes_on_disk()
    layer = sum(
        math.prod(t.shape) * 2 for k, t in ckpt.tensors.items() if k.startswith("model.language_model.layers.0.")
    )
    calibration = data_dir("evals") / "demo" / "data" / "calibration.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "reap",
            "prune",
            str(src),
            "--out",
            str(args.work / "pruned"),
            "--ratio",
            "0.5",
            "--calibration",
            str(calibration),
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--overwrite",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    record = json.loads((args.work / "pruned" / "manifest.json").read_text())["stages"]["prune"]
    full = int(
        subprocess.run(
            [sys.executable, "-c", LOAD, str(src)], check=True, capture_output=True, text=True
        ).stdout.split()[-1]
    )
    gb = 1024**3
    rows = {
        "checkpoint on disk": size / gb,
        "one decoder layer (bf16)": layer / gb,
        "reap prune: peak RSS (process tree)": record["peak_rss_gb"],
        "transformers from_pretrained of the whole model: peak RSS": full / gb,
    }
    print(
        f"{args.layers} layers, 64 experts of 512, hidden 1024; calibration {record['calibration']['tokens']} tokens; "
        f"prune {record['wall_s']:.1f} s (observation {record['substages']['observation']:.1f} s)"
    )
    print("\n".join(f"| {k} | {v:.2f} GB |" for k, v in rows.items()))


if __name__ == "__main__":
    main()
