"""Every workaround for third-party drift lives here. Each is detected, applied only when needed, and has
a test that says when it stops being needed (tests/unit/test_compat.py, tests/integration/test_build.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reap.checkpoint import PROCESSOR_FILES, TOKENIZER_FILES, Checkpoint

_TORCHVISION_LIB = None  # keeps the op schemas registered for the life of the process


def torchvision_ops_missing() -> bool:
    """PyPI's torchvision is a CUDA build; beside a CPU torch its C ops fail to load and `import torchvision`
    then raises `operator torchvision::nms does not exist`. Loads torchvision's own library to find out, so
    a working torchvision (GPU hosts) registers its real ops and is left alone."""
    import importlib.util

    import torch

    def has_nms() -> bool:
        try:
            torch.ops.torchvision.nms  # noqa: B018
            return True
        except (AttributeError, RuntimeError):
            return False

    if has_nms():
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False  # not installed: nothing to shim
    for lib in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
        except (OSError, RuntimeError):
            return True
    return not has_nms()


def ensure_torchvision_importable() -> bool:
    """Define the two op schemas torchvision's Python part registers fakes for, if its C ops did not load.

    transformers' Qwen3.5 classes and vLLM's Qwen3.5 model code import torchvision; no CPU torchvision is
    on PyPI. Returns True when the shim was applied. No installed file is edited.
    """
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None or not torchvision_ops_missing():
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB = lib
    return True


# --- vLLM's CPU build on x86 without AVX-512 --------------------------------------------------------------

_WNA16_LIB = None  # keeps the reference op registered for the life of the process
WNA16_FALLBACK_LOG = "reap cpu_site: int4 linear layers run reap's reference cpu_gemm_wna16"


def vllm_cpu_lacks_wna16_gemm() -> bool:
    """vLLM's CPU build ships its C ops three times and loads `_C_AVX2` on an x86 CPU without AVX-512
    (vllm/platforms/cpu.py, `import_kernels`). In vllm-cpu 0.32.0 that copy has no `cpu_gemm_wna16`, the op
    its int4 linear kernel (CPUWNA16LinearKernel) calls: the server starts, then its first request fails
    (`'_C' object has no attribute 'cpu_gemm_wna16'`; measured on an AVX2-only AMD EPYC). Detected from the
    library file vLLM will load, without loading it, so a build that has the op is left alone."""
    import importlib.util
    import mmap
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64") or torch.cpu._is_avx512_supported():
        return False
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = next(Path(spec.submodule_search_locations[0]).glob("_C_AVX2*.so"), None)
    if lib is None:
        return False
    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(b"cpu_gemm_wna16") < 0


def unpack_wna16_weight(q_weight: Any) -> Any:
    """The int4 values [K, N] of a weight in CPUWNA16LinearKernel's layout: GPTQ's qweight repacked along the
    output dimension in blocks of 16 output channels, [N/16, 2K] int32 (`_process_gptq_weights_w4a16`)."""
    blocks, k2 = q_weight.shape
    k = k2 // 2
    packed = q_weight.view(blocks, k, 2).permute(1, 0, 2).reshape(k, blocks * 2)  # [K, N/8], output-packed
    return unpack_int4_columns(packed)


def unpack_int4_columns(packed: Any) -> Any:
    """[R, C] int32 holding 8 values each (value i of column c in bits 4i..4i+3) -> [R, 8C] int32."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


def wna16_gemm_reference(x, q_weight, out, scales, zeros, bias, pack_factor: int, isa_hint: str) -> None:
    """`_C::cpu_gemm_wna16` in plain PyTorch: out = x @ dequant(W) (+ bias), W = (q - z) * s per group of
    input rows, z = 8 when there are no zero points (uint4b8, symmetric GPTQ). The same int4 weights and
    scales as vLLM's kernel, dequantized to float32 for each call: slow, but exact W4A16 arithmetic."""
    import torch

    if pack_factor != 8:
        raise RuntimeError(f"reap's reference cpu_gemm_wna16 handles 4-bit weights only (pack factor {pack_factor})")
    q = unpack_wna16_weight(q_weight)
    group = q.shape[0] // scales.shape[0]
    z = 8 if zeros is None else unpack_int4_columns(zeros).repeat_interleave(group, dim=0)
    w = (q - z).to(torch.float32) * scales.to(torch.float32).repeat_interleave(group, dim=0)
    res = x.to(torch.float32) @ w
    if bias is not None:
        res += bias.to(torch.float32)
    out.copy_(res.to(out.dtype))


