"""`reap publish` with the real huggingface_hub client against a Hub-compatible server on 127.0.0.1
(tests/hubserver.py, storing what it receives on disk). Xet is off (the server speaks LFS), so uploads go
preupload -> LFS batch -> PUT per file -> NDJSON commit, and the counters show what was sent.

Every command runs as a subprocess (`python -m reap publish ...`): huggingface_hub reads HF_ENDPOINT at import,
and the token check covers everything a user would see.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reap.card import fmt_bytes
from reap.checkpoint import read_header_and_offset
from tests.hubserver import HubServer

from .conftest import READ_TOKEN, SRC, TOKEN, env_for, manifest

pytestmark = pytest.mark.integration

OUTPUTS: list[str] = []  # everything the commands printed, checked for the token at the end
DOWNLOAD = """
import hashlib, json, sys
from pathlib import Path
from huggingface_hub import snapshot_download
root = Path(snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3]))
print(json.dumps({p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.relative_to(root).parts}))
"""


def run_py(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    OUTPUTS.extend((proc.stdout, proc.stderr))
    return proc


def publish(hub: HubServer, run: Path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    return run_py(["-m", "reap", "publish", str(run), *args], env_for(hub, run.parent / "hf-home", token))


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, no traceback, exactly one `Error:` line, saying what to do; nothing announced as done. (The
    client's progress bars and retry warnings are on stderr too.)"""
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "published" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def copy_run(demo_build: Path, dest: Path) -> Path:
    shutil.copytree(demo_build, dest / "demo")
    return dest / "demo"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(hub: HubServer, repo: str, revision: str, dest: Path) -> dict[str, str]:
    return json.loads(
        ok(run_py(["-c", DOWNLOAD, repo, revision, str(dest)], env_for(hub, dest.parent / "dl-home"))).stdout
    )


def uploads(hub: HubServer) -> list[tuple[str, str]]:
    """Requests that send or change anything (create, preupload, LFS batch and PUT, commit, branch)."""
    return [(m, p) for m, p in hub.state.requests if m == "PUT" or (m == "POST" and not p.endswith("validate-yaml"))]


