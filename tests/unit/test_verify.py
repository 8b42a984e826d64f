"""Each verification gate passes on a good checkpoint and fails, saying where, on a crafted bad one."""

from __future__ import annotations

import json
import shutil

import pytest

from reap.errors import InputError, UnsupportedModelError, VerificationError
from reap.verify import raise_on_failure, verify_checkpoint

from .ckpt_factory import KEEP, edit_index, make_checkpoint

L0 = "model.language_model.layers.0"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture()
def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def failures(report, gate):
    return report["gates"][gate]["failures"]


def test_good_checkpoint_passes_every_gate(good):
    report = verify_checkpoint(good, tp=1, expect={"bits": 4, "group_size": 128, "sym": True})
    assert report["passed"], report["gates"]
    # 4 experts: DeltaNet block 3*4+9 Linear layers, attention block 3*4+8; the 3 (resp. 1) narrow ones stay 16-bit
    assert report["predicted_linear_per_block"] == [21, 20]
    assert report["quantized_linear_per_block"] == [18, 19]
    kept = {row["modules"]: row["count"] for row in report["kept_16bit"]}
    assert kept["model.language_model.layers.*.mlp.gate"] == 2
    assert kept["lm_head"] == 1
    assert kept["model.visual.*"] == 6


def test_quantized_router_fails(tmp_path):
    ckpt = make_checkpoint(tmp_path / "bad", quantize_routers=True)
    report = verify_checkpoint(ckpt, tp=1)
    msg = " ".join(failures(report, "unquantized_routers_and_head"))
    assert f"{L0}.mlp.gate" in msg and "KeyError" in msg
    with pytest.raises(VerificationError, match="unquantized_routers_and_head"):
        raise_on_failure(report, str(ckpt))


def test_missing_expert_tensor_fails_tensor_set_and_layer_count(copy):
    edit_index(copy, drop=[f"{L0}.mlp.experts.2.up_proj.{s}" for s in ("qweight", "qzeros", "scales")])
    report = verify_checkpoint(copy, tp=1)
    assert any(f"{L0}.mlp.experts.2.up_proj.weight/qweight" in f for f in failures(report, "tensor_set"))
    assert any(
        "block 0 (DeltaNet) has 20 Linear layers on disk, the config predicts 21" in f
        for f in failures(report, "layer_counts")
    )


def test_unexpected_tensor_fails(copy):
    edit_index(copy, rename={f"{L0}.mlp.gate.weight": f"{L0}.mlp.router.weight"})
    report = verify_checkpoint(copy, tp=1)
    msgs = " ".join(failures(report, "tensor_set"))
    assert f"{L0}.mlp.router.weight" in msgs and f"{L0}.mlp.gate.weight" in msgs


def test_count_disagreeing_with_autoround_report_fails(good):
    reported = [{"quantized": 18, "total": 21}, {"quantized": 18, "total": 20}]
    report = verify_checkpoint(good, tp=1, reported_blocks=reported)
    assert failures(report, "layer_counts") == [
        "block 1: AutoRound reported 18/20 quantized, the checkpoint holds 19/20"
    ]


def test_index_pointing_at_missing_shard_fails(copy):
    (copy / "model-00002-of-00002.safetensors").unlink()
    report = verify_checkpoint(copy, tp=1)
    assert any(
        "shard model-00002-of-00002.safetensors listed in the index is missing" in f
        for f in failures(report, "tensor_set")
    )


