"""Every workaround for third-party drift lives here. Each is detected, applied only when needed, and has
a test that says when it stops being needed (tests/unit/test_compat.py, tests/integration/test_build.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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


class _InputsCaptured(Exception):
    """Stops AutoRound once the block inputs are saved: nothing after its calibration pass is needed."""


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
def autoround_captures_block_inputs(file: Path) -> Iterator[None]:
    """Block-parallel builds start each worker from inputs computed once: AutoRound's calibration pass caches
    the inputs of the first block it quantizes (calibration samples, batch layout, keyword arguments such as
    the position embeddings); here they go to `file` (with the calibration token ids and the calibrator's
    batch settings, which AutoRound reads back from it) and AutoRound is stopped there. AutoRound has no API
    to hand cached inputs from one run to another."""
    import torch
    from auto_round.utils import flatten_list, to_device

    def call(orig: Any, self: Any, block_names: Any, nsamples: int, **kwargs: Any) -> Any:
        inputs = orig(self, block_names, nsamples, **kwargs)
        tmp = file.with_name(file.name + ".tmp")
        torch.save(
            {
                "inputs": to_device(inputs[flatten_list(block_names)[0]], "cpu"),
                "input_ids": to_device(inputs.get("input_ids"), "cpu"),
                "state": {key: getattr(self, key) for key in CALIBRATOR_STATE},
            },
            tmp,
        )
        tmp.replace(file)
        raise _InputsCaptured

    with _calibrator_call(call), suppress(_InputsCaptured):
        yield


@contextmanager
def autoround_block_inputs_from(path: Path) -> Iterator[None]:
    """A block-parallel worker's first block takes the inputs saved by `autoround_captures_block_inputs`
    instead of a forward pass through the blocks before it (which its view does not have)."""
    import torch
    from auto_round.utils import flatten_list

    saved = torch.load(path, weights_only=True)
    injected = False

    def call(orig: Any, self: Any, block_names: Any, nsamples: int, **kwargs: Any) -> Any:
        nonlocal injected
        if injected or kwargs.get("layer_names"):
            return orig(self, block_names, nsamples, **kwargs)
        injected = True
        for key, value in saved["state"].items():
            setattr(self, key, value)
        return {flatten_list(block_names)[0]: saved["inputs"], "input_ids": saved["input_ids"]}

    with _calibrator_call(call):
        yield


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