def ensure_cpu_wna16_gemm() -> bool:
    """Register `_C::cpu_gemm_wna16` with the reference implementation where vLLM's CPU build lacks it
    (before vLLM loads its library: a fragment of the `_C` namespace that the library then completes).
    Returns True when applied; the server's log says so, and `reap serve` records it with the kernels."""
    global _WNA16_LIB
    if _WNA16_LIB is not None or not vllm_cpu_lacks_wna16_gemm():
        return False
    import sys

    import torch

    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define(
        "cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a!) output, Tensor scales, Tensor? zeros, "
        "Tensor? bias, int pack_factor, str isa_hint) -> ()"
    )
    lib.impl("cpu_gemm_wna16", wna16_gemm_reference, "CPU")
    _WNA16_LIB = lib
    print(f"{WNA16_FALLBACK_LOG} (this CPU has no AVX-512 and vLLM's _C_AVX2 has no such op)", file=sys.stderr)
    return True


# --- AutoRound ------------------------------------------------------------------------------------------


def autoround_mllm_path_fails(src: Checkpoint) -> bool:
    """AutoRound takes its multimodal path for a VL checkpoint; that path needs the processor files and fails
    (`Can't load image processor`) without them. Then the text-only path is the one that works."""
    from auto_round.utils.model import is_mllm_model

    has_processor = any((src.root / f).is_file() for f in PROCESSOR_FILES)
    return bool(is_mllm_model(str(src.root))) and not has_processor


@contextmanager
def autoround_text_only(src: Checkpoint) -> Iterator[bool]:
    """Switch AutoRound's multimodal detection off for this model type only, only while this build runs,
    and only when its multimodal path would fail. Yields whether it was applied."""
    if not autoround_mllm_path_fails(src):
        yield False
        return
    import auto_round.utils.model as ar_model

    model_type = src.config["model_type"]
    added = model_type not in ar_model._LLM_ONLY_MODEL_TYPES
    ar_model._LLM_ONLY_MODEL_TYPES.add(model_type)
    ar_model._is_mllm_model_cache.pop(str(src.root), None)
    try:
        yield True
    finally:
        if added:
            ar_model._LLM_ONLY_MODEL_TYPES.discard(model_type)


def text_only_layer_names(layer_config: dict[str, Any]) -> dict[str, Any]:
    """On AutoRound's text-only path the model is the text model: `model.layers.N...` instead of the VL
    wrapper's `model.language_model.layers.N...`, and no vision tower. Without this, per-layer settings
    (e.g. 16-bit routed experts) silently miss their modules (measured: experts quantized anyway)."""
    return {
        name.replace("model.language_model.", "model.", 1): cfg
        for name, cfg in layer_config.items()
        if not name.startswith("model.visual.")
    }


CALIBRATOR_STATE = ("batch_size", "batch_dim", "seqlen", "is_only_supported_bs1")


@contextmanager
def _calibrator_call(call: Any) -> Iterator[None]:
    """Route AutoRound's calibration entry (`Calibrator.__call__`, the one place that drives the
    calibration set through the model and returns the cached block inputs) through `call(orig, self, ...)`."""
    from auto_round.calibration.base import Calibrator

    orig = Calibrator.__call__
    Calibrator.__call__ = lambda self, *args, **kwargs: call(orig, self, *args, **kwargs)
    try:
        yield
    finally:
        Calibrator.__call__ = orig


