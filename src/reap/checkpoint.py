"""Read-only views of a safetensors checkpoint folder: config, tensor headers, module inventory.

Headers are parsed directly (8-byte length + JSON), so inspecting a 110 GB checkpoint reads kilobytes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from reap.errors import InputError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    shard: str


def read_header(path: Path) -> dict[str, Any]:
    return read_header_and_offset(path)[0]


def read_header_and_offset(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its tensor data starts (8 + the header's length)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise InputError(f"{path} is not a safetensors file (too short); rebuild or re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise InputError(f"{path} is not a safetensors file (header of {n} bytes); rebuild or re-download it")
        text = fh.read(n)
    try:
        header = json.loads(text) if len(text) == n else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not all(
        isinstance(v, dict) and "data_offsets" in v for k, v in header.items() if k != "__metadata__"
    ):
        raise InputError(f"{path} has a truncated or corrupt safetensors header; rebuild or re-download it")
    return header, 8 + n


def shard_size(path: Path) -> int:
    """The size a safetensors file has when complete: 8 + header length + the end of its last tensor."""
    return complete_size(*read_header_and_offset(path))


def complete_size(header: dict[str, Any], data_start: int) -> int:
    return data_start + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)


def segment_match(pattern: str, name: str) -> bool:
    """True when the dotted segments of `pattern` appear contiguously in `name`:
    `mlp.gate` matches `model.layers.0.mlp.gate` but not `mlp.gate_proj` nor `mlp.shared_expert_gate`."""
    p, n = pattern.split("."), name.split(".")
    return any(n[i : i + len(p)] == p for i in range(len(n) - len(p) + 1))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}); restore it or rebuild") from None


@dataclass
class Checkpoint:
    root: Path
    problems: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, root: Path) -> Checkpoint:
        root = Path(root)
        if not root.exists():
            raise InputError(
                f"model path {root} not found; check the path (or build the demo model: reap demo-model {root})"
            )
        if not (root / "config.json").is_file():
            raise InputError(f"{root} is not a model folder (no config.json)")
        return cls(root)

    @cached_property
    def config(self) -> dict[str, Any]:
        data = _read_json(self.root / "config.json")
        if not isinstance(data, dict) or not isinstance(data.get("text_config", {}), dict):
            raise InputError(f"{self.root}/config.json is not a model config (a JSON object); restore it")
        return data

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config", self.config)

    @property
    def is_vl(self) -> bool:
        return "text_config" in self.config and "vision_config" in self.config

    def require_supported_moe(self) -> None:
        mt = self.config.get("model_type")
        tc = self.text_config
        if mt not in SUPPORTED_MODEL_TYPES or "num_experts" not in tc:
            raise UnsupportedModelError(
                f"{self.root} is a `{mt}` model; reap supports Qwen3.5 MoE ({', '.join(SUPPORTED_MODEL_TYPES)}) "
                "checkpoints with `num_experts` in their config"
            )

    @cached_property
    def weight_map(self) -> dict[str, str]:
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            data = _read_json(index)
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise InputError(f"{index} has no `weight_map` of tensor -> shard; restore it or rebuild")
            return wm
        shards = sorted(self.root.glob("*.safetensors"))
        if not shards:
            raise InputError(f"{self.root} has no .safetensors weights")
        return {k: s.name for s in shards for k in read_header(s) if k != "__metadata__"}

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor of the index, read from its shard's header. Index entries whose shard or tensor is
        missing are reported in `problems`."""
        out: dict[str, TensorInfo] = {}
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard in sorted(set(self.weight_map.values()) | {p.name for p in self.root.glob("*.safetensors")}):
            path = self.root / shard
            if not path.is_file():
                self.problems.append(f"shard {shard} listed in the index is missing")
                continue
            header, data_start = read_header_and_offset(path)
            if (size := path.stat().st_size) != (end := complete_size(header, data_start)):
                self.problems.append(f"shard {shard} has {size} bytes, its header says {end} (truncated or damaged)")
            for key in by_shard.get(shard, []):
                meta = header.get(key)
                if meta is None:
                    self.problems.append(f"tensor {key} listed in the index is not in {shard}")
                    continue
                out[key] = TensorInfo(meta["dtype"], tuple(meta["shape"]), shard)
            for key in header:
                if key != "__metadata__" and key not in self.weight_map:
                    self.problems.append(f"tensor {key} in {shard} is not listed in the index")
        return out

    @cached_property
    def modules(self) -> dict[str, dict[str, TensorInfo]]:
        """module name -> {tensor suffix: info}, e.g. `...mlp.gate` -> {"weight": ...}."""
        mods: dict[str, dict[str, TensorInfo]] = {}
        for key, info in self.tensors.items():
            mod, _, leaf = key.rpartition(".")
            mods.setdefault(mod, {})[leaf] = info
        return mods

    def is_quantized(self, module: str) -> bool:
        return "qweight" in self.modules.get(module, {})

    def expert_states(self) -> dict[int, set[bool]]:
        """Per decoder block: the set of "is quantized" values of its routed-expert Linear layers."""
        states: dict[int, set[bool]] = {}
        for mod in self.modules:
            if ".mlp.experts." in mod and (i := layer_index(mod)) is not None:
                states.setdefault(i, set()).add(self.is_quantized(mod))
        return states

    def experts_quantized(self) -> bool:
        return any(True in s for s in self.expert_states().values())

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self.config.get("quantization_config")

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.safetensors"))

    def file_signature(self) -> list[tuple[str, int, int]]:
        """Names, sizes and modification times of the folder's files: what says the checkpoint changed."""
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.root.iterdir() if p.is_file())


LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(module: str) -> int | None:
    m = LAYER_RE.search(module)
    return int(m.group(1)) if m and not module.startswith(("mtp.", "model.visual.")) else None


LAYER_KEY_RE = re.compile(r"(?<![\w])(layers\\?\.)(\d+)(?=\\?\.)")


def shift_layer(name: str, offset: int) -> str:
    """`name` with its decoder block number moved by `offset`, also in the escaped forms of the per-layer
    regex keys of quantization configs (`.*layers\\.3\\.mlp\\.experts$`); names outside the decoder
    blocks (no `layers.N.`, MTP, vision tower) unchanged."""
    if name.replace("\\", "").lstrip("-+:.*^").startswith(("mtp.", "model.visual.")):
        return name
    return LAYER_KEY_RE.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}", name, count=1)


def generalize(module: str) -> str:
    """Block and expert numbers become `*`.

    `model.language_model.layers.12.mlp.experts.7.up_proj` -> `model.language_model.layers.*.mlp.experts.*.up_proj`.
    """
    return re.sub(r"\.(\d+)(?=\.|$)", ".*", module)


def source_license(root: Path) -> str | None:
    """The `license` of the source's own card (README.md front matter), carried into ours."""
    readme = root / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text()
    if not text.startswith("---"):
        return None
    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    return meta.get("license")