def reshard(model_dir: Path, parts: int) -> None:
    """Split the demo build's model.safetensors into `parts` shards and an index, byte for byte."""
    src = model_dir / "model.safetensors"
    raw = src.read_bytes()
    header, data_start = read_header_and_offset(src)
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    total = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names)
    groups: list[list[str]] = [[] for _ in range(parts)]
    done = 0
    for k in names:
        groups[min(parts - 1, done * parts // total)].append(k)
        done += header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{parts:05d}.safetensors"
        new, chunks, off = ({"__metadata__": meta} if meta else {}), [], 0
        for k in group:
            s, e = header[k]["data_offsets"]
            new[k] = {**header[k], "data_offsets": [off, off + e - s]}
            chunks.append(raw[data_start + s : data_start + e])
            off += e - s
            weight_map[k] = name
        h = json.dumps(new).encode()
        h += b" " * (-len(h) % 8)
        (model_dir / name).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    src.unlink()


@pytest.fixture(scope="module")
def published(hub, demo_build, tmp_path_factory):
    """The demo release published once to alice/demo (private by default)."""
    run = copy_run(demo_build, tmp_path_factory.mktemp("published"))
    before = len(uploads(hub))
    proc = ok(publish(hub, run, "--repo", "alice/demo"))
    return run, proc, uploads(hub)[before:]


# --- the release arrives ------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_sends_nothing(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    before = len(uploads(hub))
    out = ok(publish(hub, run, "--repo", "alice/dry", "--dry-run")).stdout
    assert uploads(hub)[before:] == [] and hub.state.repo("alice/dry") is None
    assert "repo      alice/dry (to be created, private)" in out and "user      alice" in out
    model_files = {p.name: p.stat().st_size for p in (run / "model").iterdir() if p.is_file() and p.name != "README.md"}
    for name, size in model_files.items():
        assert f"  create    {fmt_bytes(size):>10}  {name}\n" in out, name
    for name in ("reap_manifest.json", "README.md"):
        assert f"  {name}\n" in out
    assert f"total     {len(model_files) + 2} files" in out and out.rstrip().endswith("dry run: nothing was sent")
    assert "publish" not in manifest(run)["stages"]


def test_demo_release_arrives_complete_and_byte_identical(hub, published, tmp_path):
    run, proc, sent = published
    record = manifest(run)["stages"]["publish"]
    head = hub.state.repo("alice/demo")["branches"]["main"]
    assert record["status"] == "done" and record["committed"] and record["commit"] == head
    assert (record["repo"], record["revision"], record["private"], record["transfer"]) == (
        "alice/demo",
        "main",
        True,
        "lfs",
    )
    assert proc.stdout.startswith(f"published alice/demo@main: commit {head[:12]}")
    assert hub.state.repo("alice/demo")["private"] is True
    assert hub.state.commit_count("alice/demo") == 2  # the Hub's initial commit, then the release in one commit

    got = download(hub, "alice/demo", "main", tmp_path / "download")
    model = run / "model"
    expected = {p.name: sha256(p) for p in model.iterdir() if p.is_file() and p.name != "README.md"}
    card = subprocess.run(
        [sys.executable, "-m", "reap", "card", str(run), "--stdout"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        check=True,
    ).stdout
    # the card as `reap card` renders it now (click.echo adds a newline)
    expected["README.md"] = hashlib.sha256(card.removesuffix("\n").encode()).hexdigest()
    assert set(got) == {*expected, ".gitattributes", "reap_manifest.json"}
    assert {k: got[k] for k in expected} == expected
    assert set(record["files"]) == set(got) - {".gitattributes"}
    # the LFS objects are on the server's disk under their sha256, received once each
    lfs = {p.name for p in (hub.state.root / "lfs" / "alice" / "demo").iterdir()}
    assert expected["model.safetensors"] in lfs and hub.state.put_done[expected["model.safetensors"]] == 1
    # the weights (and the binary chart PNGs) go by LFS, each PUT once; the small text files ride in the commit
    assert [m for m, _ in sent].count("PUT") == len(lfs) and all(hub.state.put_done[o] == 1 for o in lfs)

    text = (tmp_path / "download" / "README.md").read_text()
    assert "base_model_relation: quantized" in text and "base_model: reap/demo-qwen3_5-moe-tiny" in text
    assert "vllm serve alice/demo " in text
    public = json.loads((tmp_path / "download" / "reap_manifest.json").read_text())
    assert public["stages"]["build"]["versions"]["auto-round"] and public["stages"]["build"]["verification"]["passed"]
    flat = json.dumps(public)
    assert str(run) not in flat and str(Path.home()) + "/" not in flat and "/tmp/" not in flat and TOKEN not in flat


def test_republish_makes_no_new_commit(hub, published):
    run, _, _ = published
    commits, before = hub.state.commit_count("alice/demo"), len(uploads(hub))
    plan = ok(publish(hub, run, "--repo", "alice/demo", "--dry-run")).stdout
    assert "repo      alice/demo (exists, private)" in plan and "to send (0 B), 0 to delete" in plan
    assert all(line.split()[0] == "unchanged" for line in plan.splitlines() if line.startswith("  "))
    out = ok(publish(hub, run, "--repo", "alice/demo")).stdout
    assert out.startswith("unchanged alice/demo@main")
    assert hub.state.commit_count("alice/demo") == commits and uploads(hub)[before:] == []
    record = manifest(run)["stages"]["publish"]
    assert record["status"] == "done" and not record["committed"]
    assert record["commit"] == hub.state.repo("alice/demo")["branches"]["main"]


def test_republish_after_eval_updates_the_card_and_results_only(hub, demo_build, tmp_path):
    from reap.card import render_card_into
    from reap.rundir import RunDir

    run = copy_run(demo_build, tmp_path)
    ok(publish(hub, run, "--repo", "reap-lab/demo"))
    # what `reap eval` leaves: stages.eval in the manifest, its JSON in eval/, the card re-rendered
    rd = RunDir(run)
    rd.update_stage(
        "eval",
        {
            "status": "done",
            "model_id": rd.model_id(),
            "suite": "demo",
            "lm_eval_version": "0.4.13",
            "concurrency": 8,
            "endpoint": "http://127.0.0.1:8000/v1",
            "results": {
                "demo_larger": {
                    "metric": "acc",
                    "value": 0.95,
                    "stderr": None,
                    "num_fewshot": 0,
                    "limit": None,
                    "n": 300,
                    "wall_s": 8.1,
                }
            },
        },
    )
    render_card_into(rd)
    puts = sum(hub.state.put_attempts.values())
    out = ok(publish(hub, run, "--repo", "reap-lab/demo")).stdout
    assert out.startswith("published reap-lab/demo@main")
    assert hub.state.changed_paths("reap-lab/demo") == {"README.md", "eval_results.json"}
    assert sum(hub.state.put_attempts.values()) == puts  # the weights are not sent again
    record = manifest(run)["stages"]["publish"]
    assert record["changed"] == {"create": ["eval_results.json"], "replace": ["README.md"], "delete": []}
    tree = hub.state.commits("reap-lab/demo")[0]["tree"]
    results = json.loads(hub.state.read_file("reap-lab/demo", tree["eval_results.json"]))
    assert results["results"]["demo_larger"]["value"] == 0.95 and "endpoint" not in results
    assert b"model-index:" in hub.state.read_file("reap-lab/demo", tree["README.md"])


def test_public_repo_on_a_new_branch(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    out = ok(
        publish(hub, run, "--repo", "alice/demo-public", "--public", "--revision", "v1", "--message", "first")
    ).stdout
    data = hub.state.repo("alice/demo-public")
    assert data["private"] is False and set(data["branches"]) == {"main", "v1"}
    assert hub.state.commits("alice/demo-public", "v1")[0]["summary"] == "first"
    assert set(hub.state.commits("alice/demo-public")[0]["tree"]) == {".gitattributes"}  # main untouched
    assert out.startswith("published alice/demo-public@v1")


def test_a_resharded_checkpoint_replaces_the_stale_weights(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    ok(publish(hub, run, "--repo", "alice/reshard"))
    size = (run / "model" / "model.safetensors").stat().st_size
    reshard(run / "model", 3)
    plan = ok(publish(hub, run, "--repo", "alice/reshard", "--dry-run")).stdout
    assert f"  delete    {fmt_bytes(size):>10}  model.safetensors\n" in plan
    ok(publish(hub, run, "--repo", "alice/reshard"))
    weights = {p for p in hub.state.commits("alice/reshard")[0]["tree"] if "safetensors" in p}
    assert weights == {"model.safetensors.index.json", *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))}
    assert manifest(run)["stages"]["publish"]["changed"]["delete"] == ["model.safetensors"]


# --- failures and resume ------------------------------------------------------------------------------------


def test_interrupted_upload_resumes_without_resending_what_arrived(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    reshard(run / "model", 3)
    ok(run_py(["-m", "reap", "verify", str(run / "model"), "--tp", "1"], {**os.environ, "PYTHONPATH": SRC}))
    shards = {p.name: sha256(p) for p in sorted((run / "model").glob("*.safetensors"))}
    cut = shards["model-00002-of-00003.safetensors"]
    hub.state.fail("put", oid=cut, mode="drop")  # the network drops every PUT of this shard halfway
    attempts, done, sent_before = dict(hub.state.put_attempts), dict(hub.state.put_done), hub.state.put_bytes
    try:
        first = publish(hub, run, "--repo", "alice/resume")
    finally:
        hub.state.heal()
    one_error(first, "the upload to alice/resume was cut off", "nothing was committed", "run the same command again")
    record = manifest(run)["stages"]["publish"]
    assert record["status"] == "failed" and "commit" not in record and "cut off" in record["error"]
    assert hub.state.commit_count("alice/resume") == 1  # only the Hub's initial commit: nothing partial
    arrived = {oid for name, oid in shards.items() if oid != cut}
    assert all(hub.state.put_done[oid] - done.get(oid, 0) == 1 for oid in arrived)
    assert hub.state.put_attempts[cut] - attempts.get(cut, 0) == 6  # the client's 1 + 5 retries, then it gives up
    assert hub.state.put_done[cut] == done.get(cut, 0)

    attempts, sent = dict(hub.state.put_attempts), hub.state.put_bytes
    assert sent > sent_before
    second = ok(publish(hub, run, "--repo", "alice/resume"))
    assert second.stdout.startswith("published alice/resume@main")
    resent = {oid: hub.state.put_attempts[oid] - attempts.get(oid, 0) for oid in shards.values()}
    assert resent == {oid: int(oid == cut) for oid in shards.values()}  # only the shard that did not arrive
    assert hub.state.put_bytes - sent == (run / "model" / "model-00002-of-00003.safetensors").stat().st_size
    tree = hub.state.commits("alice/resume")[0]["tree"]
    assert {name: tree[name]["oid"] for name in shards} == shards
    assert manifest(run)["stages"]["publish"]["status"] == "done"


def test_killed_upload_resumes_without_resending_what_arrived(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    reshard(run / "model", 3)
    shards = {p.name: sha256(p) for p in sorted((run / "model").glob("*.safetensors"))}
    stuck = shards["model-00003-of-00003.safetensors"]
    hub.state.fail("put", oid=stuck, mode="hang")  # this PUT stalls halfway until the process is killed
    attempts, done = dict(hub.state.put_attempts), dict(hub.state.put_done)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reap", "publish", str(run), "--repo", "alice/killed"],
        env=env_for(hub, tmp_path / "hf-home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (
            all(hub.state.put_done[o] > done.get(o, 0) for o in shards.values() if o != stuck)
            and hub.state.put_attempts[stuck] > attempts.get(stuck, 0)
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "the upload did not reach the stalled shard"
            time.sleep(0.1)
        proc.kill()  # SIGKILL: no handler runs, like a lost machine
        OUTPUTS.extend(o.decode() for o in proc.communicate())
    finally:
        hub.state.heal()
    assert hub.state.commit_count("alice/killed") == 1
    assert manifest(run)["stages"]["publish"]["status"] == "running"  # no claim of success
    attempts = dict(hub.state.put_attempts)
    ok(publish(hub, run, "--repo", "alice/killed"))
    resent = {oid: hub.state.put_attempts[oid] - attempts.get(oid, 0) for oid in shards.values()}
    assert resent == {oid: int(oid == stuck) for oid in shards.values()}
    assert manifest(run)["stages"]["publish"]["status"] == "done"


def test_commit_cut_off_resumes_with_nothing_resent(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    hub.state.fail("commit", mode="drop")
    try:
        first = publish(hub, run, "--repo", "alice/cut-commit")
    finally:
        hub.state.heal()
    one_error(first, "cut off", "run the same command again")
    assert manifest(run)["stages"]["publish"]["status"] == "failed"
    assert hub.state.commit_count("alice/cut-commit") == 1
    puts = sum(hub.state.put_attempts.values())
    ok(publish(hub, run, "--repo", "alice/cut-commit"))
    assert sum(hub.state.put_attempts.values()) == puts  # the weights arrived the first time
    assert hub.state.commit_count("alice/cut-commit") == 2


# --- bad input ----------------------------------------------------------------------------------------------


def test_missing_and_invalid_tokens(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    one_error(publish(hub, run, "--repo", "alice/x", token=None), "no Hugging Face token", "hf auth login", "HF_TOKEN")
    one_error(
        publish(hub, run, "--repo", "alice/x", token="hf_" + "x" * 34),
        "the Hugging Face token is invalid or expired; run `hf auth login` or set HF_TOKEN",
    )
    assert hub.state.repo("alice/x") is None and "publish" not in manifest(run)["stages"]


def test_repos_the_user_cannot_write_to(hub, demo_build, tmp_path):
    run = copy_run(demo_build, tmp_path)
    one_error(publish(hub, run, "--repo", "bob/demo"), "you cannot write to bob/demo", "not a member of 'bob'")
    one_error(
        publish(hub, run, "--repo", "alice/demo-ro", token=READ_TOKEN), "you cannot write to alice/demo-ro", "read-only"
    )
    # a member of `readers` with the read role: reap lets it through, the Hub refuses
    one_error(publish(hub, run, "--repo", "readers/demo"), "you cannot write to readers/demo (HTTP 403")
    assert all(hub.state.repo(r) is None for r in ("bob/demo", "alice/demo-ro", "readers/demo"))
    assert manifest(run)["stages"]["publish"]["status"] == "failed"


def test_a_run_that_failed_verification_or_has_no_card_is_not_sent(hub, demo_build, tmp_path):
    from reap.rundir import RunDir

    before = len(hub.state.requests)
    run = copy_run(demo_build, tmp_path / "unverified")
    m = manifest(run)
    m["stages"]["build"]["verification"]["passed"] = False
    m["stages"]["build"]["verification"]["gates"]["layer_counts"] = {"passed": False, "failures": ["block 0: 29 != 30"]}
    m["stages"]["build"]["status"] = "failed"
    RunDir(run).write_manifest(m)
    one_error(
        publish(hub, run, "--repo", "alice/unverified"),
        "verification failed",
        "not published",
        "layer_counts: block 0: 29 != 30",
    )
    run = copy_run(demo_build, tmp_path / "no-card")
    m = manifest(run)
    m["stages"]["build"]["source_license"] = None
    m["recipe"]["model"]["license"] = None
    RunDir(run).write_manifest(m)
    one_error(publish(hub, run, "--repo", "alice/no-card"), "card metadata lacks license")
    run = copy_run(demo_build, tmp_path / "truncated")
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    one_error(publish(hub, run, "--repo", "alice/truncated"), "model.safetensors has", "its header says")
    assert hub.state.requests[before:] == []  # refused before the Hub was asked anything


def test_the_token_appears_in_no_file_and_no_output(hub, tmp_path_factory):
    # Runs last in this module: every run folder, HF_HOME, download and the server's storage live under the
    # session's base temp folder; OUTPUTS holds what every command printed.
    assert len(OUTPUTS) > 20
    for token in (TOKEN, READ_TOKEN):
        assert not [o for o in OUTPUTS if token in o]
        needle = token.encode()
        leaked = [p for p in tmp_path_factory.getbasetemp().rglob("*") if p.is_file() and needle in p.read_bytes()]
        assert leaked == []
