"""SignRound for the stacked routed experts of a MoE block (`quantize.expert_tuning: stacked`).

AutoRound 0.16.1 splits a block's fused experts into one `nn.Linear` per expert and projection and tunes each
through its own `WrapperLinear`: a rounding offset `value` per weight, `min_scale` / `max_scale` per group of
128, fake-quantization in every forward. On a 268-expert block that is ~800 wrappers, ~2,400 parameters for
its SignSGD step and ~10,800 kernels per tuning iteration (docs/benchmarks.md, "One block under AutoRound").

Here the same tuning state lives in a few stacked tensors per block (`value` [E, out, in/g, g], `min_scale`,
`max_scale` [E, out, in/g] for gate+up and for down), fake-quantized in one call per projection stack and run
with grouped matmuls. The algorithm is AutoRound's, unchanged, because AutoRound itself still drives it:
`wrapper_block` is the quantizer's own extension point (`SignRoundQuantizer.wrapper_block`); this module's
version hands the experts containers to `StackedExperts` and everything else to AutoRound's. AutoRound's
loop then builds the optimizer (SignSGD, lr 1/iters, its min/max lr), the LinearLR schedule, the sampling,
the loss and the best-iteration copy (`collect_best_params`) over `StackedExperts.params` as over any
wrapper's, and calls `StackedExperts.unwrapper(best)`, which writes each expert Linear's fake-quantized
weight, `scale` and `zp` exactly as `WrapperLinear.unwrapper` does, so AutoRound packs and saves the same
tensors. The fake-quantization is `auto_round.data_type.int.quant_tensor_sym` (tests/unit/test_fastround.py
compares the two), with its straight-through gradient written out so that backward needs no saved
intermediates; on CUDA both directions are compiled into fused kernels where torch.compile works.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from reap import samples

LOG = logging.getLogger("reap.fastround")
SLOTS = {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
_COMPILED: dict[str, Any] = {}  # per process: compiled kernels, and what failed on this host


def _qdq_forward(w: Any, v: Any, scale: Any, maxq: int) -> Any:
    """quant_tensor_sym's rounding: `scale * clamp(round(w / scale + v), -maxq, maxq - 1)`, in w's dtype."""
    import torch

    q = torch.clamp(torch.round(w / scale + v), -maxq, maxq - 1)
    return (scale * q).to(w.dtype)


def _qdq_backward(g: Any, w: Any, v: Any, scale: Any, maxq: int) -> tuple[Any, Any]:
    """Gradients of `_qdq_forward` as autograd takes them through quant_tensor_sym: round is a straight
    through estimator, clamp passes the gradient where its input lies in [-maxq, maxq - 1]."""
    import torch

    r = torch.round(w / scale + v)
    inside = (r >= -maxq) & (r <= maxq - 1)
    g = g.float()
    grad_t = torch.where(inside, g * scale, 0.0)
    grad_scale = (g * torch.clamp(r, -maxq, maxq - 1) - grad_t * w / (scale * scale)).sum(-1, keepdim=True)
    return grad_t, grad_scale.to(scale.dtype)


def _kernel(name: str, device: Any) -> Any:
    """The eager function, or on CUDA its torch.compile'd fusion (compiled at its first call, once per
    process; where compiling fails the eager ops, which compute the same, are used from then on)."""
    eager = {"forward": _qdq_forward, "backward": _qdq_backward}[name]
    if device.type != "cuda" or _COMPILED.get(name) is eager:
        return eager
    if name not in _COMPILED:
        import torch

        _COMPILED[name] = torch.compile(eager, dynamic=True, fullgraph=True)

    def run(*args: Any) -> Any:
        try:
            return _COMPILED[name](*args)
        except Exception as exc:  # no working compiler on this host
            LOG.warning("torch.compile failed for the stacked fake-quantization (%s); eager ops", exc)
            _COMPILED[name] = eager
            return eager(*args)

    return run


def _qdq_function() -> Any:
    import torch

    class StackedQDQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, w: Any, v: Any, scale: Any, maxq: int) -> Any:
            # as [groups, group size]: one compiled kernel serves every projection shape
            ctx.save_for_backward(w, v, scale)
            ctx.maxq = maxq
            g = v.shape[-1]
            out = _kernel("forward", w.device)(w.reshape(-1, g), v.reshape(-1, g), scale.reshape(-1, 1), maxq)
            return out.view(v.shape)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w, v, scale = ctx.saved_tensors
            g = v.shape[-1]
            grad_v, grad_scale = _kernel("backward", w.device)(
                grad.reshape(-1, g), w.reshape(-1, g), v.reshape(-1, g), scale.reshape(-1, 1), ctx.maxq
            )
            return None, grad_v.view(v.shape), grad_scale.view(scale.shape), None

    return StackedQDQ


def group_scale(wmin: Any, wmax: Any, min_scale: Any, max_scale: Any, maxq: int, dtype: Any, thresh: float) -> Any:
    """quant_tensor_sym's per-group scale from the group's min and max and the tuned coefficients."""
    import torch

    wmin_abs = -(wmin * min_scale)
    wmax_abs = wmax * max_scale
    max_v = (2 * (wmax_abs < wmin_abs).int() - 1) * torch.max(wmax_abs, wmin_abs)
    scale = (max_v / maxq).to(dtype)
    return torch.where(scale < 0, torch.clamp(scale, max=-thresh), torch.clamp(scale, min=thresh))


def eligible(container: Any) -> bool:
    """A container of per-expert MLPs (gate/up/down `nn.Linear`) that AutoRound would tune all with one scheme:
    symmetric int weights of 4 or 8 bits, 16-bit activations, groups dividing the input width, no hooks."""
    import torch
    from auto_round.utils import check_to_quantized

    if not isinstance(container, torch.nn.ModuleList) or len(container) < 2:
        return False
    sig = None
    for expert in container:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(expert, proj, None)
            if type(lin) is not torch.nn.Linear or lin.bias is not None or not check_to_quantized(lin):
                return False
            if lin._forward_hooks or lin._forward_pre_hooks or lin.weight.device.type == "meta":
                return False
            this = tuple(getattr(lin, a, None) for a in ("bits", "group_size", "sym", "data_type", "act_bits"))
            this += (getattr(lin, "scale_dtype", None),)
            if sig is None:
                sig = this
            if this != sig:
                return False
    bits, group, sym, dtype, act_bits, _ = sig
    in_widths = {getattr(container[0], p).in_features for p in ("gate_proj", "down_proj")}
    return (
        sym
        and str(dtype).startswith("int")
        and bits in (4, 8)
        and (act_bits or 16) >= 16
        and isinstance(group, int)
        and group > 0
        and all(w % group == 0 for w in in_widths)
    )


def stacked_experts(container: Any, parent: Any, enable_minmax_tuning: bool, device: Any) -> Any:
    """Wrap one experts container (an `eligible` ModuleList) of the MoE block `parent`: its weights become
    views of one stacked tensor per slot, its tuning state stacked parameters, and `parent.experts_forward`
    this module's grouped forward until `unwrapper`."""
    import torch
    import torch.nn.functional as F

    qdq = _qdq_function()

    class _Stacked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # not submodules: AutoRound's wrapper_block must not find the expert Linears, and named_modules
            # must not list them while they are tuned here
            object.__setattr__(self, "orig_layer", container)
            ref = container[0].gate_proj
            self.group_size, self.scale_dtype = ref.group_size, ref.scale_dtype
            self.maxq = 2 ** (ref.bits - 1)
            self.q_scale_thresh = 1e-8 if ref.scale_dtype == torch.float32 else 1e-5
            object.__setattr__(self, "act_fn", getattr(container, "act_fn", None) or container[0].act_fn)
            self.num_experts = len(container)
            self.params: dict[str, Any] = {}
            self.weights: dict[str, Any] = {}
            self.bounds: dict[str, tuple[Any, Any]] = {}
            self.constant: dict[str, Any] = {}
            g = self.group_size
            for slot, projs in SLOTS.items():
                with torch.no_grad():
                    w = torch.stack([torch.cat([getattr(e, p).weight.to(device) for p in projs], 0) for e in container])
                rows = 0
                for p in projs:
                    n = getattr(container[0], p).out_features
                    for i, e in enumerate(container):
                        getattr(e, p).weight.data = w[i, rows : rows + n]  # views: no second copy of the weights
                    rows += n
                n_exp, out, inp = w.shape
                wr = w.view(n_exp, out, inp // g, g)
                self.weights[slot] = w
                self.bounds[slot] = (torch.clamp(wr.amin(-1), max=0), torch.clamp(wr.amax(-1), min=0))
                value = torch.nn.Parameter(torch.zeros(wr.shape, device=device, dtype=torch.float32))
                self.params[f"value_{slot}"] = value
                for key in ("min_scale", "max_scale"):
                    ones = torch.ones(wr.shape[:-1], device=device, dtype=torch.float32)
                    if enable_minmax_tuning:
                        self.params[f"{key}_{slot}"] = torch.nn.Parameter(ones)
                    else:
                        self.constant[f"{key}_{slot}"] = ones
            object.__setattr__(parent, "experts_forward", self.routed_forward)

        def _get(self, params: dict[str, Any], key: str, slot: str) -> Any:
            name = f"{key}_{slot}"
            if name in params:
                return params[name]
            return self.params[name] if name in self.params else self.constant[name]

        def qdq(self, slot: str, params: dict[str, Any] | None = None) -> tuple[Any, Any]:
            """The slot's fake-quantized weights [E, out, in] and scales [E, out, in/g]."""
            params = params if params is not None else self.params
            v = self._get(params, "value", slot)
            mins, maxs = self._get(params, "min_scale", slot), self._get(params, "max_scale", slot)
            mins.data.clamp_(0.0, 1.0)  # as WrapperLinear._qdq_weight clamps its parameters in place
            maxs.data.clamp_(0.0, 1.0)
            wmin, wmax = self.bounds[slot]
            scale = group_scale(wmin, wmax, mins, maxs, self.maxq, self.scale_dtype, self.q_scale_thresh)
            w = self.weights[slot]
            n_exp, out, inp = w.shape
            wq = qdq.apply(w.view(v.shape), v, scale.unsqueeze(-1), self.maxq)
            return wq.view(n_exp, out, inp), scale

        def _grouped(self, x: Any, w: Any, counts: Any) -> Any:
            """x [S, in] sorted by expert @ w[e].T for each expert's rows: one grouped GEMM on CUDA (as
            AutoRound's grouped path), one GEMM per expert slice elsewhere or where it fails."""
            mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
            if x.device.type == "cuda" and mm is not None and not _COMPILED.get("no_grouped_mm"):
                try:
                    return mm(x.to(w.dtype), w.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
                except Exception as exc:
                    LOG.warning("grouped_mm failed (%s); one GEMM per expert", exc)
                    _COMPILED["no_grouped_mm"] = True
            outs, start = [], 0
            for i, n in enumerate(counts.tolist()):
                if n:
                    outs.append(F.linear(x[start : start + n], w[i]))
                    start += n
            return torch.cat(outs, 0)

        def routed_forward(self, hidden: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            """AutoRound's grouped experts forward (`_run_routes`) on the stacked fake-quantized weights."""
            tokens, width = hidden.shape
            k = top_k_index.size(-1)
            ids = top_k_index.reshape(-1)
            weights = top_k_weights.reshape(-1).to(hidden.dtype)
            _, perm = torch.sort(ids)
            counts = torch.bincount(ids, minlength=self.num_experts)
            x = hidden.index_select(0, torch.div(perm, k, rounding_mode="floor"))
            w_gate_up, _ = self.qdq("gate_up")
            inter = self.weights["down"].shape[-1]
            h = self._grouped(x, w_gate_up, counts)
            h = self.act_fn(h[:, :inter]) * h[:, inter:]
            w_down, _ = self.qdq("down")
            out = self._grouped(h, w_down, counts)
            out = out * weights.index_select(0, perm).unsqueeze(-1)
            per_pair = torch.zeros(ids.numel(), width, device=out.device, dtype=out.dtype).index_copy(0, perm, out)
            return per_pair.view(tokens, k, width).sum(dim=1)

        @torch.no_grad()
        def unwrapper(self, best_params: dict[str, Any] | None) -> Any:
            """WrapperLinear.unwrapper for every expert Linear: fake-quantized weight with the best
            parameters (zeros / ones when there are none), `scale` [out, in/g] on the CPU, `zp` = maxq."""
            best = {k: t.to(device) for k, t in (best_params or {}).items()}
            for slot, projs in SLOTS.items():
                defaults = {
                    f"value_{slot}": torch.zeros_like(self.params[f"value_{slot}"]),
                    f"min_scale_{slot}": torch.ones_like(self._get({}, "min_scale", slot)),
                    f"max_scale_{slot}": torch.ones_like(self._get({}, "max_scale", slot)),
                }
                wq, scale = self.qdq(slot, {**defaults, **best})
                self.weights[slot].copy_(wq)  # the expert Linears' weights are views of it
                rows = 0
                for p in projs:
                    n = getattr(container[0], p).out_features
                    for i, e in enumerate(container):
                        lin = getattr(e, p)
                        lin.weight.grad = None
                        lin.iters = 200  # as WrapperLinear.__init__ sets it (wrapper_block passes no iters)
                        lin.scale = scale[i, rows : rows + n].reshape(n, -1).to("cpu")
                        lin.zp = self.maxq
                    rows += n
            vars(parent).pop("experts_forward", None)
            return container

    return _Stacked()


def wrap_experts(block: Any, enable_minmax_tuning: bool, device: Any) -> list[str]:
    """Replace every eligible experts container of `block` by a stacked wrapper; returns the names of the
    expert Linears it took over (AutoRound counts them as quantized layers of the block)."""
    from auto_round.utils import set_module

    taken = []
    for name, mod in list(block.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf != "experts":
            continue
        parent = block.get_submodule(parent_name) if parent_name else block
        if not hasattr(parent, "experts_forward") or not eligible(mod):
            continue
        set_module(block, name, stacked_experts(mod, parent, enable_minmax_tuning, device))
        taken += [f"{name}.{i}.{p}" for i in range(len(mod)) for p in ("gate_proj", "up_proj", "down_proj")]
    return taken


@contextlib.contextmanager
def _one_batch_nograd_passes() -> Iterator[None]:
    """AutoRound's no-grad passes over all of a block's cached samples (its full-precision targets, then the
    tuned block's outputs, the next block's inputs) as one batch where `reap.samples.batchable`; with
    `batch_size: 1` AutoRound runs them one sample at a time (2.1 s and 1.6 s of a 212B-width block on an H200,
    docs/benchmarks.md). Keyword arguments the samples share are given once, repeated to the batch and passed
    through AutoRound's selection unchanged (as its shared cache keys are)."""
    from auto_round.algorithms.block_runner import BlockForwardRunner

    original = BlockForwardRunner.forward

    def forward(self: Any, block: Any, inputs: Any, input_others: dict, indices: Any = None, cache_device: Any = None):
        n = len(inputs) if isinstance(inputs, list) else 0
        if indices is None and n > self.batch_size:
            shared = set(self.shared_cache_keys)
            per_sample = {
                k: v
                for k, v in input_others.items()
                if isinstance(v, list) and k not in shared and "positional_inputs" not in k
            }
            if all(len(v) == n for v in per_sample.values()) and samples.batchable(inputs, per_sample):
                others = {**input_others, **{k: samples.repeated(v[0], n) for k, v in per_sample.items()}}
                saved = self.batch_size, self.shared_cache_keys
                self.batch_size, self.shared_cache_keys = n, tuple(shared | set(per_sample))
                try:
                    return original(self, block, inputs, others, None, cache_device)
                finally:
                    self.batch_size, self.shared_cache_keys = saved
        return original(self, block, inputs, input_others, indices, cache_device)

    BlockForwardRunner.forward = forward
    try:
        yield
    finally:
        BlockForwardRunner.forward = original


@contextlib.contextmanager
def stacked_expert_tuning(counter: dict[str, int]) -> Iterator[None]:
    """While the block runs, AutoRound's SignRound quantizer wraps each block with `wrapper_block` below:
    eligible experts containers stacked, everything else AutoRound's own wrappers. `counter` counts the
    blocks and expert Linears tuned stacked. Its no-grad passes run the block's samples as one batch (the same
    computation in fewer, larger passes)."""
    from auto_round.algorithms.quantization.sign_round import quantizer as sign_round

    original = sign_round.wrapper_block

    def wrapper_block(block: Any, enable_minmax_tuning: bool, enable_norm_bias_tuning: bool, **kwargs: Any) -> Any:
        taken = [] if enable_norm_bias_tuning else wrap_experts(block, enable_minmax_tuning, kwargs.get("device"))
        quantized, unquantized = original(block, enable_minmax_tuning, enable_norm_bias_tuning, **kwargs)
        if taken:
            counter["blocks"] = counter.get("blocks", 0) + 1
            counter["expert_layers"] = counter.get("expert_layers", 0) + len(taken)
        return quantized + taken, unquantized

    sign_round.wrapper_block = wrapper_block
    try:
        with _one_batch_nograd_passes():
            yield
    finally:
        sign_round.wrapper_block = original
