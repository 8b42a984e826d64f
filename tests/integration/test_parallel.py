"""Block-parallel build on the CPU: the demo model quantized by the 2 ranks of a torch.distributed job (blocks
0-1 and 2-3, the second starting from the full-precision inputs the first handed on), compared with the
sequential build of the same recipe (the session's `servable_build`: the demo recipe as it is); a rank killed
mid-run is redone alone by the re-run; the same job over two "hosts" (two launchers on this machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from reap.checkpoint import Checkpoint, layer_index

from .conftest import DEMO_RECIPE, REAP, free_port, manifest, reap_cli

pytestmark = pytest.mark.integration


def _build_args(source: Path, out: Path, workers: int) -> list[str]:
    return ["build", DEMO_RECIPE, "--model", str(source), "--out", str(out), "--set", f"quantize.parallel={workers}"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def builds(demo_source, servable_build, tmp_path_factory) -> dict:
    """The sequential build, and the 2-worker build whose worker 1 was SIGKILLed once, then re-run."""
    par = tmp_path_factory.mktemp("par") / "par"
    proc = subprocess.Popen(
        [*REAP, *_build_args(demo_source, par, 2)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    worker1 = par / ".parallel" / "part-1"
    _wait_for(
        lambda: "quantized" in _read(worker1 / "worker.log") or proc.poll() is not None, 600, "worker 1's first block"
    )
    assert proc.poll() is None, f"the build ended before worker 1 quantized a block: {proc.communicate()[1][-3000:]}"
    os.kill(manifest(worker1)["stages"]["worker"]["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    part0 = par / ".parallel" / "part-0"
    first = {
        "rc": proc.returncode,
        "stderr": err,
        "manifest": manifest(par),
        "part0": manifest(part0)["stages"]["worker"],
        "part0_blocks": {layer_index(n) for n in Checkpoint.open(part0 / "model").weight_map},
        "model_exists": (par / "model").exists(),
    }
    rerun = reap_cli(*_build_args(demo_source, par, 2))
    return {"seq": servable_build, "par": par, "first": first, "rerun": rerun}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_a_killed_worker_is_reported_in_one_line_and_only_its_range_is_redone(builds):
    first = builds["first"]
    assert first["rc"] == 1 and not first["model_exists"]
    errors = [line for line in first["stderr"].splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in first["stderr"], first["stderr"][-3000:]
    assert "worker 1 (rank 1, CPU, blocks 2-3) failed: its rank died while on it (exit -9" in errors[0]
    assert "part-1/worker.log" in errors[0]
    assert "re-run the build to redo only the rest" in errors[0]
    assert first["manifest"]["stages"]["build"]["status"] == "failed"
    assert first["part0"]["status"] == "done"  # worker 0 finished its range although worker 1 died
    assert first["part0_blocks"] == {0, 1, None}  # its view held its own blocks only
    log = builds["rerun"].stderr
    assert "worker 0 (rank 0, CPU, blocks 0-1): kept from an earlier attempt" in log
    assert "rank 0: nothing left to do" in log and "rank 1: worker 1 (rank 1, CPU, blocks 2-3)" in log
    assert not (builds["par"] / ".parallel").exists()  # removed once the merged checkpoint is in place


def test_merged_checkpoint_has_the_sequential_layout(builds):
    from safetensors import safe_open

    seq, par = Checkpoint.open(builds["seq"] / "model"), Checkpoint.open(builds["par"] / "model")
    assert set(seq.weight_map) == set(par.weight_map)
    assert seq.quantization_config == par.quantization_config
    assert json.loads((seq.root / "config.json").read_text()) == json.loads((par.root / "config.json").read_text())
    for name in seq.weight_map:
        with (
            safe_open(str(seq.root / seq.weight_map[name]), "pt") as a,
            safe_open(str(par.root / par.weight_map[name]), "pt") as b,
        ):
            ta, tb = a.get_tensor(name), b.get_tensor(name)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
        if (layer_index(name) or 0) < 2:  # worker 0's range saw the same inputs as the sequential build
            assert ta.equal(tb), f"{name} differs although blocks 0-1 are computed alike"
    build = manifest(builds["par"])["stages"]["build"]
    assert build["verification"]["passed"] and build["status"] == "done"


def test_manifest_and_card_record_each_worker(builds):
    build = manifest(builds["par"])["stages"]["build"]
    workers = build["parallel"]["workers"]
    assert [(w["index"], w["rank"], w["device"], w["blocks"]) for w in workers] == [
        (0, 0, "cpu", [0, 1]),
        (1, 1, "cpu", [2, 3]),
    ]
    assert [w["kept_from_earlier_attempt"] for w in workers] == [True, False]
    # the re-run: worker 1 read the inputs worker 0 handed on in the first attempt (worker 0 was kept)
    assert [w["inputs"] for w in workers] == ["calibration", "file"]
    for w in workers:
        assert len(w["block_wall_s"]) == 2 and all(t > 0 for t in w["block_wall_s"]) and w["wall_s"] > 0
        assert w["predicted"]["finish_s"] > 0 and w["finished_after_s"] > 0
    assert build["parallel"]["engine"] == "torch.distributed (gloo)" and build["parallel"]["ranks"] == 2
    assert "full_precision_pass" in builds["first"]["part0"]["substages"]  # worker 0 ran blocks 0-1 for worker 1
    assert [(b["index"], b["worker"]) for b in build["blocks"]] == [(i, 0 if i < 2 else 1) for i in range(4)]
    assert all("loss_best" in b for b in build["blocks"])
    assert build["autoround_summary"] == manifest(builds["seq"])["stages"]["build"]["autoround_summary"]
    card = (builds["par"] / "model" / "README.md").read_text()
    assert "| worker 0 | CPU, blocks 0-1:" in card and "| worker 1 | CPU, blocks 2-3:" in card
    assert "its inputs after" in card and "(full precision, from worker 0)" in card


def test_the_inputs_handed_on_are_what_the_source_model_computes(demo_source, tmp_path):
    """Block 0's inputs from AutoRound's calibration pass, run through blocks 0-1 and then block 2 in full
    precision as a rank does before handing them on (each block streamed from the shards), are the hidden
    states transformers' whole model computes for the same tokens."""
    import torch

    from reap import compat
    from reap.parallel import calibration_inputs, full_precision_pass
    from reap.recipe import load_recipe

    src = Checkpoint.open(demo_source)
    recipe = load_recipe(DEMO_RECIPE, {"model.path": str(demo_source), "quantize.nsamples": 4})
    saved = calibration_inputs(src, recipe, tmp_path)
    first = saved["inputs"]["hidden_states"]
    after2 = full_precision_pass(src, saved, 0, 2)
    after3 = full_precision_pass(src, dict(saved, inputs=dict(saved["inputs"], hidden_states=after2)), 2, 3)
    assert len(first) == 4 and len(after2) == len(after3) == 4
    compat.ensure_torchvision_importable()
    from transformers import AutoModelForImageTextToText

    # in the dtype AutoRound cached block 0's inputs in: bf16, or float32 where the CPU has no bf16 (amp off)
    model = AutoModelForImageTextToText.from_pretrained(str(demo_source), dtype=first[0].dtype).eval()
    embed = model.get_input_embeddings().weight
    for j, h0 in enumerate(first):
        tokens = (h0[0][:, None, :] == embed[None]).all(-1).int().argmax(-1)  # the embedding rows h0 is made of
        assert embed[tokens].equal(h0[0])
        with torch.no_grad():
            states = model(input_ids=tokens[None], output_hidden_states=True, use_cache=False).hidden_states
        for got, block in ((after2, 2), (after3, 3)):
            assert torch.isfinite(got[j]).all(), f"sample {j}, block {block}"
            # the samples run as one batch, one block at a time: within rounding of the whole model's values
            # (bit for bit in bf16 on the 2-core CI machines; float32 where a CPU has no bf16)
            tol = {} if got[j].dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
            torch.testing.assert_close(got[j], states[block], **tol, msg=f"sample {j}, block {block}")


