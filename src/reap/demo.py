"""The embedded default model: a tiny Qwen3.5-MoE in the real release layout, trained on reap's own tasks.

It is `Qwen3_5MoeForConditionalGeneration` (text + a tiny vision tower), saved the way a Hub release is:
sharded safetensors with an index, per-expert tensors, the VL `config.json`, a byte-level BPE tokenizer
trained here with a chat template, and the processor files. Training is deterministic and takes about
two minutes on two CPU cores; the held-out split of the tasks (in `evals/demo/data/`) measures it.

The tasks:
- `demo_larger` (multiple choice, scored by loglikelihood): "Which is larger: 47 or 82?" -> " 82"
- `demo_reverse` (generative, greedy exact match): "Reverse: kbtrx" -> " xrtbk"
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from reap.resources import data_dir
from reap.stats import log

TASKS = ("larger", "reverse")
TRAIN_ROWS, TEST_ROWS = 4000, 300
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

DEMO_README = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags: [reap, demo, qwen3_5_moe]
---
# reap demo Qwen3.5-MoE (tiny)

A {params:.1f}M-parameter, {layers}-block `Qwen3_5MoeForConditionalGeneration` built and trained by `reap demo-model`
on reap's own synthetic tasks (evals/demo). Held-out accuracy in bfloat16: larger {larger:.3f}, reverse {reverse:.3f};
trained in {seconds} s.
"""


# --- the tasks --------------------------------------------------------------------------------------


def prompt_of(task: str, row: dict[str, Any]) -> str:
    if task == "larger":
        return f"Which is larger: {row['a']} or {row['b']}?\nAnswer:"
    return f"Reverse: {row['word']}\nAnswer:"


def answer_of(task: str, row: dict[str, Any]) -> str:
    if task == "larger":
        return f" {max(row['a'], row['b'])}"
    return f" {row['word'][::-1]}"


def make_task_rows(seed: int = 1234) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Deterministic train/test rows of both tasks; test items never occur in train."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a != b]
    rng.shuffle(pairs)
    larger_test = [{"a": a, "b": b, "label": int(b > a)} for a, b in pairs[:TEST_ROWS]]
    larger_train = [{"a": a, "b": b, "label": int(b > a)} for a, b in pairs[TEST_ROWS : TEST_ROWS + TRAIN_ROWS]]
    words: set[str] = set()
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(words) < TEST_ROWS + TRAIN_ROWS:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 6))))
    ordered = sorted(words)
    rng.shuffle(ordered)
    reverse_test = [{"word": w, "target": w[::-1]} for w in ordered[:TEST_ROWS]]
    reverse_train = [{"word": w, "target": w[::-1]} for w in ordered[TEST_ROWS:]]
    return {
        "larger": {"train": larger_train, "test": larger_test},
        "reverse": {"train": reverse_train, "test": reverse_test},
    }


