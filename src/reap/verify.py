"""Verification gates on a quantized checkpoint. Each gate returns its failures (with where); the report
also lists, read from the checkpoint itself, every module kept in 16-bit and why.

Gates: routers, shared-expert gates and lm_head stored unquantized; every expected tensor present and none
unexpected; the quantized Linear count per block as the config predicts (3N+9 DeltaNet, 3N+8 attention)
and as AutoRound reported; `quantization_config` consistent with the tensors; bfloat16; the Marlin MoE shape
rule at the recipe's tensor-parallel size.
"""

from __future__ import annotations

import contextlib
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from reap.checkpoint import QUANT_SUFFIXES, Checkpoint, generalize, layer_index, segment_match
from reap.errors import VerificationError
from reap.recipe import DEFAULT_KEEP_16BIT, SERVABLE_BITS

MAX_SHOWN = 5


def _shown(items: list[str]) -> str:
    head = ", ".join(items[:MAX_SHOWN])
    return head + (f" (+{len(items) - MAX_SHOWN} more)" if len(items) > MAX_SHOWN else "")


# --- the layout the config predicts -------------------------------------------------------------------


def _import_layout_libraries() -> None:
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch  # noqa: F401
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration  # noqa: F401


def preload() -> None:
    """Import what the gates need (torch, transformers' Qwen3.5 classes) in the background: a block-parallel
    build's own process quantizes nothing, so without it these imports came after the merge (measured: 7.9 s
    of "verification" for the 4-block demo on this CPU, 0.1 s in a sequential build; 8.5 s vs 0.6 s on GPUs)."""
    threading.Thread(target=_import_layout_libraries, daemon=True).start()


@lru_cache(maxsize=4)
def _meta_layout(root: str, mtime: float) -> tuple[frozenset[str], frozenset[str]]:
    """(tensor keys on disk, Linear module names) of the architecture in `root`/config.json, built on the
    meta device (no weights read). Fused experts are expanded to the per-expert layout saved on disk."""
    _import_layout_libraries()
    import torch
    from transformers import AutoConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration

    cfg = AutoConfig.from_pretrained(root)
    cls = Qwen3_5MoeForConditionalGeneration if hasattr(cfg, "vision_config") else Qwen3_5MoeForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    text = getattr(cfg, "text_config", cfg)
    n_exp = text.num_experts
    keys: set[str] = set()
    for name in model.state_dict():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("mlp.experts") and leaf in ("gate_up_proj", "down_proj"):
            projs = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            keys |= {f"{prefix}.{e}.{p}.weight" for e in range(n_exp) for p in projs}
        else:
            keys.add(name)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for n, _m in model.named_modules():
        if n.endswith("mlp.experts"):
            linears |= {f"{n}.{e}.{p}" for e in range(n_exp) for p in ("gate_proj", "up_proj", "down_proj")}
    return frozenset(keys), frozenset(linears)


def expected_layout(ckpt: Checkpoint) -> tuple[frozenset[str], frozenset[str]]:
    cfg = ckpt.root / "config.json"
    return _meta_layout(str(ckpt.root), cfg.stat().st_mtime)


def predicted_block_linears(ckpt: Checkpoint) -> dict[int, int]:
    tc = ckpt.text_config
    n = tc["num_experts"]
    return {i: 3 * n + (9 if t == "linear_attention" else 8) for i, t in enumerate(tc["layer_types"])}


# --- what quantization_config declares ---------------------------------------------------------------


