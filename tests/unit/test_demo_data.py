"""The demo tasks' committed data is exactly what the generator makes, and the held-out split is unseen."""

from __future__ import annotations

import pytest

from reap.demo import TASKS, answer_of, make_task_rows, prompt_of, read_task_rows, write_task_data
from reap.resources import data_dir


def test_committed_data_matches_the_generator(tmp_path):
    write_task_data(tmp_path)
    committed = data_dir("evals") / "demo" / "data"
    for f in sorted(tmp_path.iterdir()):
        assert f.read_text() == (committed / f.name).read_text(), f"{f.name} differs: rerun write_task_data"


def test_heldout_split_is_disjoint_and_balanced():
    rows = make_task_rows()
    train = {prompt_of("larger", r) for r in rows["larger"]["train"]}
    assert not train & {prompt_of("larger", r) for r in rows["larger"]["test"]}
    words = {r["word"] for r in rows["reverse"]["train"]}
    assert not words & {r["word"] for r in rows["reverse"]["test"]}
    labels = [r["label"] for r in read_task_rows("larger", "test")]
    assert 0.4 < sum(labels) / len(labels) < 0.6  # chance is 50%


def test_answers():
    assert answer_of("larger", {"a": 47, "b": 82}) == " 82"
    assert answer_of("reverse", {"word": "kbtrx"}) == " xrtbk"
    assert set(TASKS) == {"larger", "reverse"}


def test_training_runs_deltanet_in_one_chunk_as_wide_as_the_batch_with_the_same_loss(monkeypatch):
    """transformers' reference DeltaNet kernel pads every sequence to its 64-token chunk; the demo's training
    asks for one chunk of the batch's width (~20 tokens), which must reach the kernel and leave the loss as is."""
    import torch

    from reap import demo
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # before transformers' Qwen3.5 classes (their imports reach torchvision)
    from transformers import Qwen3_5MoeForConditionalGeneration
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen

    texts = [prompt_of(t, r) + answer_of(t, r) + "\n" for t in TASKS for r in read_task_rows(t, "train")[:200]]
    tokenizer = demo.train_tokenizer(texts)
    seen = []
    kernel = qwen.torch_chunk_gated_delta_rule

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunk_size"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(qwen, "torch_chunk_gated_delta_rule", spy)
    losses = []
    for width in (True, False):
        torch.manual_seed(0)
        model = Qwen3_5MoeForConditionalGeneration(demo.demo_config(tokenizer)).float()
        if not width:  # the kernel's own chunking, for comparison
            monkeypatch.setattr(qwen, "torch_chunk_gated_delta_rule", lambda *a, chunk_size=64, **k: kernel(*a, **k))
        losses.append(demo.train(model, tokenizer, steps=1, batch=8, lr=1e-3, seed=0)[0])
    assert seen and all(isinstance(c, int) and c < 64 for c in seen)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
