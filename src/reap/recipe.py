"""The recipe: one YAML file, validated by pydantic models, the single source of truth of a run.

Defaults reproduce the seed release (Qwen3.5-REAP-212B-A17B-W4A16): W4A16, group 128, symmetric,
`auto_round` format, 64 samples of NeelNanda/pile-10k at sequence length 512, batch size 1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reap.errors import RecipeError

# Modules kept in 16-bit unless the recipe says otherwise, with the reason shown in the card.
DEFAULT_KEEP_16BIT: dict[str, str] = {
    "mlp.gate": "MoE router: vLLM builds it unquantized, a quantized router fails to load",
    "mlp.shared_expert_gate": "scalar gate of the shared expert (one output row)",
    "linear_attn.in_proj_a": "narrow DeltaNet projection; vLLM fuses it into in_proj_ba, too narrow for Marlin",
    "linear_attn.in_proj_b": "narrow DeltaNet projection; vLLM fuses it into in_proj_ba, too narrow for Marlin",
    "lm_head": "output head, kept for quality",
    "model.visual": "vision tower, not calibrated by text data",
    "mtp": "multi-token-prediction draft layers",
}

SERVABLE_BITS = (4, 8)
RECIPE_FILE = "reap_recipe.yaml"  # the recipe beside the weights of a build
# A calibration dataset given by name: a Hub id (ORG/NAME) or one of AutoRound's short names, with its
# `:split=...`/`:num=...` options; several joined by commas.
DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.+=-]+)*$")
REVISION_RE = re.compile(
    r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*@\{)(?!.*\.lock$)(?!.*/$)(?!.*\.$)[^\s~^:?*\[\\\x00-\x1f\x7f]{1,200}$"
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class _Section(BaseModel):
    # strict: `iters: true` or `bits: "4"` is an error, not silently 1 or 4
    model_config = ConfigDict(extra="forbid", strict=True)


# model fields that only describe the release (card, lineage): changing them re-renders the card, never
# re-quantizes
METADATA_FIELDS = ("base_model", "pruned_from", "license")


class ModelSection(_Section):
    path: str = Field(description="local folder of the source checkpoint (bf16), or `demo` for the built-in model")
    base_model: str | None = Field(None, description="Hub id of the original base model, for the card's lineage")
    pruned_from: str | None = Field(None, description="Hub id of the model this one was pruned from, if any")
    license: str | None = Field(None, description="license carried into the card; defaults to the source config's")
    trust_remote_code: bool = False

    @field_validator("base_model", "pruned_from")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value, org_required=False)


class QuantizeSection(_Section):
    bits: int = Field(4, description="weight bits: 4 or 8, the widths vLLM's int kernels load (W4A16, W8A16)")
    group_size: Literal[32, 64, 128] = 128
    sym: bool = True
    format: Literal["auto_round", "auto_gptq"] = "auto_round"
    iters: int = Field(200, ge=0, description="AutoRound tuning steps per block; 0 runs optimized RTN")
    nsamples: int = Field(64, ge=1)
    seqlen: int = Field(512, ge=8)
    batch_size: int = Field(1, ge=1)
    dataset: str = Field("NeelNanda/pile-10k", description='Hub dataset id or a local .jsonl of {"text": ...} rows')
    seed: int = 42
    device_map: str | int | None = Field("auto", description="passed to AutoRound: auto, cpu, cuda, 0, or '0,1,2'")
    low_gpu_mem_usage: bool = False
    low_cpu_mem_usage: bool = True
    enable_torch_compile: bool = Field(False, description="AutoRound's torch.compile of blocks (GPU only)")
    parallel: int = Field(
        1,
        ge=1,
        description="contiguous block ranges quantized at once by the ranks of one torch.distributed job, one "
        "per GPU (`reap build --gpus N`, times --nodes); more ranges than GPUs take turns on the ranks; CPU "
        "processes sharing the cores where no GPU is used",
    )
    workers_at_once: int | None = Field(
        None,
        ge=1,
        description="at most this many ranks run at the same time, each taking its ranges in turn "
        "(default: one per GPU of every host; on the CPU all): each running rank holds its "
        "range in host RAM, so fewer at once bound the build's peak RAM",
    )
    routed_experts: Literal["quantize", "keep_16bit", "auto"] = Field(
        "quantize",
        description="the routed experts (`mlp.experts`): quantized, kept in 16-bit, or `auto`: kept in "
        "16-bit only where no GPU is visible and vLLM's CPU build has no int4 MoE kernel on this processor",
    )
    expert_tuning: Literal["autoround", "stacked"] = Field(
        "autoround",
        description="how the routed experts are tuned: `autoround` (AutoRound's own path, one wrapper per "
        "expert Linear) or `stacked` (reap.fastround: the same SignRound on stacked expert tensors with "
        "grouped matmuls, the same packed output)",
    )
    keep_16bit: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_KEEP_16BIT),
        description="module name patterns (dotted segments) kept in 16-bit, with the reason shown in the card",
    )

    @field_validator("keep_16bit", mode="before")
    @classmethod
    def _list_to_mapping(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {str(p): DEFAULT_KEEP_16BIT.get(str(p), "kept in 16-bit by the recipe") for p in value}
        return value

    @field_validator("bits")
    @classmethod
    def _servable_bits(cls, value: int) -> int:
        if value not in SERVABLE_BITS:
            raise ValueError(
                f"{value} bits cannot be served: vLLM, the engine reap targets, loads GPTQ/AutoRound int weights "
                "of 4 or 8 bits only (Marlin, Machete and its CPU WNA16 kernels); use 4 or 8"
            )
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset_named_or_local_jsonl(cls, value: str) -> str:
        return check_dataset(value)


class PruneSection(_Section):
    """`reap prune` settings (REAP expert pruning before quantization); see docs/recipe.md."""

    method: Literal["reap", "frequency", "ean", "random"] = Field(
        "reap", description="saliency criterion; frequency, ean and random are baselines"
    )
    ratio: float | None = Field(
        None, gt=0, lt=1, description="fraction of the routed experts dropped in every MoE layer"
    )
    keep: int | None = Field(None, ge=1, description="routed experts kept in every MoE layer (instead of ratio)")
    calibration: str | None = Field(None, description='local .jsonl of {"text": ...} rows; not used by `random`')
    nsamples: int = Field(64, ge=1, description="calibration samples")
    seqlen: int = Field(512, ge=8, description="tokens per calibration sample")
    seed: int = Field(0, description="seed of the `random` baseline")

    @field_validator("calibration")
    @classmethod
    def _calibration_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f'calibration file {value} not found; give an existing .jsonl of {{"text": ...}} rows')
        return value

    @model_validator(mode="after")
    def _one_size_and_data(self) -> PruneSection:
        if (self.ratio is None) == (self.keep is None):
            raise ValueError("give exactly one of prune.ratio and prune.keep")
        if self.method != "random" and self.calibration is None:
            raise ValueError(f'prune.method {self.method} needs prune.calibration (a .jsonl of {{"text": ...}} rows)')
        return self


class ServeSection(_Section):
    tensor_parallel_size: int = Field(4, ge=1, description="the tensor-parallel size the checkpoint is checked for")
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    quantization: str | None = Field(None, description="force vLLM's --quantization; leave unset to let vLLM detect")
    enforce_eager: bool | None = Field(
        None,
        description="vLLM's --enforce-eager (no torch.compile warm-up); unset: on for vLLM's CPU build, off on GPUs",
    )


class EvalSection(_Section):
    enabled: bool = Field(True, description="evaluate in `reap run` (serve, then lm-eval against the endpoint)")
    suite: str | None = Field("demo", description="a suite of evals/suites/ (demo, standard); unset with `tasks`")
    tasks: list[str] | None = Field(None, description="lm-eval tasks (task or task:metric) instead of a suite")
    limit: int | None = Field(None, ge=1, description="at most N documents per task")
    num_fewshot: int | None = Field(None, ge=0)
    concurrency: int = Field(8, ge=1, description="concurrent requests to the server")
    baseline: bool = Field(True, description="also serve and evaluate the bf16 source: the card shows recovery")
    port: int = Field(8000, ge=1, le=65535, description="port of the servers reap starts")

    @model_validator(mode="after")
    def _suite_or_tasks(self) -> EvalSection:
        if self.enabled and not self.suite and not self.tasks:
            raise ValueError("give eval.suite or eval.tasks (or eval.enabled: false)")
        return self


class BenchSection(_Section):
    """`reap bench` settings for `reap run`'s bench stage (vLLM's own serving benchmark); see docs/recipe.md."""

    enabled: bool | None = Field(
        None, description="benchmark in `reap run`; unset: on where a GPU is visible, off on CPUs (opt in)"
    )
    concurrency: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="concurrent requests, one pass each; default GPU 1, 8, 32, CPU 1, 4"
    )
    input_len: int | None = Field(None, ge=1, description="prompt tokens; default GPU 256, CPU 32")
    output_len: int | None = Field(None, ge=1, description="output tokens (--ignore-eos); default GPU 128, CPU 16")
    num_prompts: int | None = Field(
        None, ge=1, description="prompts per pass; default max(16, 4 x concurrency) on GPUs, max(4, 2 x) on CPUs"
    )
    baseline: bool = Field(True, description="also serve and measure the bf16 source: the card shows the ratio")
    port: int = Field(8000, ge=1, le=65535, description="port of the servers reap starts")


class CardSection(_Section):
    tags: list[str] = Field(default_factory=lambda: ["reap", "moe", "autoround", "w4a16", "int4"])
    pipeline_tag: str = "image-text-to-text"
    library_name: str = "transformers"


def looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.endswith(("/", ".jsonl", ".json", ".txt", ".parquet", ".csv"))
        or Path(value).expanduser().exists()
    )


def check_dataset(value: str) -> str:
    """Calibration data is exactly what the recipe names: an existing local .jsonl file, or dataset names
    (never a folder or another local path, which AutoRound would silently replace by NeelNanda/pile-10k)."""
    if looks_like_path(value):
        p = Path(value).expanduser()
        if p.suffix != ".jsonl":
            raise ValueError(
                f'{value} is a local path but not a .jsonl file; give a .jsonl of {{"text": ...}} rows '
                "(folders and other formats are not read)"
            )
        if not p.is_file():
            raise ValueError(f'calibration file {value} not found; give an existing .jsonl of {{"text": ...}} rows')
        return str(p)  # expanded: AutoRound reads the string as it is (`~/x.jsonl` is "Dataset not found")
    bad = [n for n in value.split(",") if not DATASET_NAME_RE.match(n.strip())]
    if bad:
        raise ValueError(
            f"{bad[0]!r} is neither an existing .jsonl file nor a dataset name (ORG/NAME, e.g. NeelNanda/pile-10k)"
        )
    return value


def check_revision(value: str) -> str:
    """A branch name the Hub accepts (git's rules: no spaces, `..`, `~^:?*[\\`, not ending in `/`, `.` or .lock)."""
    if not REVISION_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid branch name (no spaces, '..', '~', '^', ':', '?', '*', '[' or '\\'), "
            "e.g. v1 or my-branch"
        )
    return value