def declared_16bit(qcfg: dict[str, Any], module: str) -> bool:
    """Whether vLLM will build `module` unquantized, as the checkpoint's quantization_config says."""
    if qcfg.get("quant_method") == "gptq":
        if any(k.startswith("-:") and re.match(k[2:], module) for k in (qcfg.get("dynamic") or {})):
            return True
        if module == "lm_head":
            return not qcfg.get("lm_head", False)
        in_block = re.search(r"\.layers\.\d+\.(.+)$", module)
        names = {n for group in (qcfg.get("modules_in_block_to_quantize") or []) for n in group}
        if in_block is None or module.startswith("model.visual."):
            return True  # outside the decoder blocks: GPTQ quantizes only inside them
        return bool(names) and in_block.group(1) not in names
    for key, spec in (qcfg.get("extra_config") or {}).items():
        hit = key == module or (any(c in key for c in "*[(\\") and re.fullmatch(key, module))
        if hit and int(spec.get("bits", 16)) >= 16:
            return True
    blocks = qcfg.get("block_name_to_quantize")
    if blocks:
        blocks = [blocks] if isinstance(blocks, str) else blocks
        names = [b.strip() for bl in blocks for b in bl.split(",")]
        if not any(module.startswith(b + ".") for b in names):
            return True
    return False


REGEX_CHARS = set(r"*+?^$()[]{}|\\")


def experts_declared_16bit(qcfg: dict[str, Any], fused: str) -> bool | None:
    """Whether vLLM builds the fused MoE module `fused` (`...layers.N.mlp.experts`, all of a block's routed
    experts at once) unquantized, decided the way vLLM decides it for that one module; None when vLLM would
    refuse the config as inconsistent. auto-round: vllm/model_executor/layers/quantization/inc/config_parser.py
    (an exact key, else the per-expert keys under it, which must agree, else the first regex key found in it,
    else the default); GPTQ: a `-:` dynamic rule matching the module."""
    if qcfg.get("quant_method") == "gptq":
        return any(k.startswith("-:") and re.match(k[2:], fused) for k in (qcfg.get("dynamic") or {}))
    extra = qcfg.get("extra_config") or {}
    blocks = qcfg.get("block_name_to_quantize")
    blocks = [blocks] if isinstance(blocks, str) else blocks or []
    names = [b.strip() for bl in blocks for b in bl.split(",")]
    inside = not names or any(fused.startswith(n) for n in names)
    default = (qcfg.get("bits", 4), qcfg.get("group_size"), qcfg.get("sym", True)) if inside else (16, -1, True)

    def spec(entry: dict[str, Any]) -> tuple[int, Any, bool]:
        """(bits, group_size, sym): what vLLM requires a fused module's experts to agree on."""
        group = entry.get("group_size", default[1])
        group = tuple(group) if isinstance(group, list) else group
        return int(entry.get("bits", default[0])), group, entry.get("sym", default[2])

    def bits(entry: dict[str, Any]) -> int:
        return spec(entry)[0]

    exact = extra.get(fused) or next((v for k, v in extra.items() if fused.endswith(f".{k}")), None)
    if exact is not None:
        return bits(exact) >= 16
    under = {spec(v) for k, v in extra.items() if k.startswith(fused)}
    if under:
        return under.pop()[0] >= 16 if len(under) == 1 else None
    for key, entry in extra.items():
        if any(c in REGEX_CHARS for c in key):
            with contextlib.suppress(re.error):
                if re.search(key, fused):
                    return bits(entry) >= 16
    return default[0] >= 16


# --- the gates ----------------------------------------------------------------------------------------


def gate_unquantized_modules(ckpt: Checkpoint) -> list[str]:
    bad = []
    for mod in sorted(ckpt.modules):
        if ckpt.is_quantized(mod) and (
            segment_match("mlp.gate", mod) or segment_match("mlp.shared_expert_gate", mod) or mod == "lm_head"
        ):
            bad.append(mod)
    if not bad:
        return []
    return [
        f"{_shown(bad)} stored quantized: vLLM builds routers, shared-expert gates and lm_head unquantized "
        "and fails to load (KeyError ...qweight); keep them in quantize.keep_16bit and rebuild"
    ]


def gate_kept_16bit(ckpt: Checkpoint, linears: frozenset[str], keep: dict[str, str]) -> list[str]:
    """Every Linear the recipe keeps in 16-bit is stored unquantized."""
    bad = sorted(m for m in linears if ckpt.is_quantized(m) and any(segment_match(p, m) for p in keep))
    if not bad:
        return []
    return [f"{_shown(bad)} stored quantized although quantize.keep_16bit keeps them in 16-bit"]


