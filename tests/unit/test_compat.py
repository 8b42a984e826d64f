"""Each compatibility fix: detected only when needed, and a test that tells when it is no longer needed."""

from __future__ import annotations

import json
import subprocess
import sys

from reap import compat


def test_torchvision_shim_still_needed_and_sufficient():
    # If this fails at the first assert, PyPI's torchvision loads beside the CPU torch: drop the shim.
    code = (
        "from reap import compat\n"
        "missing = compat.torchvision_ops_missing()\n"
        "applied = compat.ensure_torchvision_importable()\n"
        "import torchvision, torchvision.transforms.v2\n"
        "from transformers import Qwen3_5MoeForConditionalGeneration\n"
        "print('RESULT', missing, applied, compat.ensure_torchvision_importable())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "RESULT True True False" in out


def test_flatten_moves_the_sub_folder(tmp_path):
    raw, dest = tmp_path / "raw", tmp_path / "dest"
    (raw / "demo-w4g128").mkdir(parents=True)
    (raw / "demo-w4g128" / "config.json").write_text("{}")
    assert compat.flatten_autoround_output(raw, dest) is True
    assert (dest / "config.json").is_file()

    raw2, dest2 = tmp_path / "raw2", tmp_path / "dest2"
    raw2.mkdir()
    (raw2 / "config.json").write_text("{}")
    assert compat.flatten_autoround_output(raw2, dest2) is False
    assert (dest2 / "config.json").is_file()


def test_restore_vl_config_only_when_text_config_was_saved(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    vl = {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": {"num_experts": 8},
        "vision_config": {},
    }
    (src / "config.json").write_text(json.dumps(vl))
    q = {"quant_method": "auto-round", "bits": 4}
    (out / "config.json").write_text(
        json.dumps({"model_type": "qwen3_5_moe_text", "architectures": None, "quantization_config": q})
    )
    assert compat.restore_vl_config(src, out) is True
    assert json.loads((out / "config.json").read_text()) == dict(vl, quantization_config=q)
    assert compat.restore_vl_config(src, out) is False  # already a VL config: nothing to do


def test_carry_tokenizer_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "video_preprocessor_config.json"):
        (src / name).write_text(name)
    (out / "tokenizer.json").write_text("re-serialised")
    assert compat.carry_tokenizer_and_processor(src, out) is True
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert compat.carry_tokenizer_and_processor(src, out) is False


def test_text_only_layer_names_follow_the_text_model():
    from reap.compat import text_only_layer_names

    cfg = {"model.language_model.layers.0.mlp.experts.3.up_proj": 1, "model.visual.blocks.0.attn.qkv": 2, "lm_head": 3}
    assert text_only_layer_names(cfg) == {"model.layers.0.mlp.experts.3.up_proj": 1, "lm_head": 3}