def write_task_data(out: Path) -> None:
    """(Re)generate evals/demo/data/*.jsonl; the committed files are checked against this in tests."""
    out.mkdir(parents=True, exist_ok=True)
    for task, splits in make_task_rows().items():
        for split, rows in splits.items():
            (out / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, texts in (("calibration", task_texts("train", 128)), ("heldout", task_texts("test", 16))):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def task_texts(split: str, rows: int, per_row: int = 12) -> list[str]:
    """Examples of both tasks of a split, interleaved, `per_row` to a text: the train split is AutoRound's
    calibration text for the demo model, the test split the held-out text of the demo suite's token-level
    agreement (never seen in training or calibration)."""
    data = make_task_rows()
    examples = [
        prompt_of(t, r) + answer_of(t, r) + "\n"
        for i in range(rows * per_row // 2)
        for t, r in (("larger", data["larger"][split][i]), ("reverse", data["reverse"][split][i]))
    ]
    return ["".join(examples[i * per_row : (i + 1) * per_row]) for i in range(rows)]


def read_task_rows(task: str, split: str) -> list[dict[str, Any]]:
    path = data_dir("evals") / "demo" / "data" / f"{task}_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- tokenizer, configs, processor -------------------------------------------------------------------


def train_tokenizer(texts: list[str]):
    """A byte-level BPE trained here on the task text, with Qwen3.5's own normalizer and pre-tokenizer, served
    as the `Qwen3_5Tokenizer` class that transformers and vLLM load for this model type."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(SPECIAL_TOKENS) + 24,
        initial_alphabet=alphabet,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    state = json.loads(tok.to_str())["model"]
    qwen = Qwen3_5Tokenizer(
        vocab=state["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=2048,
    )
    qwen.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    qwen.chat_template = CHAT_TEMPLATE
    return qwen


def demo_config(tokenizer, layers: int = 4, experts: int = 8, top_k: int = 2):
    """The demo's config; `layers` decoder blocks, every fourth one full attention (as in Qwen3.5), each with
    `experts` routed experts of which `top_k` serve a token."""
    from transformers import Qwen3_5MoeConfig

    vocab = 64 * math.ceil(len(tokenizer) / 64)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=vocab,
        hidden_size=128,
        num_hidden_layers=layers,
        layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)],
        # head dims of 64: vLLM's CPU kernels (DeltaNet prefill, attention) support 64 and 128, not 32
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=128,
        num_position_embeddings=64,
    )
    return Qwen3_5MoeConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        architectures=["Qwen3_5MoeForConditionalGeneration"],
        dtype="bfloat16",
    )


def save_processor(tokenizer, out: Path) -> None:
    """The processor files a Qwen3.5 release ships (image + video preprocessors, processor class)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"longest_edge": 16777216, "shortest_edge": 65536}
    image = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, size=size)
    video = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE
    ).save_pretrained(str(out))
    image.save_pretrained(str(out))  # preprocessor_config.json, as releases still ship it
    video.save_pretrained(str(out))  # video_preprocessor_config.json
    tokenizer.backend_tokenizer.model.save(str(out))  # vocab.json + merges.txt, as Qwen releases ship them


# --- training and held-out scoring --------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _examples(tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) for every training row of every task."""
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    out = []
    for task in TASKS:
        for row in read_task_rows(task, "train"):
            p = _encode(tokenizer, prompt_of(task, row))
            a = _encode(tokenizer, answer_of(task, row) + "\n")
            out.append((p + a + [end], len(p)))
    return out


def train(model, tokenizer, steps: int, batch: int, lr: float, seed: int, aux_loss: float = 0.0) -> list[float]:
    """AdamW on the answer tokens; with `aux_loss` > 0 the routers' load-balancing loss is added with that weight."""
    import torch

    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    gen = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    text_config = model.config.text_config
    text_config.output_router_logits, text_config.router_aux_loss_coef = aux_loss > 0, aux_loss
    device = model.device
    model.train()
    losses = []
    for step in range(steps):
        chunk = gen.sample(examples, batch)
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (seq, start) in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, start : len(seq)] = torch.tensor(seq[start:])
        # Right padding with a causal model: the padded tail never influences the scored tokens. `chunk_size`:
        # transformers' reference DeltaNet kernel pads every sequence to a multiple of its chunk (64 tokens); one
        # chunk as wide as the batch (~20 tokens here) gives the same loss for ~40% less time per step on a CPU.
        loss = model(input_ids=ids.to(device), labels=labels.to(device), chunk_size=width).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"demo-model: step {step + 1}/{steps} loss {losses[-1]:.4f}")
    text_config.output_router_logits = False  # a training switch; not saved into the release's config
    model.eval()
    return losses


