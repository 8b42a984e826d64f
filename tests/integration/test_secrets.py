"""Issue 15: no secret leaves the machine. The demo build served with a fake API key (reap eval starts vLLM
with it and lm-eval must send it), a dry run given the key after `--`, the card, and a publish with a fake
token to the test Hub: neither value appears in any file of the run folder, any log, any command's
stdout/stderr, or anything the Hub stored."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from .conftest import REAP, TOKEN, env_for, free_port, manifest

pytestmark = pytest.mark.integration


def test_a_fake_key_and_token_appear_nowhere(servable_build, hub, tmp_path):
    key = "sk-reap-" + uuid.uuid4().hex
    run = tmp_path / "run"
    shutil.copytree(servable_build, run)  # the session's build stays as it is for the other tests
    env = env_for(hub, tmp_path / "hf-home", token=TOKEN)
    env["VLLM_API_KEY"] = key
    said: list[str] = []

    def reap(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*REAP, *args], capture_output=True, text=True, env=env)
        said.extend([proc.stdout, proc.stderr])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    dry = reap("serve", str(run), "--dry-run", "--", "--api-key", key)
    assert "VLLM_API_KEY='***'" in dry.stdout and key not in dry.stdout
    # the server requires the key: reap's readiness probes and lm-eval must both send it
    reap("eval", str(run), "--limit", "4", "--port", str(free_port()))
    assert manifest(run)["stages"]["eval"]["status"] == "done"
    reap("card", str(run))
    reap("publish", str(run), "--repo", "alice/secrets-w4a16")
    assert hub.state.commit_count("alice/secrets-w4a16") == 2  # the Hub's initial commit, then the release

    files = [p for p in run.rglob("*") if p.is_file()] + [p for p in Path(hub.state.root).rglob("*") if p.is_file()]
    assert any(p.parent.name == "logs" for p in files) and any("blobs" in p.parts for p in files)
    for secret in (key, TOKEN):
        hits = [str(p) for p in files if secret.encode() in p.read_bytes()]
        hits += [f"output {i}" for i, text in enumerate(said) if secret in text]
        hits += [path for _, path in hub.state.requests if secret in path]
        assert hits == [], f"{secret[:6]}... found in {hits}"
