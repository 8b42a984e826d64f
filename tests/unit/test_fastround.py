"""reap.fastround against AutoRound 0.16.1's own code on a small random MoE experts container: the stacked
fake-quantization, its gradients, a few SignSGD steps and the unwrapped weights, scales and zero points."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

E, H, INTER, TOKENS, TOP_K, GROUP = 4, 64, 32, 24, 2, 32


@pytest.fixture(autouse=True, scope="module")
def _importable():
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers' and AutoRound's Qwen3.5 code import torchvision


def _experts(seed: int = 0):
    """AutoRound's layout after it unfuses a Qwen3.5-MoE block: a ModuleList of MLPs with per-expert Linears,
    the scheme attributes AutoRound's layer config puts on them (W4 g32 sym, fp16 scales)."""
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeMLP

    torch.manual_seed(seed)
    cfg = Qwen3_5MoeTextConfig(hidden_size=H, moe_intermediate_size=INTER)
    experts = torch.nn.ModuleList([Qwen3_5MoeMLP(cfg, INTER) for _ in range(E)]).to(torch.bfloat16)
    for mlp in experts:
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.data.normal_(0, 0.05)
            for key, value in dict(
                bits=4, group_size=GROUP, sym=True, data_type="int", act_bits=16, scale_dtype=torch.float16
            ).items():
                setattr(lin, key, value)
    return experts


class _Moe(torch.nn.Module):
    """The part of AutoRound's LinearQwen3_5MoeSparseMoeBlock that fastround replaces: `experts_forward`."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def experts_forward(self, hidden, top_k_index, top_k_weights):
        from auto_round.modeling.fused_moe.utils import sequential_moe_forward

        return sequential_moe_forward(hidden, top_k_index, top_k_weights, self.experts, E)

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.experts_forward(hidden, top_k_index, top_k_weights)


def _routing(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, H, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(TOKENS)])
    w = torch.softmax(torch.randn(TOKENS, TOP_K, generator=g), -1).to(torch.bfloat16)
    return x, idx, w


def _autoround_wrapped(moe):
    from auto_round.wrapper import WrapperLinear

    for mlp in moe.experts:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, proj, WrapperLinear(getattr(mlp, proj), enable_minmax_tuning=True, device="cpu"))
    return moe


def _stacked(moe):
    from reap.fastround import wrap_experts

    taken = wrap_experts(moe, enable_minmax_tuning=True, device="cpu")
    assert len(taken) == 3 * E and taken[0] == "experts.0.gate_proj"
    return moe


def _signsgd(params, lr):
    from auto_round.algorithms.quantization.sign_round.sign_sgd import SignSGD

    return SignSGD(params, lr=lr, weight_decay=0)


def _per_expert(stacked, slot, key, e, proj):
    """The slice of a stacked tuning tensor that belongs to expert `e`'s `proj` (gate and up share gate_up)."""
    t = stacked.params[f"{key}_{slot}"]
    rows = {"gate_proj": slice(0, INTER), "up_proj": slice(INTER, 2 * INTER), "down_proj": slice(0, H)}[proj]
    return t[e, rows]


def test_stacked_fake_quantization_is_quant_tensor_sym_with_its_gradients():
    from auto_round.data_type.int import quant_tensor_sym

    from reap.fastround import _qdq_function, group_scale

    torch.manual_seed(0)
    w = (torch.randn(8, 4, GROUP) * 0.05).to(torch.bfloat16)
    v = (torch.rand(8, 4, GROUP) - 0.5).requires_grad_()
    mins = (torch.rand(8, 4) * 0.5 + 0.5).requires_grad_()
    maxs = (torch.rand(8, 4) * 0.5 + 0.5).requires_grad_()
    wmin, wmax = torch.clamp(w.amin(-1), max=0), torch.clamp(w.amax(-1), min=0)
    g = torch.randn(8, 4, GROUP).to(torch.bfloat16)

    ref, ref_scale, maxq = quant_tensor_sym(
        w.reshape(-1, GROUP),
        bits=4,
        group_size=GROUP,
        v=v.reshape(-1, GROUP),
        min_scale=mins.reshape(-1),
        max_scale=maxs.reshape(-1),
        scale_dtype=torch.float16,
        tensor_min=wmin.reshape(-1),
        tensor_max=wmax.reshape(-1),
    )
    (ref.to(torch.bfloat16).reshape(g.shape).float() * g.float()).sum().backward()
    ref_grads = [t.grad.clone() for t in (v, mins, maxs)]
    for t in (v, mins, maxs):
        t.grad = None

    scale = group_scale(wmin, wmax, mins, maxs, 8, torch.float16, 1e-5)
    out = _qdq_function().apply(w, v, scale.unsqueeze(-1), 8)
    (out.float() * g.float()).sum().backward()

    assert maxq == 8 and out.dtype == torch.bfloat16
    assert torch.equal(out.reshape(-1, GROUP), ref.to(torch.bfloat16))
    assert torch.equal(scale.reshape(-1, 1), ref_scale)
    for mine, theirs in zip((v.grad, mins.grad, maxs.grad), ref_grads, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-2, atol=1e-4)
        assert (torch.sign(mine) == torch.sign(theirs)).float().mean() > 0.99  # SignSGD steps by the sign


