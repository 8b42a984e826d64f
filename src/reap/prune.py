"""`reap prune`: drop the least salient routed experts of a Qwen3.5-MoE (or Qwen3-MoE) checkpoint.

The REAP criterion (Cerebras, arXiv 2510.13999): the saliency of expert j in a layer is the mean, over the
calibration tokens routed to j, of g_j(x) * ||f_j(x)||_2, with g_j the router weight the model itself uses
(softmax over all experts, renormalised over the token's top-k when the model does so: Qwen3.5 always,
Qwen3-MoE when `norm_topk_prob`) and f_j the expert's unweighted output. Baselines: `frequency` (tokens routed
to j), `ean` (mean ||f_j(x)|| over those tokens) and `random` (seeded; needs no calibration).

Observation is streamed, block by block: the calibration tokens are embedded, then decoder layer i is built
empty, filled from the memory-mapped safetensors shards, run on every calibration sample with a hook on its MoE
block that adds to running per-expert sums, and freed before layer i+1. Each shard is
opened (memory-mapped) only while a layer's tensors are copied out of it, straight into the fused in-memory
layout, so peak memory is about one decoder layer plus the calibration activations (samples x seqlen x
hidden), whatever the size of the model.

Pruning drops the same number of lowest-scoring experts in every MoE layer. It works on the files, shard by
shard: surviving experts are renumbered 0..K-1 and their tensors (and the router rows, and any router bias)
are copied bit for bit; every other tensor (attention, shared expert, vision tower, embeddings) is copied
unchanged; `num_experts` is updated in the (text) config. Multi-token-prediction layers (`mtp.*`) have their
own MoE, which transformers does not run and so cannot be observed: they are dropped, and
`mtp_num_hidden_layers` is set to 0 (the model then serves without MTP speculative decoding).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reap.card import render_pruned_card
from reap.checkpoint import PROCESSOR_FILES, TOKENIZER_FILES, Checkpoint, source_license
from reap.errors import InputError, OutputExistsError, UnsupportedModelError
from reap.rundir import RunDir, atomic_write_text, check_free_disk, check_output_dir, swap_into_place, usual_modes
from reap.stats import Clock, hardware_inventory, log, package_versions

METHODS: dict[str, str] = {
    "reap": "mean router-weighted expert output norm over the tokens routed to the expert (REAP, arXiv 2510.13999)",
    "frequency": "baseline: number of calibration tokens routed to the expert",
    "ean": "baseline: mean expert output norm over the tokens routed to the expert",
    "random": "baseline: seeded random choice (no calibration)",
}
PRUNE_FILE = "reap_prune.json"
BATCH = 8  # calibration samples per forward pass
# model_type -> (transformers modeling module, decoder layer class, rotary embedding class)
ARCHS: dict[str, tuple[str, str, str]] = {
    "qwen3_5_moe": (
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        "Qwen3_5MoeDecoderLayer",
        "Qwen3_5MoeTextRotaryEmbedding",
    ),
    "qwen3_5_moe_text": (
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        "Qwen3_5MoeDecoderLayer",
        "Qwen3_5MoeTextRotaryEmbedding",
    ),
    "qwen3_moe": (
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeDecoderLayer",
        "Qwen3MoeRotaryEmbedding",
    ),
}
ROUTER_RE = re.compile(r"^(?P<base>(?:[\w.]+\.)?)layers\.(?P<i>\d+)\.mlp\.gate\.weight$")
EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# --- the source and the arguments ---------------------------------------------------------------------


@dataclass(frozen=True)
class MoeLayout:
    """Where the MoE layers of a checkpoint are: `{prefix}{i}.mlp.gate.weight` is the router of layer i."""

    model_type: str
    prefix: str  # e.g. "model.language_model.layers."
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    @property
    def embed_key(self) -> str:
        return self.prefix.removesuffix("layers.") + "embed_tokens.weight"


def moe_layout(ckpt: Checkpoint) -> MoeLayout:
    """The MoE layout of a bf16 Qwen3.5-MoE / Qwen3-MoE checkpoint; typed errors for anything else."""
    mt = ckpt.config.get("model_type")
    num_experts = _num_experts(ckpt.text_config)
    if mt not in ARCHS or not num_experts:
        raise UnsupportedModelError(
            f"{ckpt.root} is a `{mt}` model without routed experts; reap prune supports Mixture-of-Experts "
            f"checkpoints of type {', '.join(ARCHS)}"
        )
    if ckpt.quantization_config:
        raise InputError(
            f"{ckpt.root} is quantized ({ckpt.quantization_config.get('quant_method')}); prune the "
            "16-bit source, then quantize the pruned model with `reap build`"
        )
    routers = [m for k in ckpt.weight_map if not k.startswith("mtp.") and (m := ROUTER_RE.match(k))]
    if not routers:
        raise UnsupportedModelError(f"{ckpt.root} has no MoE router tensors (`layers.N.mlp.gate.weight`)")
    prefixes = {m["base"] + "layers." for m in routers}
    if len(prefixes) != 1:
        raise UnsupportedModelError(f"{ckpt.root} has routers under several prefixes: {sorted(prefixes)}")
    return MoeLayout(
        mt,
        prefixes.pop(),
        tuple(sorted(int(m["i"]) for m in routers)),
        num_experts,
        int(ckpt.text_config["num_experts_per_tok"]),
    )


def _num_experts(text_config: dict[str, Any]) -> int:
    """Routed experts per layer: `num_experts` (Qwen3.5, Qwen3-MoE releases) or its alias `num_local_experts`
    (how transformers 5 saves Qwen3-MoE configs)."""
    return int(text_config.get("num_experts") or text_config.get("num_local_experts") or 0)


def experts_to_keep(num_experts: int, top_k: int, ratio: float | None, keep: int | None) -> int:
    """Experts kept per layer, from exactly one of `ratio` (fraction dropped, in (0, 1)) and `keep`."""
    if (ratio is None) == (keep is None):
        raise InputError("give exactly one of ratio (the fraction of experts to drop) and keep (experts to keep)")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise InputError(f"ratio {ratio} is outside (0, 1): it is the fraction of experts dropped per layer")
        keep = num_experts - round(ratio * num_experts)
        what = f"ratio {ratio} keeps {keep} of {num_experts} experts"
    else:
        what = f"keep {keep}"
    if keep >= num_experts:
        raise InputError(f"{what}: nothing to prune; keep fewer than the {num_experts} experts per layer")
    if keep < top_k:
        raise InputError(f"{what}: fewer than the {top_k} experts each token is routed to (num_experts_per_tok)")
    return keep


def read_calibration(path: Path) -> list[str]:
    """The `text` of every row of a .jsonl calibration file."""
    path = Path(path)
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f'calibration file {path} is unreadable ({exc}); give a .jsonl of {{"text": ...}} rows'
        ) from None
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"] for r in rows):
        raise InputError(f'calibration file {path} must hold at least one row, each {{"text": "..."}} non-empty')
    return [r["text"] for r in rows]


def calibration_samples(tokenizer, texts: list[str], nsamples: int, seqlen: int) -> list[list[int]]:
    """The texts tokenized, joined (the end-of-sequence token between them) and cut into at most `nsamples` samples of
    `seqlen` tokens; a stream shorter than `seqlen` is one shorter sample."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if len(stream) >= nsamples * seqlen:
            break
    if len(stream) < seqlen:
        return [stream]
    return [stream[i * seqlen : (i + 1) * seqlen] for i in range(min(nsamples, len(stream) // seqlen))]


# --- observation --------------------------------------------------------------------------------------


class ExpertStats:
    """Running per-expert sums of one MoE layer: routed tokens, sum of gate * ||f||, sum of ||f||."""

    def __init__(self, num_experts: int):
        import torch

        self.count = torch.zeros(num_experts, dtype=torch.float64)
        self.gate_norm = torch.zeros(num_experts, dtype=torch.float64)
        self.norm = torch.zeros(num_experts, dtype=torch.float64)

    def add(self, indices, gates, norms) -> None:
        """indices [T, k] experts chosen per token; gates, norms [T, k] their router weights and output norms."""
        import torch

        n = self.count.numel()
        flat = indices.reshape(-1).cpu()
        self.count += torch.bincount(flat, minlength=n).double()
        self.gate_norm += torch.bincount(flat, weights=(gates.double() * norms.double()).reshape(-1).cpu(), minlength=n)
        self.norm += torch.bincount(flat, weights=norms.double().reshape(-1).cpu(), minlength=n)

    def scores(self, method: str) -> list[float]:
        """Per-expert saliency; an expert no token was routed to scores 0."""
        if method == "frequency":
            return self.count.tolist()
        total = self.gate_norm if method == "reap" else self.norm
        return (total / self.count.clamp(min=1)).tolist()


def expert_output(experts, j: int, x):
    """The unweighted output f_j(x) of expert j of a fused transformers experts module ([gate; up] layout)."""
    import torch.nn.functional as F

    gate, up = F.linear(x, experts.gate_up_proj[j]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[j])


def observe_block(block, stats: ExpertStats):
    """Hook the MoE block: on every forward, route its input with the block's own router and add each routed
    token's (gate, ||f_j(x)||) to `stats`. Returns the hook handle."""
    import torch

    def hook(module, args, output) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        _, gates, indices = module.gate(x)
        norms = torch.zeros(indices.shape, dtype=torch.float32, device=x.device)
        for j in indices.unique().tolist():
            tok, pos = torch.where(indices == j)
            norms[tok, pos] = expert_output(module.experts, j, x[tok]).float().norm(dim=-1)
        stats.add(indices, gates.float(), norms)

    return block.register_forward_hook(hook)


def read_tensors(ckpt: Checkpoint, keys: list[str], into: Callable[[str, Any], None]) -> None:
    """Read `keys` from the memory-mapped shards, one shard open at a time (closed, so unmapped, after), and hand
    each tensor to `into(key, tensor)`."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = {}
    for key in keys:
        by_shard.setdefault(ckpt.weight_map[key], []).append(key)
    for shard, names in sorted(by_shard.items()):
        with safe_open(str(ckpt.root / shard), framework="pt", device="cpu") as fh:
            for key in names:
                into(key, fh.get_tensor(key))


def layer_state(ckpt: Checkpoint, layout: MoeLayout, i: int) -> dict[str, Any]:
    """State dict of decoder layer i in transformers' in-memory layout. Per-expert tensors on disk are copied one
    by one into the fused `mlp.experts.gate_up_proj` [E, 2I, H] ([gate; up]) and `mlp.experts.down_proj`
    [E, H, I], so the layer is held once, not twice."""
    import torch

    prefix = f"{layout.prefix}{i}."
    state: dict[str, Any] = {}
    seen: set[tuple[int, str]] = set()

    def put(key: str, t) -> None:
        name = key[len(prefix) :]
        m = EXPERT_RE.match(name)
        if not m:
            state[name] = t
            return
        e, proj = int(m[1]), m[2]
        fused = "mlp.experts.down_proj" if proj == "down_proj" else "mlp.experts.gate_up_proj"
        if fused not in state:
            rows = t.shape[0] * (1 if proj == "down_proj" else 2)
            state[fused] = torch.empty((layout.num_experts, rows, t.shape[1]), dtype=t.dtype)
        half = t.shape[0]
        target = state[fused][e]
        (target if proj == "down_proj" else target[:half] if proj == "gate_proj" else target[half:]).copy_(t)
        seen.add((e, proj))

    read_tensors(ckpt, [k for k in ckpt.weight_map if k.startswith(prefix)], put)
    if seen:
        missing = sorted(
            {(e, p) for e in range(layout.num_experts) for p in ("gate_proj", "up_proj", "down_proj")} - seen
        )
        if missing:
            raise InputError(
                f"{ckpt.root}: layer {i} lacks expert tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            )
    return state


def text_config(ckpt: Checkpoint) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(ckpt.root)).get_text_config()
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    return config


def _layer_kwargs(model_type: str, config, rotary, hidden) -> Callable[[int], dict[str, Any]]:
    """The keyword arguments each decoder layer gets for a batch without padding, as the model's own forward
    computes them (rotary position embeddings, causal masks per layer type, position ids)."""
    import torch
    from transformers.masking_utils import create_causal_mask

    batch, seq = hidden.shape[:2]
    pos = torch.arange(seq, device=hidden.device)
    if model_type.startswith("qwen3_5_moe"):
        from transformers.masking_utils import create_recurrent_attention_mask

        text_pos = pos.view(1, -1).expand(batch, -1)
        emb = rotary(hidden, pos.view(1, 1, -1).expand(3, batch, -1))
        masks = {
            "full_attention": create_causal_mask(
                config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=text_pos
            ),
            "linear_attention": create_recurrent_attention_mask(
                config=config, inputs_embeds=hidden, attention_mask=None
            ),
        }
        return lambda i: {
            "position_embeddings": emb,
            "attention_mask": masks[config.layer_types[i]],
            "position_ids": text_pos,
        }
    from transformers.masking_utils import create_sliding_window_causal_mask

    text_pos = pos.unsqueeze(0)
    mask_fn = (
        create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask
    )
    mask = mask_fn(
        config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=text_pos
    )
    emb = rotary(hidden, text_pos)
    return lambda i: {"position_embeddings": emb, "attention_mask": mask, "position_ids": text_pos}


def _load_layer(layer, state: dict[str, Any], where: str) -> None:
    """Put the tensors into the (empty) layer; a tensor missing, unexpected or of the wrong shape is an InputError."""
    try:
        result = layer.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise InputError(f"{where} does not match its config: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{where} does not match its config: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )


def decoder_layer(ckpt: Checkpoint, layout: MoeLayout, config: Any, i: int, device: str) -> Any:
    """Decoder layer i of `ckpt` on `device`, its weights streamed from the shards (held once)."""
    import importlib

    import torch

    module_name, layer_cls, _ = ARCHS[layout.model_type]
    with torch.device("meta"):
        layer = getattr(importlib.import_module(module_name), layer_cls)(config, i)
    _load_layer(layer, layer_state(ckpt, layout, i), f"{ckpt.root}: layer {i}")
    return layer.to(device).eval()


def observe(
    ckpt: Checkpoint,
    layout: MoeLayout,
    samples: list[list[int]],
    device: str,
    on_layer: Callable[[int, float], None] | None = None,
) -> dict[int, ExpertStats]:
    """Run the calibration samples through the model block by block, weights streamed from the shards, with
    an observer hook on every MoE block. Returns the running sums per MoE layer."""
    import importlib

    import torch
    import torch.nn.functional as F

    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers' Qwen3.5 module imports torchvision
    module_name, _, rotary_cls = ARCHS[layout.model_type]
    modeling = importlib.import_module(module_name)
    config = text_config(ckpt)
    embed: dict[str, Any] = {}
    read_tensors(ckpt, [layout.embed_key], embed.__setitem__)
    hidden = [
        F.embedding(torch.tensor(samples[b : b + BATCH]), embed[layout.embed_key])
        for b in range(0, len(samples), BATCH)
    ]
    del embed
    rotary = getattr(modeling, rotary_cls)(config=config).to(device)
    stats = {i: ExpertStats(layout.num_experts) for i in layout.moe_layers}
    with torch.inference_mode():
        for i in range(config.num_hidden_layers):
            t0 = time.perf_counter()
            layer = decoder_layer(ckpt, layout, config, i, device)
            handle = observe_block(layer.mlp, stats[i]) if i in stats else None
            for b, h in enumerate(hidden):
                h = h.to(device)
                out = layer(h, **_layer_kwargs(layout.model_type, config, rotary, h)(i))
                hidden[b] = (out[0] if isinstance(out, tuple) else out).to("cpu")
            if handle is not None:
                handle.remove()
            del layer
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if on_layer:
                on_layer(i, time.perf_counter() - t0)
    return stats


# --- choosing and slicing -----------------------------------------------------------------------------


def select(scores: list[float], keep: int) -> tuple[list[int], list[int]]:
    """(kept, dropped) expert indices, ascending: the `keep` highest scores survive; ties keep the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:keep]), sorted(order[keep:])


def plan_tensor(
    key: str, shape: tuple[int, ...], layout: MoeLayout, kept: dict[int, list[int]]
) -> tuple[str, str | None, list[int] | None]:
    """What pruning does with one tensor: ("copy", new key, None), ("rows", key, kept rows) or ("drop", None, None).

    - `mtp.*`: dropped (the MTP layers' own MoE cannot be observed; see the module docstring);
    - `{prefix}{i}.mlp.experts.{e}.*`: kept and renumbered when e survives in layer i, else dropped;
    - fused `{prefix}{i}.mlp.experts.<name>` and router `{prefix}{i}.mlp.gate.*` tensors whose first
      dimension is the number of experts (router weight, router bias): the surviving rows;
    - everything else: copied unchanged.
    """
    if key.startswith("mtp."):
        return "drop", None, None
    if not key.startswith(layout.prefix):
        return "copy", key, None
    layer, _, rest = key[len(layout.prefix) :].partition(".")
    if not layer.isdigit() or int(layer) not in kept:
        return "copy", key, None
    survivors = kept[int(layer)]
    head = f"{layout.prefix}{layer}."
    if rest.startswith("mlp.experts."):
        sub = rest[len("mlp.experts.") :]
        expert, _, leaf = sub.partition(".")
        if expert.isdigit():
            e = int(expert)
            return (
                ("copy", f"{head}mlp.experts.{survivors.index(e)}.{leaf}", None)
                if e in survivors
                else ("drop", None, None)
            )
        if not shape or shape[0] != layout.num_experts:
            raise UnsupportedModelError(
                f"{key} {list(shape)}: a fused expert tensor whose first dimension is not "
                f"the {layout.num_experts} experts"
            )
        return "rows", key, survivors
    if rest.startswith("mlp.gate.") and shape and shape[0] == layout.num_experts:
        return "rows", key, survivors
    return "copy", key, None


def slice_checkpoint(ckpt: Checkpoint, layout: MoeLayout, kept: dict[int, list[int]], out: Path) -> dict[str, Any]:
    """Write the pruned checkpoint into `out`, one shard at a time (same shard names, new index); tensors are
    copied bit for bit. Returns counts of what happened."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    counts = {"copied": 0, "sliced": 0, "dropped_experts": 0, "dropped_mtp": 0}
    total = 0
    for shard in sorted(set(ckpt.weight_map.values())):
        tensors = {}
        with safe_open(str(ckpt.root / shard), framework="pt", device="cpu") as fh:
            metadata = fh.metadata()
            for key in fh.keys():
                action, new_key, rows = plan_tensor(key, ckpt.tensors[key].shape, layout, kept)
                if action == "drop":
                    counts["dropped_mtp" if key.startswith("mtp.") else "dropped_experts"] += 1
                    continue
                t = fh.get_tensor(key)
                if action == "rows":
                    t = t[rows].contiguous()
                    counts["sliced"] += 1
                else:
                    counts["copied"] += 1
                tensors[new_key] = t
                total += t.numel() * t.element_size()
        if tensors:
            save_file(tensors, str(out / shard), metadata=metadata)
            weight_map.update({k: shard for k in tensors})
    index = ckpt.root / "model.safetensors.index.json"
    if index.is_file():
        meta = dict(json.loads(index.read_text()).get("metadata") or {}, total_size=total)
        atomic_write_text(
            out / index.name,
            json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n",
        )
    return counts


def pruned_config(config: dict[str, Any], keep: int, mtp_dropped: bool) -> dict[str, Any]:
    """The source config.json with `num_experts` (in `text_config` when there is one) set to `keep`, and
    `mtp_num_hidden_layers` to 0 when the MTP layers were dropped."""
    new = json.loads(json.dumps(config))
    text = new.get("text_config", new)
    text["num_local_experts" if "num_local_experts" in text and "num_experts" not in text else "num_experts"] = keep
    if mtp_dropped and text.get("mtp_num_hidden_layers"):
        text["mtp_num_hidden_layers"] = 0
    return new


# --- the stage ----------------------------------------------------------------------------------------


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prune(
    src: Path,
    out: Path,
    *,
    ratio: float | None = None,
    keep: int | None = None,
    method: str = "reap",
    calibration: Path | None = None,
    nsamples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    overwrite: bool = False,
    device: str | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Prune `src` into the folder `out` (`out/model/` the checkpoint, `out/manifest.json` with `stages.prune`).
    Returns the prune record: settings, per-layer report (scores, kept, dropped), stage times, peak memory.
    Every input is checked before any weight is read; `out/model` appears (or is replaced) only when
    complete, and a failed or interrupted attempt leaves an earlier one and its record the current ones."""
    src, out = Path(src), Path(out)
    if method not in METHODS:
        raise InputError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}")
    ckpt = Checkpoint.open(src)
    layout = moe_layout(ckpt)
    n_keep = experts_to_keep(layout.num_experts, layout.top_k, ratio, keep)
    texts = None
    if method != "random":
        if calibration is None:
            raise InputError(f'method {method} needs calibration data: pass a .jsonl of {{"text": ...}} rows')
        texts = read_calibration(Path(calibration))
    if nsamples < 1 or seqlen < 1:
        raise InputError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must be at least 1")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise InputError(f"--out {out} would replace the source {src}; choose another folder")
    check_output_dir(out)
    run = RunDir(out)
    if not overwrite and (run.model_dir.exists() or (out.exists() and not run.manifest_path.is_file())):
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(out.parent, int(ckpt.bytes_on_disk() * n_keep / layout.num_experts) + 50_000_000)

    work = out / "model.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(
        f"prune {src} -> {out}: {method}, {layout.num_experts} -> {n_keep} experts in each of "
        f"{len(layout.moe_layers)} MoE layers"
    )
    clock = Clock()
    with run.stage(
        "prune",
        argv=argv or sys.argv,
        source=str(src.resolve()),
        output=str(out.resolve()),
        method=method,
        method_description=METHODS[method],
        ratio=ratio,
        keep=keep,
        dropped_fraction=round(1 - n_keep / layout.num_experts, 4),
        experts_before=layout.num_experts,
        experts_after=n_keep,
        top_k=layout.top_k,
        moe_layers=len(layout.moe_layers),
        seed=seed,
        versions=package_versions(),
    ) as record:
        try:
            if texts is None:
                rng = random.Random(seed)
                scores = {i: [rng.random() for _ in range(layout.num_experts)] for i in layout.moe_layers}
                counts = None
                record["calibration"] = None
            else:
                with clock.span("calibration"):
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(str(src))
                    samples = calibration_samples(tokenizer, texts, nsamples, seqlen)
                record["calibration"] = {
                    "path": str(calibration),
                    "rows": len(texts),
                    "nsamples": nsamples,
                    "seqlen": seqlen,
                    "samples": len(samples),
                    "tokens": sum(len(s) for s in samples),
                }
                record["device"] = dev = _device(device)
                log(
                    f"observing {record['calibration']['tokens']} calibration tokens ({len(samples)} samples) "
                    f"layer by layer on {dev}"
                )
                layer_s: list[float] = []
                with clock.span("observation"):
                    stats = observe(ckpt, layout, samples, dev, on_layer=lambda i, s: layer_s.append(round(s, 3)))
                record["layer_wall_s"] = layer_s
                scores = {i: s.scores(method) for i, s in stats.items()}
                counts = {i: [int(c) for c in s.count.tolist()] for i, s in stats.items()}
            kept, layers = {}, []
            for i in layout.moe_layers:
                kept[i], dropped = select(scores[i], n_keep)
                row = {"layer": i, "scores": [round(s, 6) for s in scores[i]], "kept": kept[i], "dropped": dropped}
                if counts:
                    row["routed_tokens"] = counts[i]
                layers.append(row)
            log("writing the pruned checkpoint")
            with clock.span("slicing"):
                sliced = slice_checkpoint(ckpt, layout, kept, work)
                atomic_write_text(
                    work / "config.json",
                    json.dumps(pruned_config(ckpt.config, n_keep, sliced["dropped_mtp"] > 0), indent=2) + "\n",
                )
                for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
                    if (src / name).is_file():
                        shutil.copy2(src / name, work / name)
            record.update(
                layers=layers,
                tensors=sliced,
                mtp="dropped" if sliced["dropped_mtp"] else "none in the source",
                substages=clock.spans,
            )
            record.measure()
            done = dict(record, status="done")
            _write_card(src, done, work)
            atomic_write_text(work / PRUNE_FILE, json.dumps(done, indent=2) + "\n")
            usual_modes(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        swap_into_place(work, run.model_dir)
        record.top.update(name=out.name, hardware=hardware_inventory())
    return record


def pruning_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a build's manifest and card carry of a prune record (the per-layer report stays in reap_prune.json)."""
    keys = (
        "method",
        "method_description",
        "ratio",
        "keep",
        "dropped_fraction",
        "experts_before",
        "experts_after",
        "top_k",
        "moe_layers",
        "calibration",
        "seed",
        "mtp",
        "source",
        "wall_s",
        "peak_rss_gb",
        "peak_vram_gb",
    )
    return {k: record.get(k) for k in keys} | {"reap_version": record["versions"].get("reap")}


def read_pruning(model_dir: Path) -> dict[str, Any] | None:
    """The prune record a `reap prune` output carries next to its weights, or None."""
    path = Path(model_dir) / PRUNE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg}); re-run `reap prune`") from None


def _write_card(src: Path, record: dict[str, Any], model_dir: Path) -> None:

    atomic_write_text(model_dir / "README.md", render_pruned_card(pruning_summary(record), source_license(src)))
