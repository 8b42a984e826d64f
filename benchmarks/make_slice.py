"""Write a random-init Qwen3.5-MoE checkpoint with the real 212B layer shapes, for GPU benchmarks.

The release layout is the demo model's (VL wrapper, processor files, per-expert tensors), with the layer
widths of Qwen3.5-REAP-212B-A17B: hidden 4096, 268 experts, top-10, moe_intermediate 1024, 1 shared expert
of 1024, attention 32 heads / 2 KV of 256, DeltaNet 16 key / 64 value heads of 128. The vocabulary is the
demo tokenizer's (a few hundred tokens) so that the embedding does not dominate: per-block figures are
what this is for. Weights are random: values change neither kernel choice nor per-block cost much.

    python benchmarks/make_slice.py OUT [--layers 4] [--experts 268] [--device cuda] [--tiny]

`--tiny` keeps the demo model's widths (hidden 128, 8 experts unless --experts): the same layout and code
path, small enough to rehearse a GPU benchmark on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4, help="3 DeltaNet + 1 attention per 4")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per block (268; --tiny: 8)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calibration-rows", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="the demo model's widths instead of the 212B ones")
    args = ap.parse_args()
    print(json.dumps(write_slice(args.out, args.layers, args.experts, args.device, args.calibration_rows, args.tiny)))


def write_slice(
    out: Path, layers: int = 4, experts: int | None = None, device: str = "cuda", rows: int = 128, tiny: bool = False
) -> dict:
    """Write the slice into `out` (weights, tokenizer, processor files, calibration.jsonl); returns its size."""
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from reap.demo import (
        CHAT_TEMPLATE,
        TASKS,
        answer_of,
        demo_config,
        prompt_of,
        read_task_rows,
        save_processor,
        task_texts,
        train_tokenizer,
    )

    t0 = time.perf_counter()
    texts = [prompt_of(t, r) + answer_of(t, r) + "\n" for t in TASKS for r in read_task_rows(t, "train")]
    tok = train_tokenizer(texts)
    experts = experts or (8 if tiny else 268)
    small = demo_config(tok, layers=layers, experts=experts, top_k=min(2 if tiny else 10, experts)).to_dict()
    text = dict(small["text_config"])
    wide = dict(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=64,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
    )
    # the real vision widths (16 heads): vLLM shards the tower by TP even with --language-model-only
    vision = dict(small["vision_config"], hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096)
    if tiny:
        vision = small["vision_config"]
    else:
        text.update(wide)
    if "full_attention" not in text["layer_types"]:
        text["use_cache"] = False  # transformers' hybrid cache needs an attention layer (get_seq_length)
    top = {k: v for k, v in small.items() if k not in ("text_config", "vision_config")}
    cfg = Qwen3_5MoeConfig(**dict(top, text_config=text, vision_config=vision))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # created in bf16: 8 blocks in fp32 would not fit one 80 GB GPU
    with torch.device(device):
        model = Qwen3_5MoeForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out), max_shard_size="5GB")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    save_processor(tok, out)
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n# random-init Qwen3.5-MoE slice (212B layer shapes)\n"
    )
    long_rows = ["".join(task_texts("train", rows * 4, per_row=12)[i * 4 : (i + 1) * 4]) for i in range(rows)]
    (out / "calibration.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in long_rows))
    params = sum(p.numel() for p in model.parameters())
    return {"params_b": round(params / 1e9, 4), "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    main()