def test_stacked_experts_tune_and_unwrap_as_autoround_does():
    # Both sides run AutoRound's own loop pieces: its SignSGD, its collect_best_params and unwrapper_block.
    from auto_round.compressors.utils import collect_best_params
    from auto_round.wrapper import unwrapper_block

    x, idx, rw = _routing()
    target = torch.randn(TOKENS, H).to(torch.bfloat16)
    ref, fast = _autoround_wrapped(_Moe(_experts())), _stacked(_Moe(_experts()))
    assert type(fast.experts).__name__ == "_Stacked" and "experts_forward" in vars(fast)
    assert not [n for n, _ in fast.named_modules() if n.startswith("experts.")]  # hidden while tuned

    ref_params = [p for m in ref.modules() if hasattr(m, "params") for p in m.params.values()]
    opt_ref, opt_fast = _signsgd(ref_params, 0.05), _signsgd(list(fast.experts.params.values()), 0.05)
    for step in range(6):
        losses = []
        for moe, opt in ((ref, opt_ref), (fast, opt_fast)):
            out = moe(x, idx, rw)
            loss = torch.nn.functional.mse_loss(out.float(), target.float()) * 1000
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        assert abs(losses[0] - losses[1]) <= 0.01 * losses[0], (step, losses)
    # after the same steps the tuning state agrees (sign steps of the same gradients)
    agree = []
    for e in range(E):
        for proj, slot in (("gate_proj", "gate_up"), ("up_proj", "gate_up"), ("down_proj", "down")):
            wrapper = getattr(ref.experts[e], proj)
            for key in ("value", "min_scale", "max_scale"):
                mine = _per_expert(fast.experts, slot, key, e, proj).reshape(getattr(wrapper, key).shape)
                agree.append((mine == getattr(wrapper, key)).float().mean().item())
    assert min(agree) > 0.97, agree

    unwrapper_block(ref, collect_best_params(ref))
    unwrapper_block(fast, collect_best_params(fast))
    assert type(fast.experts).__name__ == "ModuleList" and "experts_forward" not in vars(fast)
    for e in range(E):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            a, b = getattr(ref.experts[e], proj), getattr(fast.experts[e], proj)
            assert type(a) is type(b) is torch.nn.Linear
            assert a.scale.shape == b.scale.shape and a.scale.dtype == b.scale.dtype == torch.float16
            assert a.zp == b.zp == 8 and b.scale.device.type == "cpu"
            assert (a.weight == b.weight).float().mean() > 0.97 and (a.scale == b.scale).float().mean() > 0.97
    # the stacked forward on the unwrapped (quantized) weights is AutoRound's own MoE forward
    assert torch.allclose(ref(x, idx, rw).float(), fast(x, idx, rw).float(), atol=0.05)


def test_containers_outside_the_scheme_are_left_to_autoround():
    from reap.fastround import eligible, wrap_experts

    experts = _experts()
    assert eligible(experts)
    experts[1].down_proj.bits = 8  # mixed bits: AutoRound's per-expert wrappers handle it
    assert not eligible(experts)
    moe = _Moe(experts)
    assert wrap_experts(moe, True, "cpu") == [] and type(moe.experts).__name__ == "ModuleList"
    experts[1].down_proj.bits = 4
    experts[2].up_proj.act_bits = 8
    assert not eligible(experts)


class _CountingBlock(torch.nn.Module):
    """A block with a decoder layer's call signature; records the batch of every call."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(H, H) / H**0.5)
        self.batches: list[int] = []

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None):
        self.batches.append(hidden_states.shape[0])
        cos, sin = position_embeddings
        return (torch.tanh(hidden_states @ self.weight) * cos + sin,)


def _runner():
    from auto_round.algorithms.block_runner import BlockForwardRunner

    return BlockForwardRunner(batch_size=1, device="cpu", amp=False, enable_torch_compile=False)


def test_nograd_passes_run_a_block_s_samples_as_one_batch_with_the_same_outputs():
    from reap.fastround import _one_batch_nograd_passes

    g = torch.Generator().manual_seed(4)
    n, t = 5, 7
    inputs = [torch.randn(1, t, H, generator=g) for _ in range(n)]
    cos, sin = torch.randn(1, t, H, generator=g), torch.randn(1, t, H, generator=g)
    others = {"position_embeddings": [(cos, sin)] * n, "attention_mask": [None] * n}
    block = _CountingBlock()
    with torch.no_grad():
        one_by_one = _runner()(block, inputs, dict(others))
        assert block.batches == [1] * n
        block.batches.clear()
        with _one_batch_nograd_passes():
            batched = _runner()(block, inputs, dict(others))
            assert block.batches == [n]
            block.batches.clear()
            # a tuning step's selection (indices given) stays AutoRound's, one sample at a time
            picked = _runner()(block, inputs, dict(others), indices=[2])
            assert block.batches == [1] and torch.allclose(picked, one_by_one[2], atol=1e-6)
            block.batches.clear()
            # samples of different lengths, or keyword arguments that differ per sample: one at a time
            ragged = [*inputs[:-1], torch.randn(1, t + 1, H, generator=g)]
            ragged_pe = [(cos, sin)] * (n - 1) + [(torch.randn(1, t + 1, H), torch.randn(1, t + 1, H))]
            _runner()(block, ragged, {"position_embeddings": ragged_pe, "attention_mask": [None] * n})
            assert block.batches == [1] * n
            block.batches.clear()
            other_sin = [(cos, sin)] * (n - 1) + [(cos, torch.zeros_like(sin))]
            _runner()(block, inputs, {"position_embeddings": other_sin, "attention_mask": [None] * n})
            assert block.batches == [1] * n
    assert len(batched) == n and all(b.shape == (1, t, H) for b in batched)
    for a, b in zip(one_by_one, batched, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