def gate_tensor_set(ckpt: Checkpoint, keys: frozenset[str], linears: frozenset[str]) -> list[str]:
    failures = list(ckpt.problems)
    present = set(ckpt.tensors)
    missing, accounted = [], set()
    for key in sorted(keys):
        mod, _, leaf = key.rpartition(".")
        if leaf == "weight" and mod in linears and ckpt.is_quantized(mod):
            need = {f"{mod}.{s}" for s in ("qweight", "qzeros", "scales")}
            lost = sorted(need - present)
            missing += lost
            accounted |= need | {f"{mod}.g_idx"}
        elif key in present:
            accounted.add(key)
        else:
            missing.append(f"{mod}.weight/qweight" if leaf == "weight" and mod in linears else key)
    extra_ok = ckpt.text_config.get("mtp_num_hidden_layers", 0) > 0
    unexpected = sorted(k for k in present - accounted if not (extra_ok and k.startswith("mtp.")))
    if missing:
        failures.append(f"{len(missing)} expected tensor(s) missing: {_shown(missing)}")
    if unexpected:
        failures.append(f"{len(unexpected)} unexpected tensor(s): {_shown(unexpected)}")
    return failures


def block_counts(ckpt: Checkpoint, linears: frozenset[str]) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    for mod in linears:
        i = layer_index(mod)
        if i is None or not mod.startswith(("model.language_model.layers.", "model.layers.")):
            continue
        c = counts.setdefault(i, {"quantized": 0, "total": 0})
        if mod in ckpt.modules:
            c["total"] += 1
            c["quantized"] += int(ckpt.is_quantized(mod))
    return counts


def gate_layer_counts(ckpt: Checkpoint, linears: frozenset[str], reported: list[dict[str, int]] | None) -> list[str]:
    failures = []
    predicted = predicted_block_linears(ckpt)
    counts = block_counts(ckpt, linears)
    for i, want in predicted.items():
        got = counts.get(i, {"quantized": 0, "total": 0})
        if got["total"] != want:
            kind = "DeltaNet" if want % 3 == 0 else "attention"
            failures.append(f"block {i} ({kind}) has {got['total']} Linear layers on disk, the config predicts {want}")
    if reported:
        for i, rep in enumerate(reported):
            got = counts.get(i, {"quantized": 0, "total": 0})
            if (rep["quantized"], rep["total"]) != (got["quantized"], predicted.get(i)):
                failures.append(
                    f"block {i}: AutoRound reported {rep['quantized']}/{rep['total']} quantized, "
                    f"the checkpoint holds {got['quantized']}/{predicted.get(i)}"
                )
    return failures