def test_two_hosts_build_what_one_host_builds(demo_source, builds, tmp_path):
    """The same job launched by two `reap build` processes with their own --node-rank (one rank each, the
    "hosts" sharing the run folder, rank 0 listening at --master): node 1 runs its range and exits, node 0
    merges, verifies and writes the card; the first range is bit-identical to the one-host build's."""
    from safetensors import safe_open

    out = tmp_path / "two-hosts"
    master = f"127.0.0.1:{free_port()}"
    hosts = [
        subprocess.Popen(
            [*REAP, *_build_args(demo_source, out, 2), "--nodes", "2", "--node-rank", str(i), "--master", master],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 0)
    ]
    (out1, err1), (out0, err0) = (h.communicate(timeout=900) for h in hosts)
    assert hosts[0].returncode == 0 and "node 1: worker 1 done; node 0 merges" in out1, err1[-3000:]
    assert hosts[1].returncode == 0, err0[-3000:]
    build = manifest(out)["stages"]["build"]
    assert build["status"] == "done" and build["verification"]["passed"] and build["parallel"]["nodes"] == 2
    two, one = Checkpoint.open(out / "model"), Checkpoint.open(builds["par"] / "model")
    assert set(two.weight_map) == set(one.weight_map) and two.quantization_config == one.quantization_config
    for name in (n for n in one.weight_map if (layer_index(n) or 0) < 2):
        with (
            safe_open(str(one.root / one.weight_map[name]), "pt") as a,
            safe_open(str(two.root / two.weight_map[name]), "pt") as b,
        ):
            assert a.get_tensor(name).equal(b.get_tensor(name)), name


def test_demo_suite_score_matches_the_sequential_build(builds, demo_server):
    scores = {}
    for name in ("seq", "par"):
        # the sequential build is the one the session's shared server serves; the parallel one gets its own
        where = ["--endpoint", demo_server.base_url] if name == "seq" else ["--port", str(free_port())]
        reap_cli("eval", str(builds[name]), *where)
        tasks = manifest(builds[name])["stages"]["eval"]["results"]
        scores[name] = {t: r["value"] for t, r in tasks.items()}
    print("demo suite, sequential vs 2 workers:", scores)
    seq, par = (sum(s.values()) / len(s) for s in (scores["seq"], scores["par"]))
    assert seq > 0.8  # a trained model, not noise
    assert abs(seq - par) <= 0.03, scores  # ~3 standard errors of the 600-item suite