def test_quantization_config_must_match_recipe_and_tensors(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["quantization_config"]["extra_config"][f"{L0}.linear_attn.in_proj_a"]
    (copy / "config.json").write_text(json.dumps(cfg))
    report = verify_checkpoint(copy, tp=1, expect={"bits": 4, "group_size": 64})
    msgs = failures(report, "quantization_config")
    assert any("group_size is 128, the recipe asked for 64" in m for m in msgs)
    assert any(
        f"{L0}.linear_attn.in_proj_a stored in 16-bit but quantization_config does not say so" in m for m in msgs
    )


def test_float16_fails_dtype(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["text_config"]["dtype"] = "float16"
    (copy / "config.json").write_text(json.dumps(cfg))
    assert "bfloat16" in failures(verify_checkpoint(copy, tp=1), "dtype")[0]


def test_marlin_rule_depends_on_tensor_parallel_size(good):
    assert verify_checkpoint(good, tp=1)["passed"]
    msgs = failures(verify_checkpoint(good, tp=4), "marlin_shapes")
    assert msgs and "moe_intermediate_size 128 / TP 4 = 32 is not a multiple of 128" in msgs[0]


def test_not_a_model_and_not_moe(tmp_path):
    with pytest.raises(InputError, match="not found"):
        verify_checkpoint(tmp_path / "nope")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="reap supports Qwen3.5 MoE"):
        verify_checkpoint(tmp_path / "llama")


def test_quantized_narrow_projection_breaks_keep_list_and_marlin(tmp_path):
    ckpt = make_checkpoint(tmp_path / "narrow", keep=("mlp.shared_expert_gate",))
    report = verify_checkpoint(ckpt, tp=1)
    assert f"{L0}.linear_attn.in_proj_a" in failures(report, "kept_16bit")[0]
    assert "in_proj_ba with 8/1 rows per shard" in failures(report, "marlin_shapes")[0]


def test_truncated_shard_fails_tensor_set(copy):
    """Issue 15: a shard cut to half its size (an interrupted copy) passed every gate; publish caught it later."""
    shard = max(copy.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    report = verify_checkpoint(copy, tp=1)
    assert not report["passed"]
    assert f"shard {shard.name} has {size // 2} bytes, its header says {size} (truncated or damaged)" in failures(
        report, "tensor_set"
    )


def test_16bit_experts_need_a_declaration_vllm_applies_to_the_fused_module(tmp_path):
    """Issue 15: a merged parallel build passed the gates with 16-bit experts declared per expert by a regex
    that vLLM never tries on the fused `mlp.experts` module: vLLM built them int4 and failed to load."""
    L1 = "model.language_model.layers.1"
    ckpt = make_checkpoint(tmp_path / "c", keep=(*KEEP, "layers.1.mlp.experts"))
    assert verify_checkpoint(ckpt, tp=1)["passed"]  # per-expert exact entries: vLLM reads them for the module
    cfg = json.loads((ckpt / "config.json").read_text())
    extra = cfg["quantization_config"]["extra_config"]
    for key in [k for k in extra if k.startswith(f"{L1}.mlp.experts.")]:
        del extra[key]
    extra[r"model\.language_model\.layers\.1\.mlp\.experts\.\d+\.(gate|up|down)_proj"] = {"bits": 16}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    report = verify_checkpoint(ckpt, tp=1)
    msg = " ".join(failures(report, "quantization_config"))
    assert "blocks [1]: routed experts stored in 16-bit without an extra_config entry vLLM applies" in msg
    # one expert of the block declared otherwise: vLLM refuses the module as inconsistent
    del extra[r"model\.language_model\.layers\.1\.mlp\.experts\.\d+\.(gate|up|down)_proj"]
    extra.update({f"{L1}.mlp.experts.{e}.{p}": {"bits": 16} for e in range(4) for p in ("gate_proj", "up_proj")})
    extra[f"{L1}.mlp.experts.0.down_proj"] = {"bits": 4}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = " ".join(failures(verify_checkpoint(ckpt, tp=1), "quantization_config"))
    assert "blocks [1]: the per-expert extra_config entries disagree on (bits, group_size, sym)" in msg


def test_bit_width_vllm_cannot_load_fails(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (copy / "config.json").write_text(json.dumps(cfg))
    msg = " ".join(failures(verify_checkpoint(copy, tp=1), "quantization_config"))
    assert "quantization_config.bits is 3: vLLM loads 4- or 8-bit int weights only" in msg


def test_a_fused_moe_modules_experts_must_agree_on_bits_group_size_and_sym():
    """vLLM refuses a fused MoE module whose per-expert entries differ in any of (bits, group_size, sym)
    (inc/config_parser.py); before, only bits were compared, so 16-bit entries with mixed group sizes passed."""
    from reap.verify import experts_declared_16bit

    fused = f"{L0}.mlp.experts"
    q = {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True}
    same = {f"{fused}.{e}.{p}": {"bits": 16} for e in range(2) for p in ("gate_proj", "down_proj")}
    assert experts_declared_16bit({**q, "extra_config": same}, fused) is True
    for key, value in (("group_size", 32), ("sym", False)):
        differ = {**same, f"{fused}.1.down_proj": {"bits": 16, key: value}}
        assert experts_declared_16bit({**q, "extra_config": differ}, fused) is None, key
    # an entry's missing field is the config's default, as in vLLM: explicit 128 agrees with the default 128
    agree = {**same, f"{fused}.1.down_proj": {"bits": 16, "group_size": 128}}
    assert experts_declared_16bit({**q, "extra_config": agree}, fused) is True


def test_gptq_experts_are_16bit_only_by_a_skip_rule_matching_the_fused_module():
    from reap.verify import experts_declared_16bit

    q = {"quant_method": "gptq", "bits": 4, "dynamic": {r"-:.*layers\.1\.mlp\.experts": {}, r"+:.*layers\.0\.": {}}}
    assert experts_declared_16bit(q, "model.language_model.layers.1.mlp.experts") is True
    assert experts_declared_16bit(q, "model.language_model.layers.0.mlp.experts") is False
    assert experts_declared_16bit({**q, "dynamic": None}, "model.language_model.layers.1.mlp.experts") is False


def test_int4_experts_declared_16bit_fail(copy):
    """The checkpoint stores block 0's experts int4 but quantization_config tells vLLM to build the fused
    module in 16-bit: vLLM would look for 16-bit weights that are not there."""
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"].setdefault("extra_config", {})[f"{L0}.mlp.experts"] = {"bits": 16}
    (copy / "config.json").write_text(json.dumps(cfg))
    msg = " ".join(failures(verify_checkpoint(copy, tp=1), "quantization_config"))
    assert "blocks [0]: routed experts stored int4 but quantization_config makes vLLM build their fused" in msg


def test_checkpoint_tensors_reads_each_shard_header_once(good, monkeypatch):
    """Before: Checkpoint.tensors read every shard's header twice (once for the tensors, once for its size)."""
    from reap import checkpoint

    reads = []
    real = checkpoint.read_header_and_offset
    monkeypatch.setattr(checkpoint, "read_header_and_offset", lambda p: reads.append(p.name) or real(p))
    ckpt = checkpoint.Checkpoint.open(good)
    reads.clear()
    assert ckpt.tensors and not ckpt.problems
    assert sorted(reads) == sorted({p.name for p in good.glob("*.safetensors")})
