"""Every workaround for third-party drift lives here. Each is detected, applied only when needed, and has
a test that says when it stops being needed (tests/unit/test_compat.py, tests/integration/test_build.py).
"""

from __future__ import annotations

_TORCHVISION_LIB = None  # keeps the op schemas registered for the life of the process


def torchvision_ops_missing() -> bool:
    """PyPI's torchvision is a CUDA build; beside a CPU torch its C ops fail to load and `import torchvision`
    then raises `operator torchvision::nms does not exist`."""
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018
        return False
    except (AttributeError, RuntimeError):
        return True


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