def score_heldout(model, tokenizer, limit: int | None = None) -> dict[str, float]:
    """Accuracy on the held-out split: loglikelihood choice for `larger`, greedy exact match for `reverse`."""
    import torch

    acc = {}
    with torch.no_grad():
        rows = read_task_rows("larger", "test")[:limit]
        # Rows whose prompt and answers have the same token lengths batch without padding, both answers side by side.
        by_shape: dict[tuple[int, int], list[tuple[int, list[list[int]]]]] = {}
        for row in rows:
            prompt = _encode(tokenizer, prompt_of("larger", row))
            a, b = (_encode(tokenizer, f" {row[k]}") for k in ("a", "b"))
            by_shape.setdefault((len(prompt) + len(a), len(a)), []).append((row["label"], [prompt + a, prompt + b]))
        correct = 0
        for (_, n), items in by_shape.items():
            for i in range(0, len(items), 64):
                chunk = items[i : i + 64]
                seqs = torch.tensor([seq for _, pair in chunk for seq in pair], device=model.device)
                logp = torch.log_softmax(model(input_ids=seqs).logits.float(), dim=-1)
                ll = logp[:, -n - 1 : -1].gather(-1, seqs[:, -n:].unsqueeze(-1)).squeeze(-1).sum(-1).view(-1, 2)
                correct += sum(
                    int(best) == label for best, (label, _) in zip(ll.argmax(-1).tolist(), chunk, strict=True)
                )
        acc["larger"] = correct / len(rows)

        rows = read_task_rows("reverse", "test")[:limit]
        by_len: dict[int, list[tuple[dict, list[int]]]] = {}
        for row in rows:  # equal prompt lengths batch without padding
            ids = _encode(tokenizer, prompt_of("reverse", row))
            by_len.setdefault(len(ids), []).append((row, ids))
        correct = 0
        for prompt_len, group in by_len.items():
            ids = torch.tensor([g[1] for g in group], device=model.device)
            for _ in range(max(len(r["word"]) for r, _ in group) + 2):
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            for (r, _), out in zip(group, ids[:, prompt_len:], strict=False):
                text = tokenizer.decode(out.tolist()).split("\n")[0]
                correct += int(text.strip() == r["target"])
        acc["reverse"] = correct / len(rows)
    return acc


def build_demo_model(
    out: Path,
    steps: int = 380,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    layers: int = 4,
    experts: int = 8,
    top_k: int = 2,
    aux_loss: float = 0.0,
) -> dict[str, Any]:
    """Build, train and save the demo checkpoint into `out` (which must not exist yet). Training runs on the
    first GPU where one is visible (the same steps; for the wider variants of the prune benchmark), else on
    the CPU."""
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from transformers import Qwen3_5MoeForConditionalGeneration

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    texts = [prompt_of(t, r) + answer_of(t, r) + "\n" for t in TASKS for r in read_task_rows(t, "train")]
    tokenizer = train_tokenizer(texts)
    config = demo_config(tokenizer, layers, experts, top_k)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen3_5MoeForConditionalGeneration(config).to(device=device, dtype=torch.float32)
    log(f"demo-model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, training {steps} steps")
    losses = train(model, tokenizer, steps=steps, batch=batch, lr=lr, seed=seed, aux_loss=aux_loss)
    train_s = time.perf_counter() - t0
    model = model.to(device="cpu", dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="2MB")
    tokenizer.save_pretrained(str(tmp))
    save_processor(tokenizer, tmp)
    # Score what was written, loaded the way every consumer loads it (Auto classes from the folder).
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    loaded = AutoModelForImageTextToText.from_pretrained(str(tmp), dtype=torch.bfloat16).to(device)
    loaded_tok = AutoTokenizer.from_pretrained(str(tmp))
    accuracy = score_heldout(loaded, loaded_tok)
    log(f"demo-model: held-out accuracy of the saved bf16 checkpoint {accuracy}")
    report = {
        "train_seconds": round(train_s, 1),
        "steps": steps,
        "seed": seed,
        "experts": experts,
        "top_k": top_k,
        "router_aux_loss_coef": aux_loss,
        "final_loss": round(losses[-1], 4),
        "heldout_accuracy_bf16": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (tmp / "README.md").write_text(
        DEMO_README.format(
            **accuracy, seconds=report["train_seconds"], params=report["parameters"] / 1e6, layers=layers
        )
    )
    (tmp / "reap_demo.json").write_text(json.dumps(report, indent=2) + "\n")
    tmp.rename(out)
    return report
