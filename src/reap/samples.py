"""AutoRound's cached calibration samples of one block as one batch.

AutoRound caches a block's inputs per sample: hidden states [1, T, D] and keyword arguments (position
embeddings, position ids, masks) either per sample or shared. With `batch_size: 1` it runs a block's no-grad
passes one sample at a time; where every sample has one shape and the same keyword arguments (calibration
samples of one length), they can run as one batch: the same values up to rounding, a fraction of the time on a
GPU (docs/benchmarks.md: 0.5-0.8 s against 6.4-13 s a block at the 212B width). Used by the parallel build's
full-precision pass and by `expert_tuning: stacked`'s no-grad passes.
"""

from __future__ import annotations

from typing import Any


def same_for_all(values: list[Any]) -> bool:
    """Whether the per-sample values of one keyword argument are all equal (tensors, tuples of them, None)."""
    import torch

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, tuple | list) and isinstance(b, tuple | list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        if torch.is_tensor(a) and torch.is_tensor(b):
            return a.shape == b.shape and bool(torch.equal(a, b))
        return a is b or a == b

    return all(same(values[0], v) for v in values[1:])


def repeated(value: Any, n: int) -> Any:
    """One sample's keyword argument for a batch of n samples: tensors repeated along their first dimension of
    size 1, the batch one (position embeddings [1, T, D], mrope position ids [3, 1, T], masks [1, 1, T, T])."""
    import torch

    if isinstance(value, tuple):
        return tuple(repeated(v, n) for v in value)
    if torch.is_tensor(value) and 1 in value.shape:
        return torch.cat([value] * n, dim=list(value.shape).index(1))
    return value


def batchable(hidden: list[Any], per_sample: dict[str, list[Any]]) -> bool:
    """Whether samples with these hidden states and per-sample keyword arguments can run as one batch."""
    return len({tuple(h.shape) for h in hidden}) == 1 and all(same_for_all(v) for v in per_sample.values())