@contextmanager
def autoround_block_inputs(provide: Callable[[], Any], handed: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """A block-parallel range's first block: its cached inputs come from `provide()` (what an earlier range
    handed on: the per-sample inputs, the calibration token ids and the calibrator's batch settings, which
    AutoRound reads back) instead of a forward pass through the blocks before it, which the range's view does
    not have; when `provide()` gives None, from AutoRound's own calibration pass (range 0). Either way
    `handed(saved)` gets them, in that form, before AutoRound tunes. AutoRound has no API to hand cached
    inputs from one run to another."""
    import torch  # noqa: F401 - AutoRound's helpers below need it imported
    from auto_round.utils import flatten_list, to_device

    first_call = True

    def call(orig: Any, self: Any, block_names: Any, nsamples: int, **kwargs: Any) -> Any:
        nonlocal first_call
        if not first_call or kwargs.get("layer_names"):
            return orig(self, block_names, nsamples, **kwargs)
        first_call = False
        first = flatten_list(block_names)[0]
        saved = provide()
        if saved is None:
            inputs = orig(self, block_names, nsamples, **kwargs)
            saved = {
                "inputs": to_device(inputs[first], "cpu"),
                "input_ids": to_device(inputs.get("input_ids"), "cpu"),
                "state": {key: getattr(self, key) for key in CALIBRATOR_STATE},
            }
        else:
            for key, value in saved["state"].items():
                setattr(self, key, value)
            inputs = {first: saved["inputs"], "input_ids": saved["input_ids"]}
        handed(saved)
        return inputs

    with _calibrator_call(call):
        yield


@contextmanager
def autoround_without_ddp() -> Iterator[bool]:
    """A block-parallel rank runs inside a torch.distributed job whose ranks quantize *different* blocks;
    AutoRound 0.16.1, seeing an initialized process group of more than one rank, wraps each block it tunes
    in DistributedDataParallel to average gradients across the ranks (data parallelism over the same block;
    measured: "AutoRound DDP is an experimental feature" and the ranks stuck in DDP's start-up broadcast).
    Here each rank tunes its own blocks alone; applied only in a job of more than one rank. Yields whether."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        yield False
        return
    ensure_torchvision_importable()
    import auto_round.algorithms.quantization.sign_round.quantizer as sign_round

    orig = sign_round.setup_ddp_if_needed_
    sign_round.setup_ddp_if_needed_ = lambda ar, block, device_list: (block, lambda: None)
    try:
        yield True
    finally:
        sign_round.setup_ddp_if_needed_ = orig


def flatten_autoround_output(raw: Path, dest: Path) -> bool:
    """`quantize_and_save(out)` writes into `out/<model>-w4g128/`. Move the checkpoint to `dest`; returns
    True when it was in such a sub-folder (the fix was needed)."""
    subdirs = [d for d in raw.iterdir() if d.is_dir() and (d / "config.json").is_file()]
    nested = not (raw / "config.json").is_file() and len(subdirs) == 1
    shutil.move(str(subdirs[0] if nested else raw), str(dest))
    return nested


def restore_vl_config(src_root: Path, dest: Path) -> bool:
    """AutoRound's text-only path saves the TEXT config (`qwen3_5_moe_text`, no architectures) beside
    `model.language_model.*` tensors, which vLLM cannot load. Put back the source's VL config with the new
    `quantization_config`. Returns True when it was needed."""
    src_cfg = json.loads((src_root / "config.json").read_text())
    out_cfg = json.loads((dest / "config.json").read_text())
    if "text_config" not in src_cfg or "text_config" in out_cfg:
        return False
    fixed = dict(src_cfg, quantization_config=out_cfg["quantization_config"])
    (dest / "config.json").write_text(json.dumps(fixed, indent=2) + "\n")
    return True


def carry_tokenizer_and_processor(src_root: Path, dest: Path) -> bool:
    """AutoRound saves the tokenizer as transformers re-serialises it and drops vocab.json/merges.txt and the
    video processor config. Carry the source's own files over. Returns True when any was missing."""
    missing = [f for f in TOKENIZER_FILES + PROCESSOR_FILES if (src_root / f).is_file() and not (dest / f).is_file()]
    for name in TOKENIZER_FILES + PROCESSOR_FILES:
        if (src_root / name).is_file():
            shutil.copy2(src_root / name, dest / name)
    return bool(missing)


def restore_bf16_dtype(src_root: Path, dest: Path) -> bool:
    """AutoRound's `auto_gptq` export writes `dtype: float16` at the top of config.json (the text config keeps
    bfloat16). Qwen3.5 overflows in float16, and vLLM takes that dtype unless told otherwise. Put back the
    source's bfloat16. Returns True when it was needed."""
    src_cfg = json.loads((src_root / "config.json").read_text())
    cfg = json.loads((dest / "config.json").read_text())
    want = src_cfg.get("dtype") or src_cfg.get("torch_dtype")
    changed = False
    for key in ("dtype", "torch_dtype"):
        if key in cfg and want == "bfloat16" and cfg[key] != want:
            cfg[key] = want
            changed = True
    if changed:
        (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return changed


def gptq_skip_16bit_moe(dest: Path) -> bool:
    """With `auto_gptq` export, experts kept in 16-bit get one `dynamic` skip rule per expert Linear, but vLLM
    decides for the fused MoE module as a whole (prefix `...layers.N.mlp.experts`), finds no rule, treats
    the experts as int4 and fails (`No WNA16 MoE backend supports the deployment configuration`). Add a
    module-level skip rule for each block whose routed experts are all 16-bit. Returns True when needed."""
    cfg = json.loads((dest / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "gptq":
        return False
    blocks = Checkpoint(dest).expert_states()
    dynamic = q.setdefault("dynamic", {})
    added = False
    for i, states in sorted(blocks.items()):
        rule = rf"-:.*layers\.{i}\.mlp\.experts$"
        if states == {False} and rule not in dynamic:
            dynamic[rule] = {}
            added = True
    if added:
        (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return added


@contextmanager
def scoped_env(updates: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block only; the previous values (or their absence) come back after."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def hub_offline() -> Iterator[None]:
    """Hub and datasets offline for the block only. huggingface_hub and datasets read HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE once, at import, into module constants: an environment variable set for eval would
    leave a later publish of the same process (`reap run --publish`) with "offline mode is on". So the
    constants are set and restored with the variables."""
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE)
    with scoped_env({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}):
        hub_constants.HF_HUB_OFFLINE = ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = True
        try:
            yield
        finally:
            hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE = saved
