"""Every workaround for third-party drift lives here. Each is detected, applied only when needed, and has
a test that says when it stops being needed (tests/unit/test_compat.py, tests/integration/test_build.py).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from reap.checkpoint import PROCESSOR_FILES, TOKENIZER_FILES, layer_index

if TYPE_CHECKING:
    from reap.checkpoint import Checkpoint

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

def autoround_mllm_path_fails(src: "Checkpoint") -> bool:
    """AutoRound takes its multimodal path for a VL checkpoint; that path needs the processor files and fails
    (`Can't load image processor`) without them. Then the text-only path is the one that works."""
    from auto_round.utils.model import is_mllm_model

    has_processor = any((src.root / f).is_file() for f in PROCESSOR_FILES)
    return bool(is_mllm_model(str(src.root))) and not has_processor


@contextmanager
def autoround_text_only(src: "Checkpoint") -> Iterator[bool]:
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
    return {name.replace("model.language_model.", "model.", 1): cfg for name, cfg in layer_config.items()
            if not name.startswith("model.visual.")}


@contextmanager
def autoround_saves_only_blocks(start: int, stop: int) -> Iterator[None]:
    """A block-parallel worker's view holds decoder blocks it does not quantize: those before its range (run
    untuned, the full-precision prefix) and, in the source shards its links point to, those after it. The
    merge takes none of them, but AutoRound would write them all: its ShardWriter saves every block of the
    model in 16-bit, and after saving it copies each source tensor "absent from the saved output" (meant for
    MTP layers) into `model_extra_tensors.safetensors`. Measured on the 8-block slice of the 212B width: the
    4 workers filled the host's 235 GB disk. Both go through one function each; tensors of decoder blocks
    outside [start, stop) are left out there."""
    from auto_round.compressors.shard_writer import ShardWriter
    from auto_round.utils import missing_tensors

    def own(name: str) -> bool:
        layer = layer_index(name)
        return layer is None or start <= layer < stop

    add_tensor, resolve_maps = ShardWriter._add_tensor, missing_tensors._resolve_tensor_shard_maps

    def add_own_tensor(self, name, tensor):
        if own(name):
            add_tensor(self, name, tensor)

    def resolve_own_maps(source_dir, target_dir):
        maps = resolve_maps(source_dir, target_dir)
        return None if maps is None else ({n: f for n, f in maps[0].items() if own(n)}, maps[1])

    ShardWriter._add_tensor, missing_tensors._resolve_tensor_shard_maps = add_own_tensor, resolve_own_maps
    try:
        yield
    finally:
        ShardWriter._add_tensor, missing_tensors._resolve_tensor_shard_maps = add_tensor, resolve_maps


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
    from reap.checkpoint import Checkpoint

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