def gate_quantization_config(ckpt: Checkpoint, linears: frozenset[str], expect: dict[str, Any]) -> list[str]:
    q = ckpt.quantization_config
    if not q:
        return ["config.json has no quantization_config: this is not a quantized checkpoint"]
    failures = []
    method = q.get("quant_method")
    if method not in ("auto-round", "gptq", "intel/auto-round"):
        failures.append(f"quantization_config.quant_method is {method!r}; expected auto-round or gptq")
    for key in ("bits", "group_size", "sym"):
        if key in expect and q.get(key) != expect[key]:
            failures.append(f"quantization_config.{key} is {q.get(key)!r}, the recipe asked for {expect[key]!r}")
    undeclared, contradicted, bad_shape = [], [], []
    bits, group = q.get("bits", 4), q.get("group_size", 128)
    for mod in sorted(linears & set(ckpt.modules)):
        quantized, declared = ckpt.is_quantized(mod), declared_16bit(q, mod)
        if not quantized and not declared:
            undeclared.append(mod)
        elif quantized and declared:
            contradicted.append(mod)
        elif quantized and "scales" in ckpt.modules[mod]:  # a missing part is reported by tensor_set
            t = ckpt.modules[mod]
            in_features = t["qweight"].shape[0] * 32 // bits
            if t["scales"].shape[0] != -(-in_features // group) or t["scales"].shape[1] != t["qweight"].shape[1]:
                bad_shape.append(mod)
    if bits not in SERVABLE_BITS:
        failures.append(f"quantization_config.bits is {bits}: vLLM loads 4- or 8-bit int weights only")
    experts = ckpt.expert_states()
    mixed = [i for i, states in sorted(experts.items()) if len(states) > 1]
    if mixed:
        failures.append(
            f"blocks {mixed}: routed experts partly quantized; vLLM runs a block's experts all int4 or all 16-bit"
        )
    fused = {layer_index(m): m.split(".mlp.experts.")[0] + ".mlp.experts" for m in ckpt.modules if ".mlp.experts." in m}
    wrong = {"16-bit": [], "int4": [], "inconsistent": []}
    for i, states in sorted(experts.items()):
        if len(states) == 1:
            says = experts_declared_16bit(q, fused[i])
            if says is None:
                wrong["inconsistent"].append(i)
            elif says != (states == {False}):
                wrong["16-bit" if states == {False} else "int4"].append(i)
    if wrong["16-bit"]:
        rule = "a module-level `dynamic` skip rule" if method == "gptq" else "an extra_config entry vLLM applies"
        failures.append(
            f"blocks {wrong['16-bit']}: routed experts stored in 16-bit without {rule} to their fused module "
            "(`...mlp.experts`); vLLM would build them int4 and fail to load (No WNA16 MoE backend / qweight)"
        )
    if wrong["int4"]:
        failures.append(
            f"blocks {wrong['int4']}: routed experts stored int4 but quantization_config makes vLLM build their "
            "fused module in 16-bit"
        )
    if wrong["inconsistent"]:
        failures.append(
            f"blocks {wrong['inconsistent']}: the per-expert extra_config entries disagree on (bits, group_size, sym); "
            "vLLM refuses a fused MoE module whose experts are configured differently"
        )
    if undeclared:
        failures.append(
            f"{_shown(undeclared)} stored in 16-bit but quantization_config does not say so "
            "(vLLM would look for qweight)"
        )
    if contradicted:
        failures.append(f"{_shown(contradicted)} stored quantized but quantization_config declares them 16-bit")
    if bad_shape:
        failures.append(f"{_shown(bad_shape)}: qweight/scales shapes disagree with bits={bits}, group_size={group}")
    return failures


def gate_dtype(ckpt: Checkpoint) -> list[str]:
    failures = []
    dtypes = {
        ckpt.config.get("dtype") or ckpt.config.get("torch_dtype"),
        ckpt.text_config.get("dtype") or ckpt.text_config.get("torch_dtype"),
    } - {None}
    if dtypes - {"bfloat16"}:
        failures.append(
            f"config dtype is {sorted(dtypes)}; Qwen3.5 must run in bfloat16 (float16 overflows in DeltaNet)"
        )
    fp16 = sorted(k for k, t in ckpt.tensors.items() if t.dtype == "F16" and k.rpartition(".")[2] not in QUANT_SUFFIXES)
    if fp16:
        failures.append(f"{len(fp16)} 16-bit tensor(s) stored as float16, not bfloat16: {_shown(fp16)}")
    return failures


def gate_marlin(ckpt: Checkpoint, tp: int) -> list[str]:
    tc = ckpt.text_config
    q = ckpt.quantization_config or {}
    group = q.get("group_size", 128)
    failures = []
    if ckpt.experts_quantized():
        hidden, inter = tc["hidden_size"], tc["moe_intermediate_size"]
        need = max(64, group)
        if hidden % 128:
            failures.append(f"hidden_size {hidden} is not a multiple of 128: Marlin MoE cannot run it")
        if inter % tp or (inter // tp) % need:
            failures.append(
                f"moe_intermediate_size {inter} / TP {tp} = {inter / tp:g} is not a multiple of {need}: "
                f"vLLM falls back from Marlin MoE; serve with a TP where it divides, "
                f"e.g. serve.tensor_parallel_size: {_largest_tp(inter, need)}"
            )
    narrow = [m for m in ckpt.modules if ckpt.is_quantized(m) and segment_match("linear_attn.in_proj_a", m)]
    if narrow:
        rows = 2 * tc.get("linear_num_value_heads", 0)
        if rows % tp or (rows // tp) % 64:
            failures.append(
                f"linear_attn.in_proj_a/b are quantized but vLLM fuses them into in_proj_ba with "
                f"{rows}/{tp} rows per shard (< 64 or not a multiple): keep them in quantize.keep_16bit"
            )
    return failures


def _largest_tp(inter: int, need: int) -> int:
    return max(t for t in (1, 2, 4, 8) if inter % t == 0 and (inter // t) % need == 0) if inter % need == 0 else 1


# --- the report ---------------------------------------------------------------------------------------


def sixteen_bit_table(ckpt: Checkpoint, linears: frozenset[str], reasons: dict[str, str]) -> list[dict[str, Any]]:
    """Linear layers and routers stored in 16-bit, grouped by name pattern, with why (read from disk)."""
    groups: dict[str, list[Any]] = {}
    for mod in ckpt.modules:
        is_router = segment_match("mlp.gate", mod) and "weight" in ckpt.modules[mod]
        if (mod in linears or is_router) and not ckpt.is_quantized(mod):
            pattern = next((p for p in reasons if segment_match(p, mod)), None)
            # a whole sub-model kept (`model.visual`, `mtp`) is one row; anything else one row per role
            key = f"{pattern}.*" if pattern and mod.startswith(pattern + ".") else generalize(mod)
            why = (
                reasons[pattern]
                if pattern
                else "kept in 16-bit by AutoRound (shape not quantizable at this group size)"
            )
            groups.setdefault(key, [0, why])[0] += 1
    rows = [{"modules": key, "count": n, "why": why} for key, (n, why) in sorted(groups.items())]
    return rows


def verify_checkpoint(
    path: Path,
    tp: int = 4,
    expect: dict[str, Any] | None = None,
    reported_blocks: list[dict[str, int]] | None = None,
    reasons: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run every gate; return the report (raise VerificationError listing every failure)."""
    ckpt = Checkpoint.open(path)
    ckpt.require_supported_moe()
    keys, linears = expected_layout(ckpt)
    gates = {
        "unquantized_routers_and_head": gate_unquantized_modules(ckpt),
        "kept_16bit": gate_kept_16bit(ckpt, linears, reasons or DEFAULT_KEEP_16BIT),
        "tensor_set": gate_tensor_set(ckpt, keys, linears),
        "layer_counts": gate_layer_counts(ckpt, linears, reported_blocks),
        "quantization_config": gate_quantization_config(ckpt, linears, expect or {}),
        "dtype": gate_dtype(ckpt),
        "marlin_shapes": gate_marlin(ckpt, tp),
    }
    counts = block_counts(ckpt, linears)
    report = {
        "passed": not any(gates.values()),
        "tensor_parallel_size": tp,
        "gates": {name: {"passed": not f, "failures": f} for name, f in gates.items()},
        "quantized_linear_per_block": [
            counts.get(i, {}).get("quantized", 0) for i in sorted(predicted_block_linears(ckpt))
        ],
        "predicted_linear_per_block": list(predicted_block_linears(ckpt).values()),
        "kept_16bit": sixteen_bit_table(ckpt, linears, reasons or DEFAULT_KEEP_16BIT),
        "quantization_config": {k: v for k, v in (ckpt.quantization_config or {}).items() if k != "extra_config"},
        "size_bytes": ckpt.bytes_on_disk(),
    }
    return report


def raise_on_failure(report: dict[str, Any], where: str) -> None:
    if not report["passed"]:
        failures = [f"[{name}] {f}" for name, g in report["gates"].items() for f in g["failures"]]
        raise VerificationError(where, failures)
