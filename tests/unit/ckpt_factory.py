"""Crafts small quantized Qwen3.5-MoE checkpoints (random values, exact layout) for the gate tests,
without AutoRound: the layout is the one AutoRound 0.16.1 writes (qweight/qzeros/scales, extra_config)."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = dict(
    vocab_size=320,
    hidden_size=128,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    model_type="qwen3_5_moe_text",
    dtype="bfloat16",
)
VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=128,
    num_position_embeddings=64,
    model_type="qwen3_5_moe_vision",
)
KEEP = ("mlp.shared_expert_gate", "linear_attn.in_proj_a", "linear_attn.in_proj_b")


def make_checkpoint(
    root: Path, bits: int = 4, group: int = 128, quantize_routers: bool = False, keep: tuple[str, ...] = KEEP
) -> Path:
    """Write a VL-wrapper W4A16 checkpoint of 2 blocks x 4 experts into `root`."""
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from reap.checkpoint import segment_match

    cfg = Qwen3_5MoeConfig(
        text_config=TEXT, vision_config=VISION, architectures=["Qwen3_5MoeForConditionalGeneration"], dtype="bfloat16"
    )
    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(cfg)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("mlp.experts"):
            e, two_i, h = t.shape
            for k in range(e):
                if leaf == "gate_up_proj":
                    shapes[f"{prefix}.{k}.gate_proj.weight"] = (two_i // 2, h)
                    shapes[f"{prefix}.{k}.up_proj.weight"] = (two_i // 2, h)
                else:
                    shapes[f"{prefix}.{k}.down_proj.weight"] = (t.shape[1], t.shape[2])
        else:
            shapes[name] = tuple(t.shape)
    tensors, extra = {}, {}
    g = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        mod = key.rpartition(".")[0]
        in_block = mod.startswith("model.language_model.layers.")
        is_linear = key.endswith(".weight") and len(shape) == 2 and (mod in linears or ".experts." in mod)
        router = segment_match("mlp.gate", mod)
        quantize = in_block and (
            (is_linear and not any(segment_match(p, mod) for p in keep)) or (router and quantize_routers)
        )
        if quantize:
            out_f, in_f = shape
            tensors[f"{mod}.qweight"] = torch.randint(
                0, 2**31 - 1, (in_f * bits // 32, out_f), generator=g, dtype=torch.int32
            )
            tensors[f"{mod}.qzeros"] = torch.randint(
                0, 2**31 - 1, (in_f // group, out_f * bits // 32), generator=g, dtype=torch.int32
            )
            tensors[f"{mod}.scales"] = torch.rand((in_f // group, out_f), generator=g).to(torch.float16)
        else:
            tensors[key] = torch.randn(shape, generator=g).to(torch.bfloat16)
            if in_block and is_linear:
                extra[mod] = {"bits": 16, "data_type": "fp"}
    for i in range(TEXT["num_hidden_layers"]):
        if not quantize_routers:
            extra[rf".*model\.language_model\.layers\.{i}\.mlp\.gate.*"] = {"bits": 16, "data_type": "float"}
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(root / shard))
        weight_map.update({k: shard for k in keys})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = cfg.to_dict()
    config["quantization_config"] = {
        "quant_method": "auto-round",
        "packing_format": "auto_round:auto_gptq",
        "bits": bits,
        "group_size": group,
        "sym": True,
        "data_type": "int",
        "block_name_to_quantize": "model.language_model.layers",
        "extra_config": extra,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def edit_index(root: Path, drop: list[str] = (), rename: dict[str, str] | None = None) -> None:
    """Remove or rename tensors in the index (and rewrite their shards) to craft a broken checkpoint."""
    from safetensors.torch import load_file, save_file

    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in set(index["weight_map"].values()):
        tensors = load_file(str(root / shard))
        for k in drop:
            tensors.pop(k, None)
        for old, new in (rename or {}).items():
            if old in tensors:
                tensors[new] = tensors.pop(old)
        save_file(tensors, str(root / shard))
    wm = {k: v for k, v in index["weight_map"].items() if k not in drop}
    for old, new in (rename or {}).items():
        if old in wm:
            wm[new] = wm.pop(old)
    index["weight_map"] = wm
    index_path.write_text(json.dumps(index))
