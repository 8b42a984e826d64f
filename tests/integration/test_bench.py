"""reap bench with vLLM's real benchmark against the real vLLM CPU server: the W4A16 build on the session's
shared server (`--endpoint`), its bf16 source served by reap (the one baseline comparison of the suite)."""

from __future__ import annotations

import pytest

from reap.charts import THROUGHPUT

from .conftest import free_port, manifest, reap_cli

pytestmark = pytest.mark.integration


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (a valid PNG starts with its signature and IHDR)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_bench_on_the_shared_endpoint_with_the_baseline_served_by_reap(demo_server, servable_build):
    res = reap_cli(
        "bench",
        str(servable_build),
        "--endpoint",
        demo_server.base_url,
        "--baseline",
        "--concurrency",
        "1,2",
        "--port",
        str(free_port()),
    )
    m = manifest(servable_build)
    rec = m["stages"]["bench"]
    assert rec["status"] == "done" and rec["model_id"] == m["stages"]["build"]["model_id"]
    assert rec["endpoint"] == demo_server.base_url and rec["vllm_version"] == "0.32.0"
    assert rec["baseline"]["model_id"] == m["stages"]["build"]["source_id"]
    for rows in (rec["results"], rec["baseline"]["results"]):
        assert [r["concurrency"] for r in rows] == [1, 2]
        for r in rows:
            assert r["completed"] == r["num_prompts"] > 0 and r["failed"] == 0, r
            assert r["output_throughput"] > 0 and r["request_throughput"] > 0
            assert 0 < r["tpot_ms"]["mean"] and 0 < r["ttft_ms"]["median"] <= r["ttft_ms"]["p99"]
    assert [r["concurrency"] for r in rec["ratio"]] == [1, 2] and all(r["output_throughput"] > 0 for r in rec["ratio"])
    server = rec["baseline"]["server"]  # the server reap started records its kernels and start-up time
    assert server["startup_s"] > 0 and server["kernels"]["moe_backend"] and "--enforce-eager" in server["argv"]
    assert rec["sizes"]["source"] > 0 and rec["sizes"]["quantized"] > 0  # (16-bit experts on CPUs: no smaller)

    card = (servable_build / "model" / "README.md").read_text()
    assert "## Serving performance" in card and "| 2 | 4/4, 4/4 |" in card and "W4A16 / bf16" in card
    assert "Checkpoint size: " in card and "(bf16 source)" in card
    assert f"![Output tokens per second against concurrency, W4A16 and bf16]({THROUGHPUT})" in card
    assert png_size(servable_build / "model" / THROUGHPUT) == (640, 400)
    assert "c=2" in res.stdout and "ratio" in res.stdout
