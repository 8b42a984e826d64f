"""The CLI: instant help, one clean error line per bad input, nothing written."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from reap.cli import reap
from reap.errors import ReapError
from reap.resources import data_dir
from reap.rundir import RunDir

DEMO_RECIPE = str(data_dir("recipes") / "demo.yaml")


def run(*args: str):
    return CliRunner().invoke(reap, list(args))


def test_help_is_fast_and_imports_no_heavy_library():
    code = (
        "import sys; from reap.cli import reap\n"
        "try:\n    reap.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'auto_round', 'vllm', 'lm_eval') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for cmd in ("build", "verify", "card", "demo-model"):
        assert "Example" in run(cmd, "--help").output


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_missing_and_invalid_recipe(tmp_path):
    one_error_line(run("build", str(tmp_path / "none.yaml")), "file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {}\nquantize: {bits: 5}\n")
    one_error_line(run("build", str(bad)), str(bad), "model.path: required", "quantize.bits: 5 bits cannot be served")


def test_model_path_not_found(tmp_path):
    r = run("build", DEMO_RECIPE, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    one_error_line(r, "not found", "reap demo-model")
    assert not (tmp_path / "run").exists()


def test_not_a_supported_moe(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = run("build", DEMO_RECIPE, "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "run"))
    one_error_line(r, "`llama` model", "Qwen3.5 MoE")
    assert not (tmp_path / "run").exists()


def fake_moe(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": {"num_experts": 8}}))
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")  # a valid, empty safetensors file
    (src / "README.md").write_text("---\nlicense: mit\n---\n")
    return src


def test_existing_output_is_refused_and_left_alone(tmp_path):
    src = fake_moe(tmp_path)
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "keep.txt").write_text("precious")
    r = run("build", DEMO_RECIPE, "--model", str(src), "--out", str(tmp_path / "run"))
    one_error_line(r, "already holds a build", "--overwrite")
    assert (model / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model"]


def test_not_enough_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    r = run("build", DEMO_RECIPE, "--model", str(fake_moe(tmp_path)), "--out", str(tmp_path / "run"))
    one_error_line(r, "not enough disk", "--out")
    assert not (tmp_path / "run").exists()


def test_source_without_license_needs_one_in_the_recipe(tmp_path):
    src = fake_moe(tmp_path)
    (src / "README.md").unlink()
    r = run("build", DEMO_RECIPE, "--model", str(src), "--out", str(tmp_path / "run"))
    one_error_line(r, "model.license")


def test_bad_calibration_file(tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"txt": "no text key"}\n')
    r = run(
        "build",
        DEMO_RECIPE,
        "--model",
        str(fake_moe(tmp_path)),
        "--set",
        f"quantize.dataset={calib}",
        "--out",
        str(tmp_path / "run"),
    )
    one_error_line(r, "calibration file", '{"text": "..."}')


def test_bad_set_syntax():
    r = run("build", DEMO_RECIPE, "--set", "novalue")
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_verify_and_card_on_missing_folders(tmp_path):
    one_error_line(run("verify", str(tmp_path / "x")), "not found")
    one_error_line(run("card", str(tmp_path)), "not a reap run folder")


def test_run_summary_columns_align_whatever_the_status_text(tmp_path, capsys):
    from reap.cli import _print_run_summary

    long = "skipped (done, inputs unchanged since 2026-11-30 and outputs exist)"
    rows = [
        {"stage": "build", "status": "done", "wall_s": 37.2, "peak_rss_gb": 1.234},
        {"stage": "eval", "status": long, "wall_s": None, "peak_rss_gb": None},
        {"stage": "publish", "status": "interrupted", "wall_s": 3723.0, "peak_rss_gb": 12.5},
    ]
    _print_run_summary(tmp_path, rows)
    lines = capsys.readouterr().out.splitlines()[:4]
    status_at = {
        line.index(word) for line, word in zip(lines, ["status", "done", "skipped", "interrupted"], strict=True)
    }
    assert len(status_at) == 1  # the status column starts at one place on every line
    ends = {len(line) for line in lines}
    assert len(ends) == 1, lines  # the right-aligned last column ends at one place: no status pushes it out
    assert lines[1].endswith("1.23 GB") and lines[2].endswith("-")


def test_an_unexpected_exception_is_one_line_with_the_traceback_file_and_reap_debug_shows_it(monkeypatch, tmp_path):
    """The traceback goes to a private file under the user's cache folder (before: shared /tmp/reap-errors),
    and neither it nor the line holds a known secret (before: both printed str(exc) as it was)."""
    import reap.card

    secret = "sk-reap-cli-0123456789"

    def boom(run, recipe=None):
        raise KeyError(f"stages {secret}")

    monkeypatch.setattr(reap.card, "render_card_into", boom)
    monkeypatch.setattr("reap.rundir.existing_run", lambda path: RunDir(Path("no-such-run")))
    monkeypatch.delenv("REAP_DEBUG", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("VLLM_API_KEY", secret)
    line = one_error_line(run("card", "x"), "unexpected KeyError: 'stages ***'", "a bug in reap", "REAP_DEBUG=1")
    log = Path(line.split(" in ")[-1].split(";")[0])
    assert log.parent == tmp_path / "cache" / "reap" / "errors" and log.stat().st_mode & 0o777 == 0o600
    text = log.read_text()
    assert "Traceback" in text and "boom" in text and secret not in text and secret not in line
    monkeypatch.setenv("REAP_DEBUG", "1")
    result = run("card", "x")
    assert isinstance(result.exception, KeyError)
    monkeypatch.delenv("REAP_DEBUG")

    def bad(run, recipe=None):
        raise ReapError(f"bad {secret}")

    monkeypatch.setattr(reap.card, "render_card_into", bad)
    assert one_error_line(run("card", "x")) == "Error: bad ***"