def check_repo_id(value: str, org_required: bool = True) -> str:
    """A Hub model repo id, `ORG/NAME` (letters, digits, '.', '_', '-'; no '--' or '..'; not ending in .git);
    without `org_required`, also a bare `NAME` (an existing model such as `gpt2`; a repo reap creates has an org)."""
    shaped = REPO_RE.match(value) or (not org_required and NAME_RE.match(value))
    if not shaped or "--" in value or ".." in value or value.endswith(".git"):
        use = "ORG/NAME" if org_required else "ORG/NAME or NAME"
        raise ValueError(f"{value!r} is not a Hub repo id: use {use} (letters, digits, '.', '_', '-')")
    return value


class PublishSection(_Section):
    repo: str | None = Field(None, description="Hub model repo ORG/NAME; `reap publish --repo` overrides it")
    private: bool = Field(True, description="visibility of a repo reap creates (an existing repo keeps its own)")
    revision: str = Field("main", min_length=1, description="branch to commit to; created if missing")
    message: str | None = Field(None, description="commit message (default: `reap publish <name>`)")

    @field_validator("repo")
    @classmethod
    def _repo_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision_ok(cls, value: str) -> str:
        return check_revision(value)


class Recipe(_Section):
    name: str = Field(description="run name: runs/<name>/ holds everything the run produces")
    model: ModelSection
    prune: PruneSection | None = Field(None, description="prune experts before quantizing (used by `reap run`)")
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    bench: BenchSection = Field(default_factory=BenchSection)
    card: CardSection = Field(default_factory=CardSection)
    publish: PublishSection = Field(default_factory=PublishSection)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 96 characters)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        q = self.quantize
        if q.format == "auto_gptq" and not q.sym and q.bits == 4:
            raise ValueError(
                "quantize.format auto_gptq with sym: false is not loadable by vLLM's Marlin kernels; use sym: true"
            )
        return self


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; see docs/recipe.md for the allowed fields"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "literal_error":
        msg = msg.replace("Input should be", "allowed:")
    return f"{loc}: {msg}"


