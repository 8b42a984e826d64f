"""`reap prune`: the saliency math, the streamed observation, bit-identical slicing, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from reap.checkpoint import Checkpoint
from reap.cli import reap
from reap.errors import InputError, OutputExistsError, UnsupportedModelError
from reap.prune import (
    ExpertStats,
    experts_to_keep,
    moe_layout,
    observe,
    observe_block,
    plan_tensor,
    prune,
    pruned_config,
    read_calibration,
    select,
    slice_checkpoint,
)

TEXT = dict(
    vocab_size=320,
    hidden_size=32,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    linear_num_key_heads=1,
    linear_num_value_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [1, 1, 0],
        "mrope_interleaved": True,
    },
)
VISION = dict(
    depth=1,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=32,
    num_position_embeddings=16,
)
WORDS = ["Which is larger: 47 or 82?\nAnswer: 82\n", "Reverse: kbtrx\nAnswer: xrtbk\n"]


def torch_ready():
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch

    return torch


# --- the saliency math on a hand-made block --------------------------------------------------------------


def test_saliency_of_a_hand_made_block_with_known_routing_and_outputs():
    torch = torch_ready()
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = Qwen3_5MoeTextConfig(
        hidden_size=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=1, shared_expert_intermediate_size=1
    )
    cfg._experts_implementation = "eager"
    block = Qwen3_5MoeSparseMoeBlock(cfg).float()
    c = [1.0, 2.0, 3.0, 4.0]  # ||down_proj|| of each expert
    with torch.no_grad():
        block.gate.weight.copy_(torch.diag(torch.tensor([3.0, 2.0, 1.0, 4.0])))  # logits = diag * x
        for j in range(4):
            block.experts.gate_up_proj[j] = torch.stack([torch.ones(4), (j + 1) * torch.ones(4)])  # g.x, u.x
            block.experts.down_proj[j] = torch.tensor([[c[j]], [0.0], [0.0], [0.0]])
    # logits: token 0 [3, 2, 0, 0] -> experts 0, 1; token 1 [0, 2, 1, 0] -> 1, 2; token 2 [0, 0, 1, 4] -> 3, 2
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    stats = ExpertStats(4)
    reference = block(x.view(1, 3, 4))
    handle = observe_block(block, stats)
    observed = block(x.view(1, 3, 4))
    handle.remove()
    assert torch.equal(observed, reference)  # observing does not change what the block computes

    def renorm(a: float, b: float) -> tuple[float, float]:  # softmax over all experts, renormalised over top-2
        return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))

    silu2 = 2 / (1 + math.exp(-2))  # every token has g.x = 2
    norm = [c[j] * silu2 * 2 * (j + 1) for j in range(4)]  # ||f_j(x)|| = c_j * silu(g.x) * u.x, u.x = 2 (j + 1)
    g0 = renorm(3, 2)
    g1 = renorm(2, 1)
    g2 = renorm(4, 1)
    gates = {0: [g0[0]], 1: [g0[1], g1[0]], 2: [g1[1], g2[1]], 3: [g2[0]]}
    expected_reap = [sum(g * norm[j] for g in gates[j]) / len(gates[j]) for j in range(4)]
    assert stats.scores("frequency") == [1, 2, 2, 1]
    assert stats.scores("reap") == pytest.approx(expected_reap, rel=1e-5)
    assert stats.scores("ean") == pytest.approx(norm, rel=1e-5)
    assert select(stats.scores("reap"), 2) == ([1, 3], [0, 2])
    assert select(stats.scores("frequency"), 2) == ([1, 2], [0, 3])


def test_running_sums_accumulate_and_an_unrouted_expert_scores_zero():
    torch = torch_ready()
    stats = ExpertStats(3)
    for _ in range(2):
        stats.add(torch.tensor([[0, 1]]), torch.tensor([[0.75, 0.25]]), torch.tensor([[2.0, 4.0]]))
    stats.add(torch.tensor([[1, 0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 6.0]]))
    assert stats.scores("frequency") == [3, 3, 0]
    assert stats.scores("reap") == pytest.approx([(1.5 + 1.5 + 3.0) / 3, (1.0 + 1.0 + 0.5) / 3, 0.0])
    assert stats.scores("ean") == pytest.approx([10 / 3, 3.0, 0.0])


def test_select_keeps_the_highest_scores_and_breaks_ties_by_index():
    assert select([0.5, 0.1, 0.9, 0.1, 0.3], 3) == ([0, 2, 4], [1, 3])
    assert select([1.0, 1.0, 1.0, 1.0], 2) == ([0, 1], [2, 3])


# --- tiny real checkpoints ------------------------------------------------------------------------------


def save_tiny_vl(root: Path, seed: int = 0) -> Path:
    """A random-init Qwen3_5MoeForConditionalGeneration (2 layers x 6 experts, top-2) saved like a release
    (per-expert tensors on disk, sharded), with a tokenizer trained on two demo rows."""
    torch = torch_ready()
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from reap.demo import train_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen3_5MoeConfig(text_config=TEXT, vision_config=VISION, architectures=["Qwen3_5MoeForConditionalGeneration"])
    model = Qwen3_5MoeForConditionalGeneration(cfg).float().eval()
    model.save_pretrained(str(root), max_shard_size="200KB")
    train_tokenizer(WORDS * 20).save_pretrained(str(root))
    (root / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return root


def save_tiny_qwen3_moe(root: Path) -> Path:
    torch = torch_ready()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    )
    Qwen3MoeForCausalLM(cfg).float().eval().save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_vl(tmp_path_factory.mktemp("tiny") / "src")


def hooked_full_model_stats(model, layers, ids, num_experts):
    """Reference: the same hooks on the whole model in memory, one ordinary forward."""
    torch = torch_ready()
    stats = {i: ExpertStats(num_experts) for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")}
    handles = [observe_block(layers[i].mlp, s) for i, s in stats.items()]
    with torch.no_grad():
        model(input_ids=torch.tensor(ids))
    for h in handles:
        h.remove()
    return stats


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_moe"])
def test_streamed_block_by_block_observation_equals_hooks_on_the_whole_model(arch, tiny, tmp_path):
    torch = torch_ready()
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if arch == "qwen3_5_moe":
        root = tiny
        model = AutoModelForImageTextToText.from_pretrained(str(root), dtype=torch.float32).eval()
        layers = model.model.language_model.layers
    else:
        root = save_tiny_qwen3_moe(tmp_path / "q3")
        model = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32).eval()
        layers = model.model.layers
    ckpt = Checkpoint.open(root)
    layout = moe_layout(ckpt)
    assert layout.moe_layers == ((0, 1) if arch == "qwen3_5_moe" else (0, 2))  # qwen3_moe layer 1 is dense
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (11, 24), generator=gen).tolist()  # 11 samples: two batches of 8 and 3
    streamed = observe(ckpt, layout, ids, "cpu")
    reference = hooked_full_model_stats(model, layers, ids, layout.num_experts)
    assert set(streamed) == set(reference)
    for i in streamed:
        assert streamed[i].scores("frequency") == reference[i].scores("frequency")
        assert sum(streamed[i].scores("frequency")) == 11 * 24 * 2
        for method in ("reap", "ean"):
            assert streamed[i].scores(method) == pytest.approx(reference[i].scores(method), rel=1e-4)


# --- slicing ----------------------------------------------------------------------------------------------


def test_prune_slices_bit_identically_and_the_model_computes_the_masked_original(tiny, tmp_path):
    torch = torch_ready()
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "pruned"
    record = prune(tiny, out, keep=4, method="random", seed=3)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model"]
    assert not out.with_name("pruned.partial").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["prune"]["status"] == "done" and manifest["stages"]["prune"]["layers"] == record["layers"]
    kept = {row["layer"]: row["kept"] for row in record["layers"]}
    assert all(len(k) == 4 for k in kept.values())
    src = {k: v for f in tiny.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    new = {k: v for f in (out / "model").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    p = "model.language_model.layers."
    for i, survivors in kept.items():
        for new_j, old_j in enumerate(survivors):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                a = src[f"{p}{i}.mlp.experts.{old_j}.{proj}.weight"]
                b = new.pop(f"{p}{i}.mlp.experts.{new_j}.{proj}.weight")
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        router = new.pop(f"{p}{i}.mlp.gate.weight")
        assert torch.equal(router.view(torch.uint8), src[f"{p}{i}.mlp.gate.weight"][survivors].view(torch.uint8))
    for key, t in new.items():  # everything else: the source tensor, bit for bit
        assert torch.equal(t.view(torch.uint8), src[key].view(torch.uint8)), key
    assert set(new) == {k for k in src if ".mlp.experts." not in k and not k.endswith(".mlp.gate.weight")}
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
    assert Checkpoint.open(out / "model").tensors and not Checkpoint.open(out / "model").problems
    assert len(index["weight_map"]) == len(src) - 2 * 2 * 3
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["text_config"]["num_experts"] == 4 and "vision_config" in cfg
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "reap_prune.json"):
        assert (out / "model" / name).is_file(), name
    assert "license: mit" in (out / "model" / "README.md").read_text()

    # The pruned model computes what the original computes with the dropped experts' router logits at -inf.
    original = AutoModelForImageTextToText.from_pretrained(str(tiny), dtype=torch.float32).eval()
    pruned = AutoModelForImageTextToText.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    for i, layer in enumerate(original.model.language_model.layers):
        router = layer.mlp.gate
        dropped = [j for j in range(6) if j not in kept[i]]

        def masked(h, router=router, dropped=dropped):
            logits = torch.nn.functional.linear(h.reshape(-1, router.hidden_dim), router.weight)
            logits[:, dropped] = float("-inf")
            top, idx = torch.topk(torch.softmax(logits, dim=-1), router.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx

        router.forward = masked
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5)


def test_reap_prune_with_calibration_records_the_saliency_report(tiny, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": w * 3}) + "\n" for w in WORDS * 4))
    record = prune(tiny, tmp_path / "out", ratio=0.5, calibration=calib, nsamples=4, seqlen=32)
    assert record["experts_after"] == 3 and record["calibration"]["samples"] == 4
    assert record["calibration"]["tokens"] == 4 * 32
    for row in record["layers"]:
        assert sum(row["routed_tokens"]) == 4 * 32 * 2
        assert sorted(row["kept"] + row["dropped"]) == list(range(6))
        assert min(row["scores"][j] for j in row["kept"]) >= max(row["scores"][j] for j in row["dropped"])
    for stage in ("calibration", "observation", "slicing"):
        assert record["substages"][stage] >= 0
    assert record["peak_rss_gb"] > 0 and record["peak_vram_gb"] is None
    assert len(record["layer_wall_s"]) == 2


def fabricated(root: Path, with_mtp: bool = True) -> Path:
    """A Qwen3.5-shaped checkpoint of one MoE layer of 4 experts with a router bias, a fused expert tensor
    pair in layer 1, and MTP tensors: only the header layout matters."""
    torch = torch_ready()
    from safetensors.torch import save_file

    p = "model.language_model.layers."
    t = {
        f"{p}0.mlp.gate.weight": torch.arange(32.0).view(4, 8),
        f"{p}0.mlp.gate.e_score_correction_bias": torch.arange(4.0),
        f"{p}0.mlp.shared_expert_gate.weight": torch.ones(1, 8),
        f"{p}0.mlp.shared_expert.up_proj.weight": torch.ones(2, 8),
        "model.language_model.embed_tokens.weight": torch.ones(10, 8),
        "model.visual.blocks.0.attn.qkv.weight": torch.ones(3, 8),
        f"{p}1.mlp.gate.weight": torch.arange(32.0).view(4, 8) + 100,
        f"{p}1.mlp.experts.gate_up_proj": torch.arange(4.0 * 4 * 8).view(4, 4, 8),
        f"{p}1.mlp.experts.down_proj": torch.arange(4.0 * 8 * 2).view(4, 8, 2),
    }
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            t[f"{p}0.mlp.experts.{e}.{proj}.weight"] = torch.full((2, 8), float(e))
    if with_mtp:
        t |= {
            "mtp.fc.weight": torch.ones(8, 16),
            "mtp.layers.0.mlp.gate.weight": torch.ones(4, 8),
            "mtp.layers.0.mlp.experts.0.up_proj.weight": torch.ones(2, 8),
        }
    root.mkdir(parents=True)
    save_file(t, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3_5_moe",
                "vision_config": {},
                "text_config": {
                    "num_experts": 4,
                    "num_experts_per_tok": 2,
                    "mtp_num_hidden_layers": 1 if with_mtp else 0,
                },
            }
        )
    )
    return root


def test_plan_on_a_fabricated_header_drops_mtp_and_slices_router_rows_and_bias(tmp_path):
    ckpt = Checkpoint.open(fabricated(tmp_path / "src"))
    layout = moe_layout(ckpt)
    assert layout.prefix == "model.language_model.layers." and layout.moe_layers == (0, 1)
    kept = {0: [1, 3], 1: [0, 2]}
    p = layout.prefix
    assert plan_tensor("mtp.layers.0.mlp.experts.0.up_proj.weight", (2, 8), layout, kept) == ("drop", None, None)
    assert plan_tensor("mtp.fc.weight", (8, 16), layout, kept) == ("drop", None, None)
    assert plan_tensor(f"{p}0.mlp.experts.3.up_proj.weight", (2, 8), layout, kept) == (
        "copy",
        f"{p}0.mlp.experts.1.up_proj.weight",
        None,
    )
    assert plan_tensor(f"{p}0.mlp.experts.2.up_proj.weight", (2, 8), layout, kept) == ("drop", None, None)
    assert plan_tensor(f"{p}0.mlp.gate.e_score_correction_bias", (4,), layout, kept) == (
        "rows",
        f"{p}0.mlp.gate.e_score_correction_bias",
        [1, 3],
    )
    assert plan_tensor(f"{p}0.mlp.shared_expert_gate.weight", (1, 8), layout, kept)[0] == "copy"
    assert plan_tensor(f"{p}1.mlp.experts.down_proj", (4, 8, 2), layout, kept) == (
        "rows",
        f"{p}1.mlp.experts.down_proj",
        [0, 2],
    )
    with pytest.raises(UnsupportedModelError, match="fused expert tensor"):
        plan_tensor(f"{p}1.mlp.experts.down_proj", (8, 4, 2), layout, kept)

    out = tmp_path / "out"
    out.mkdir()
    counts = slice_checkpoint(ckpt, layout, kept, out)
    assert counts == {"copied": 4 + 6, "sliced": 5, "dropped_experts": 6, "dropped_mtp": 3}
    from safetensors.torch import load_file

    new = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("mtp.") for k in new)
    assert new[f"{p}0.mlp.gate.e_score_correction_bias"].tolist() == [1.0, 3.0]
    assert new[f"{p}0.mlp.experts.1.down_proj.weight"].unique().tolist() == [3.0]
    assert new[f"{p}1.mlp.experts.gate_up_proj"].shape == (2, 4, 8)
    assert new[f"{p}1.mlp.gate.weight"][1, 0].item() == 116.0
    cfg = pruned_config(ckpt.config, 2, mtp_dropped=counts["dropped_mtp"] > 0)
    assert cfg["text_config"]["num_experts"] == 2 and cfg["text_config"]["mtp_num_hidden_layers"] == 0
    assert ckpt.config["text_config"]["num_experts"] == 4  # the source's config is not touched


def test_layer_state_fuses_per_expert_tensors_and_names_missing_ones(tmp_path):
    torch = torch_ready()
    from safetensors.torch import load_file, save_file

    from reap.prune import layer_state

    root = fabricated(tmp_path / "src")
    state = layer_state(Checkpoint.open(root), moe_layout(Checkpoint.open(root)), 0)
    gate_up, down = state["mlp.experts.gate_up_proj"], state["mlp.experts.down_proj"]
    assert gate_up.shape == (4, 4, 8) and down.shape == (4, 2, 8)
    assert all(torch.equal(gate_up[e], torch.full((4, 8), float(e))) for e in range(4))
    assert set(state) == {
        "mlp.gate.weight",
        "mlp.gate.e_score_correction_bias",
        "mlp.shared_expert_gate.weight",
        "mlp.shared_expert.up_proj.weight",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
    }
    tensors = load_file(str(root / "model.safetensors"))
    del tensors["model.language_model.layers.0.mlp.experts.2.up_proj.weight"]
    save_file(tensors, str(root / "model.safetensors"))
    with pytest.raises(InputError, match=r"layer 0 lacks expert tensors \[\(2, 'up_proj'\)\]"):
        layer_state(Checkpoint.open(root), moe_layout(Checkpoint.open(root)), 0)


def test_a_layer_that_does_not_match_its_config_is_named(tiny, tmp_path):
    import shutil

    from .ckpt_factory import edit_index

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    edit_index(broken, drop=["model.language_model.layers.1.input_layernorm.weight"])
    ckpt = Checkpoint.open(broken)
    with pytest.raises(InputError, match=r"layer 1 does not match its config: missing \['input_layernorm.weight'\]"):
        observe(ckpt, moe_layout(ckpt), [[1, 2, 3, 4]], "cpu")


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, keep, match",
    [
        (0.0, None, r"outside \(0, 1\)"),
        (1.0, None, r"outside \(0, 1\)"),
        (1.5, None, r"outside \(0, 1\)"),
        (-0.2, None, r"outside \(0, 1\)"),
        (None, 8, "nothing to prune"),
        (None, 9, "nothing to prune"),
        (None, 1, "fewer than the 2 experts"),
        (0.9, None, "fewer than the 2 experts"),
        (0.01, None, "nothing to prune"),
        (None, None, "exactly one"),
        (0.5, 4, "exactly one"),
    ],
)
def test_bad_sizes(ratio, keep, match):
    with pytest.raises(InputError, match=match):
        experts_to_keep(8, 2, ratio, keep)


def test_sizes():
    assert experts_to_keep(8, 2, 0.25, None) == 6 and experts_to_keep(8, 2, 0.5, None) == 4
    assert experts_to_keep(512, 10, None, 268) == 268 and experts_to_keep(8, 2, None, 2) == 2


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "at least one row"),
        (b"\n\n", "at least one row"),
        (b'{"text": "ok"}\nnot json\n', "unreadable"),
        (b'{"txt": "x"}\n', "at least one row"),
        (b'{"text": ""}\n', "non-empty"),
        (b"\xff\xfe\x00", "unreadable"),
        (b'["text"]\n', "at least one row"),
    ],
)
def test_bad_calibration_files(tmp_path, content, match):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_calibration(path)


def test_unreadable_calibration_is_refused_before_any_weight_is_read(tiny, tmp_path):
    with pytest.raises(InputError, match="unreadable"):
        prune(tiny, tmp_path / "o", ratio=0.5, calibration=tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="needs calibration"):
        prune(tiny, tmp_path / "o", ratio=0.5)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_models_that_cannot_be_pruned(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UnsupportedModelError, match="`llama` model without routed experts"):
        prune(tmp_path / "llama", tmp_path / "o", ratio=0.5, method="random")
    quantized = fabricated(tmp_path / "q", with_mtp=False)
    cfg = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(InputError, match="quantized"):
        prune(quantized, tmp_path / "o", ratio=0.5, method="random")
    with pytest.raises(InputError, match="not found"):
        prune(tmp_path / "nope", tmp_path / "o", ratio=0.5, method="random")


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    src = fabricated(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prune(src, out, ratio=0.5, method="random")
    assert (out / "keep.txt").is_file()
    record = prune(src, out, ratio=0.5, method="random", overwrite=True)
    assert record["mtp"] == "dropped" and (out / "model" / "config.json").is_file()
    with pytest.raises(OutputExistsError, match="--overwrite"):  # now a pruned model is there
        prune(src, out, ratio=0.5, method="random")
    for target in (src, tmp_path):  # the source itself, or a folder holding it
        with pytest.raises(InputError, match="would replace the source"):
            prune(src, target, ratio=0.5, method="random", overwrite=True)
    assert (src / "model.safetensors").is_file()
    assert json.loads((out / "model" / "config.json").read_text())["text_config"]["num_experts"] == 2


def one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_bad_input_is_one_line(tmp_path):
    src = fabricated(tmp_path / "src")
    run = CliRunner().invoke
    r = run(reap, ["prune", str(src), "--out", str(tmp_path / "o"), "--ratio", "1.5", "--method", "random"])
    assert r.exit_code == 2 and "'--ratio': 1.5 is not in the range 0<x<1" in r.output, r.output
    one_error_line(
        run(reap, ["prune", str(src), "--out", str(tmp_path / "o"), "--keep", "4", "--method", "random"]),
        "nothing to prune",
    )
    one_error_line(
        run(reap, ["prune", str(src), "--out", str(tmp_path / "o"), "--keep", "1", "--method", "random"]),
        "fewer than the 2 experts",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_error_line(
        run(reap, ["prune", str(src), "--out", str(tmp_path / "o"), "--ratio", "0.5", "--calibration", str(empty)]),
        "at least one row",
    )
    assert not (tmp_path / "o").exists()


def test_cli_prunes_and_prints_the_report(tmp_path):
    src = fabricated(tmp_path / "src")
    r = CliRunner().invoke(
        reap, ["prune", str(src), "--out", str(tmp_path / "o"), "--ratio", "0.5", "--method", "random"]
    )
    assert r.exit_code == 0, r.output
    assert "4 -> 2 experts in each of 2 MoE layers" in r.output and "layer 0" in r.output and "peak RSS" in r.output


# --- recipe and card ------------------------------------------------------------------------------------------

CALIBRATION = str(Path(__file__).resolve().parents[2] / "evals" / "demo" / "data" / "calibration.jsonl")


def recipe_with(tmp_path: Path, prune_yaml: str):
    from reap.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(f"name: x\nmodel: {{path: /m}}\nprune: {prune_yaml}\n")
    return load_recipe(p)


def test_recipe_prune_section(tmp_path):
    from reap.errors import RecipeError
    from reap.recipe import load_recipe

    p = tmp_path / "plain.yaml"
    p.write_text("name: x\nmodel: {path: /m}\n")
    assert load_recipe(p).prune is None
    r = recipe_with(tmp_path, f"{{ratio: 0.5, calibration: {CALIBRATION}}}").prune
    assert (r.method, r.ratio, r.keep, r.nsamples, r.seqlen, r.seed) == ("reap", 0.5, None, 64, 512, 0)
    assert recipe_with(tmp_path, "{keep: 4, method: random}").prune.keep == 4
    for bad, needle in [
        ("{ratio: 0.5, keep: 4, method: random}", "exactly one of prune.ratio and prune.keep"),
        ("{method: random}", "exactly one"),
        ("{ratio: 1.5, method: random}", "prune.ratio"),
        ("{ratio: 0, method: random}", "prune.ratio"),
        ("{keep: 0, method: random}", "prune.keep"),
        ("{ratio: 0.5}", "needs prune.calibration"),
        ("{ratio: 0.5, calibration: /nope.jsonl}", "calibration file /nope.jsonl not found"),
        ("{ratio: 0.5, method: magnitude}", "prune.method: allowed"),
        ("{ratio: 0.5, method: random, colour: red}", "prune.colour: unknown field"),
    ]:
        with pytest.raises(RecipeError, match=needle.replace(".", r"\.")):
            recipe_with(tmp_path, bad)


SUMMARY = {
    "method": "reap",
    "method_description": "mean router-weighted expert output norm",
    "ratio": 0.5,
    "keep": None,
    "dropped_fraction": 0.5,
    "experts_before": 8,
    "experts_after": 4,
    "top_k": 2,
    "moe_layers": 4,
    "calibration": {
        "path": "/x/calibration.jsonl",
        "rows": 128,
        "nsamples": 64,
        "seqlen": 512,
        "samples": 52,
        "tokens": 26624,
    },
    "seed": 0,
    "mtp": "none in the source",
    "source": "/work/demo-source",
    "wall_s": 8.1,
    "peak_rss_gb": 0.87,
    "peak_vram_gb": None,
    "reap_version": "0.1.0",
}


def test_build_card_shows_the_lineage_and_the_pruning_settings():
    from reap.card import render_card
    from reap.errors import CardError

    manifest = json.loads((Path(__file__).resolve().parents[1] / "data" / "golden_manifest.json").read_text())
    manifest["stages"]["build"]["pruning"] = dict(SUMMARY)
    text = str(render_card(manifest))
    assert "| pruned | `reap prune` (reap): 8 -> 4 experts per MoE layer |" in text
    assert "## Expert pruning" in text and "from `demo-source`" in text and "/work" not in text
    assert (
        "| experts per MoE layer | 8 -> 4 (ratio 0.5: 50.0 % dropped in each of 4 layers; top-2 routing unchanged) |"
        in text
    )
    assert "| calibration | `calibration.jsonl`: 52 samples of up to 512 tokens, 26624 tokens |" in text
    assert text.index("## Lineage") < text.index("## Expert pruning") < text.index("## Quantization settings")
    random = dict(SUMMARY, method="random", calibration=None, seed=3, ratio=None, keep=4)
    manifest["stages"]["build"]["pruning"] = random
    text = str(render_card(manifest))
    assert "| calibration | none (seed 3) |" in text and "(keep 4: 50.0 % dropped" in text
    del manifest["stages"]["build"]["pruning"]["mtp"]
    with pytest.raises(CardError, match="mtp"):
        render_card(manifest)


def test_pruned_model_card_carries_the_license():
    from huggingface_hub import ModelCard

    from reap.card import render_pruned_card

    card = ModelCard(render_pruned_card(SUMMARY, "apache-2.0"))
    assert card.data.license == "apache-2.0" and "expert-pruning" in card.data.tags
    assert "# demo-source, 4 of 8 experts" in card.text and "## Expert pruning" in card.text
    assert "license" not in ModelCard(render_pruned_card(SUMMARY, None)).data.to_dict()


def test_prune_help_has_examples():
    r = CliRunner().invoke(reap, ["prune", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--ratio" in r.output and "random" in r.output