def parse_recipe(data: Any, path: str) -> Recipe:
    """Validate already-loaded YAML data; every problem is reported at once."""
    if not isinstance(data, dict):
        raise RecipeError(path, ["the file must be a YAML mapping with at least `name` and `model.path`"])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(path, [_format_error(e) for e in exc.errors()]) from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file, apply dotted overrides (`quantize.iters=0`), validate."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(str(p), ["file not found; pass the path of a recipe YAML such as recipes/demo.yaml"])
    data = _read_yaml(p)
    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            _set_dotted(data, dotted, value, str(p))
    return parse_recipe(data, str(p))


def _read_yaml(p: Path) -> Any:
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(
            str(p), ["not a text file (not UTF-8); pass a recipe YAML such as recipes/demo.yaml"]
        ) from None
    except OSError as exc:
        raise RecipeError(str(p), [f"cannot be read ({exc.strerror})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise RecipeError(str(p), [f"not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None


def load_section(path: str | Path, name: str) -> BaseModel:
    """One section of a recipe file (e.g. a run's recipe.yaml), validated on its own: the other sections may
    name files of the machine that built the run. An absent file or section gives the defaults."""
    p = Path(path)
    data = _read_yaml(p) if p.is_file() else {}
    section = (data if isinstance(data, dict) else {}).get(name) or {}
    try:
        return Recipe.model_fields[name].annotation.model_validate(section)
    except ValidationError as exc:
        raise RecipeError(str(p), [_format_error({**e, "loc": (name, *e["loc"])}) for e in exc.errors()]) from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, path: str) -> None:
    *parents, leaf = dotted.split(".")
    if not leaf or not all(parents):
        raise RecipeError(path, [f"--set {dotted}: empty field name; use dotted names like quantize.iters"])
    node = data
    for i, key in enumerate(parents):
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            where = ".".join(parents[: i + 1])
            raise RecipeError(path, [f"--set {dotted}: {where} is a value, not a section; set {where}=VALUE"])
    node[leaf] = value


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
