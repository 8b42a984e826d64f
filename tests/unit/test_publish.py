"""`reap publish` without a server: what goes up, what is scrubbed, the gates, the plan, the error lines."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from reap import charts
from reap import publish as pub
from reap.cli import reap
from reap.errors import (
    CardError,
    HubAuthError,
    InputError,
    RecipeError,
    RepoAccessError,
    UploadError,
    VerificationError,
)
from reap.recipe import PublishSection, parse_recipe
from reap.rundir import RunDir

DATA = Path(__file__).resolve().parents[1] / "data"
TOKEN = "hf_" + "Q" * 34


def write_safetensors(path: Path, tensors: dict[str, bytes], metadata: dict[str, str] | None = None) -> None:
    """A valid safetensors file of 1-D uint8 tensors (header + data, as the format defines it)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values()))


@pytest.fixture()
def manifest() -> dict:
    m = json.loads((DATA / "golden_manifest.json").read_text())
    m["stages"]["build"]["source"] = "/home/alice/models/src"
    m["stages"]["build"]["argv"] = ["reap", "build", "/home/alice/recipes/demo.yaml", "--out", "/home/alice/runs/demo"]
    m["stages"]["build"]["outputs"] = {"model": "/home/alice/runs/demo/model"}
    m["recipe"]["model"]["path"] = "/home/alice/models/src"
    return m


@pytest.fixture()
def run(tmp_path, manifest) -> RunDir:
    """A run folder as `reap build` leaves it: two shards and their index, configs, the card, the recipe."""
    run = RunDir(tmp_path / "runs" / "demo")
    model = run.model_dir
    model.mkdir(parents=True)
    write_safetensors(model / "model-00001-of-00002.safetensors", {"a": b"\x01" * 64})
    write_safetensors(model / "model-00002-of-00002.safetensors", {"b": b"\x02" * 32, "c": b"\x03" * 8})
    (model / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                    "c": "model-00002-of-00002.safetensors",
                },
            }
        )
    )
    (model / "config.json").write_text('{"model_type": "qwen3_5_moe"}')
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "README.md").write_text("the card as `reap build` wrote it\n")
    (model / "reap_recipe.yaml").write_text(yaml.safe_dump(manifest["recipe"]))
    (model / ".README.md.abc.tmp").write_text("a torn temp file")
    run.write_manifest(manifest)
    run.recipe_path.write_text(yaml.safe_dump(manifest["recipe"]))
    return run


def paths(items) -> list[str]:
    return [i.path for i in items]


# --- what goes up -------------------------------------------------------------------------------------------


def test_upload_set_is_the_checkpoint_plus_the_card_for_the_repo_and_the_public_manifest(run, manifest):
    (run.model_dir / "serving_throughput.png").write_bytes(b"a stale chart")  # drawn again from the manifest
    items = pub.upload_set(run, manifest, "org/demo-w4a16")
    assert paths(items) == [
        "README.md",
        "build_blocks.png",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "reap_manifest.json",
        "reap_recipe.yaml",
        "serving_throughput.png",
        "tokenizer.json",
    ]
    by = {i.path: i for i in items}
    assert by["serving_throughput.png"].read() == charts.render(manifest, charts.THROUGHPUT)
    card = by["README.md"].read().decode()
    assert card.startswith("---\n") and "base_model_relation: quantized" in card
    assert "vllm serve org/demo-w4a16 " in card  # the serve command names the repo, not the local run
    assert by["config.json"].source == run.model_dir / "config.json"  # model files go up as they are
    assert all(i.size == len(i.read()) for i in items)
    assert "eval_results.json" not in by


def test_eval_results_go_up_once_the_run_was_evaluated(run, manifest):
    manifest["stages"]["eval"] = {
        "status": "done",
        "model_id": manifest["stages"]["build"]["model_id"],
        "suite": "demo",
        "lm_eval_version": "0.4.13",
        "endpoint": "http://10.1.2.3:8000/v1",
        "results": {"demo_larger": {"metric": "acc", "value": 0.95, "stderr": None, "num_fewshot": 0, "limit": None}},
    }
    by = {i.path: i for i in pub.upload_set(run, manifest, "org/x")}
    results = json.loads(by["eval_results.json"].read())
    assert results["results"]["demo_larger"]["value"] == 0.95 and "endpoint" not in results
    assert "model-index:" in by["README.md"].read().decode()
    assert "eval" not in json.loads(by["reap_manifest.json"].read())["stages"]
    manifest["stages"]["eval"]["model_id"] = "an-earlier-build"  # stale: measured on another checkpoint
    by = {i.path: i for i in pub.upload_set(run, manifest, "org/x")}
    assert "eval_results.json" not in by and "model-index:" not in by["README.md"].read().decode()


def test_public_manifest_keeps_the_measurements_and_drops_this_machine(manifest):
    manifest["stages"]["serve"] = {
        "status": "done",
        "server": "running",
        "model_id": manifest["stages"]["build"]["model_id"],
        "argv": [
            "/srv/venv/bin/python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            "/home/alice/runs/demo/model",
            "--port",
            "8000",
        ],
        "env": ["PYTHONPATH", "VLLM_CPU_KVCACHE_SPACE"],
        "vllm_version": "0.32.0",
        "startup_s": 72.1,
        "kernels": {"linear_kernel": "CPUWNA16LinearKernel"},
        "base_url": "http://127.0.0.1:8000/v1",
        "pid": 4242,
        "log": "/home/alice/runs/demo/logs/serve.log",
        "hf_token": TOKEN,
        "db_passwd": "x",  # before: publish's own key pattern knew fewer secret words than the flags' one
        "credentials": "y",
        "note": f"started with {TOKEN} (~/x)",
    }
    manifest["stages"]["publish"] = {"repo": "org/x", "commit": "abc"}
    manifest["pipeline"] = {"stages": {"publish": {"status": "running"}}}  # `reap run`'s bookkeeping
    public = pub.public_manifest(manifest)
    text = json.dumps(public)
    assert "/home/alice" not in text and "/srv/venv" not in text and "~/x" not in text and TOKEN not in text
    serve = public["stages"]["serve"]
    assert set(serve) == {"model_id", "argv", "vllm_version", "startup_s", "kernels", "note"}
    assert serve["argv"][4] == "<local path>" and serve["kernels"] == {"linear_kernel": "CPUWNA16LinearKernel"}
    assert serve["note"] == "started with *** (<local path>)"
    build = public["stages"]["build"]
    assert build["versions"] == manifest["stages"]["build"]["versions"]
    assert build["verification"] == manifest["stages"]["build"]["verification"]
    assert build["substages"] == manifest["stages"]["build"]["substages"] and build["blocks"]
    assert "source" not in build and "outputs" not in build
    assert build["argv"] == ["reap", "build", "<local path>", "--out", "<local path>"]
    assert public["recipe"]["model"]["base_model"] == "reap/demo-qwen3_5-moe-tiny"  # ORG/NAME is not a path
    assert public["recipe"]["model"]["path"] == "<local path>"
    assert public["recipe"]["quantize"]["dataset"] == "evals/demo/data/calibration.jsonl"
    assert public["hardware"] == manifest["hardware"] and "publish" not in public["stages"]
    assert manifest["stages"]["serve"]["pid"] == 4242  # the run's own manifest is not touched
    assert "pipeline" not in public
    manifest["stages"]["serve"]["model_id"] = "an-earlier-build"
    assert "serve" not in pub.public_manifest(manifest)["stages"]  # a record of another checkpoint


# --- gates --------------------------------------------------------------------------------------------------


def test_a_build_that_failed_verification_or_did_not_finish_is_refused(run, manifest):
    failed = copy.deepcopy(manifest)
    failed["stages"]["build"].update(status="failed", error="verification failed")
    failed["stages"]["build"]["verification"]["passed"] = False
    failed["stages"]["build"]["verification"]["gates"]["marlin_shapes"] = {
        "passed": False,
        "failures": ["moe_intermediate 96 / TP 4 is not a multiple of 64"],
    }
    with pytest.raises(VerificationError, match="not published: marlin_shapes: moe_intermediate 96"):
        pub.check_build(run, failed)
    running = copy.deepcopy(manifest)
    running["stages"]["build"]["status"] = "running"
    del running["stages"]["build"]["verification"]
    with pytest.raises(InputError, match=r"no finished, verified build \(status: running\)"):
        pub.check_build(run, running)
    pub.check_build(run, manifest)


def test_every_shard_must_be_complete_and_listed(run):
    pub.check_shards(run.model_dir)
    shard = run.model_dir / "model-00002-of-00002.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-5])
    with pytest.raises(InputError, match=r"model-00002-of-00002.safetensors has \d+ bytes, its header says \d+"):
        pub.check_shards(run.model_dir)
    shard.unlink()
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors is missing"):
        pub.check_shards(run.model_dir)
    shard.write_bytes(whole)
    write_safetensors(run.model_dir / "model-old.safetensors", {"z": b"\x00"})
    with pytest.raises(InputError, match="model-old.safetensors is not in the index"):
        pub.check_shards(run.model_dir)


def test_a_card_that_cannot_render_stops_the_upload(run, manifest):
    manifest["stages"]["build"]["source_license"] = None
    with pytest.raises(CardError, match="license"):
        pub.upload_set(run, manifest, "org/x")


def test_a_file_holding_the_token_is_never_sent(run, manifest):
    items = pub.upload_set(run, manifest, "org/x")
    pub.check_no_token(items, TOKEN)
    (run.model_dir / "tokenizer_config.json").write_text(json.dumps({"hub_token": TOKEN}))
    with pytest.raises(InputError, match="tokenizer_config.json contains your Hugging Face token") as err:
        pub.check_no_token(pub.upload_set(run, manifest, "org/x"), TOKEN)
    assert TOKEN not in str(err.value)
    (run.model_dir / "tokenizer_config.json").unlink()
    write_safetensors(run.model_dir / "model-00001-of-00002.safetensors", {"a": b"\x01" * 64}, {"note": TOKEN})
    with pytest.raises(InputError, match="model-00001-of-00002.safetensors contains"):
        pub.check_no_token(pub.upload_set(run, manifest, "org/x"), TOKEN)


def test_settings_come_from_the_run_recipe_and_flags_override_them(run, manifest):
    with pytest.raises(InputError, match="pass --repo ORG/NAME or set publish.repo"):
        pub.resolve_settings(run, repo=None, private=None, revision=None, message=None)
    recipe = dict(manifest["recipe"], publish={"repo": "org/from-recipe", "private": False, "revision": "v1"})
    run.recipe_path.write_text(yaml.safe_dump(recipe))
    s = pub.resolve_settings(run, repo=None, private=None, revision=None, message=None)
    assert (s.repo, s.private, s.revision, s.message) == ("org/from-recipe", False, "v1", None)
    s = pub.resolve_settings(run, repo="me/other", private=True, revision=None, message="m")
    assert (s.repo, s.private, s.revision, s.message) == ("me/other", True, "v1", "m")
    with pytest.raises(InputError, match="'no-slash' is not a Hub repo id"):
        pub.resolve_settings(run, repo="no-slash", private=None, revision=None, message=None)
    recipe["publish"] = {"repo": "a/b/c", "privat": True}
    run.recipe_path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"publish.repo: 'a/b/c' is not a Hub repo id.*publish.privat: unknown field"):
        pub.resolve_settings(run, repo=None, private=None, revision=None, message=None)


def test_recipe_publish_section():
    assert PublishSection() == PublishSection(repo=None, private=True, revision="main", message=None)
    for good in ("org/name", "Org-1/Qwen3.5-REAP-212B-A17B-W4A16", "a/b_c.d"):
        assert PublishSection(repo=good).repo == good
    for bad in ("name", "org/", "/name", "a/b/c", "org/na--me", "org/x.git", "org/na me", "-org/x"):
        with pytest.raises(ValueError):
            PublishSection(repo=bad)
    rec = parse_recipe({"name": "x", "model": {"path": "p"}, "publish": {"repo": "org/x", "private": False}}, "r.yaml")
    assert rec.publish.repo == "org/x" and rec.publish.private is False


# --- token and access ---------------------------------------------------------------------------------------


def test_no_token_is_refused_with_how_to_log_in(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubAuthError, match=r"no Hugging Face token; run `hf auth login` or set HF_TOKEN"):
        pub.get_token(None)
    assert pub.get_token(TOKEN) == TOKEN


def test_no_token_stops_publish_before_any_request(run, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda *a, **k: pytest.fail("the Hub was called"))
    with pytest.raises(HubAuthError):
        pub.publish(run.root, repo="org/x")
    assert "publish" not in run.read_manifest()["stages"]


def test_namespace_and_read_only_tokens_are_refused_before_sending():
    me = {"name": "alice", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}
    pub.check_can_write(me, "alice/x")
    pub.check_can_write(me, "lab/x")
    with pytest.raises(
        RepoAccessError,
        match=r"cannot write to bob/x: the token is alice's, who is not a member of 'bob' "
        r"\(namespaces: alice, lab\)",
    ):
        pub.check_can_write(me, "bob/x")
    me["auth"]["accessToken"]["role"] = "read"
    with pytest.raises(RepoAccessError, match="read-only"):
        pub.check_can_write(me, "alice/x")


def _http_error(code: int, message: str = ""):
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    request = httpx2.Request("POST", "https://hub.example/api/models/org/x/commit/main")
    response = httpx2.Response(code, request=request, headers={"X-Error-Message": message} if message else {})
    try:
        hf_raise_for_status(response)
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


def test_hub_failures_become_one_line_that_says_what_to_do():
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert isinstance(pub.explain(_http_error(401), "org/x"), HubAuthError)
    assert "invalid or expired; run `hf auth login` or set HF_TOKEN" in str(pub.explain(_http_error(401), "org/x"))
    denied = pub.explain(_http_error(403, "no write access"), "org/x")
    assert isinstance(denied, RepoAccessError) and "you cannot write to org/x (HTTP 403: no write access)" in str(
        denied
    )
    assert isinstance(pub.explain(_http_error(404), "org/x"), RepoAccessError)
    assert "HTTP 500" in str(pub.explain(_http_error(500, "boom"), "org/x"))
    try:  # what the client raises when an LFS PUT fails for good
        try:
            raise httpx2.RemoteProtocolError("Server disconnected without sending a response.")
        except Exception as inner:
            raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from inner
    except RuntimeError as exc:
        cut = pub.explain(exc, "org/x")
    assert isinstance(cut, UploadError)
    assert (
        "RemoteProtocolError" in str(cut)
        and "nothing was committed" in str(cut)
        and "run the same command again" in str(cut)
    )
    assert "offline mode is on (HF_HUB_OFFLINE" in str(pub.explain(OfflineModeIsEnabled("offline"), "org/x"))
    assert pub.explain(ValueError("something else"), "org/x") is None


# --- the plan -----------------------------------------------------------------------------------------------


def test_plan_says_what_is_created_replaced_unchanged_and_deleted(run, manifest):
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
    from huggingface_hub.utils.sha import git_hash

    items = {i.path: i for i in pub.upload_set(run, manifest, "org/x")}
    shard1, config = items["model-00001-of-00002.safetensors"], items["config.json"]
    shard2 = items["model-00002-of-00002.safetensors"]

    def lfs(item, sha):
        return RepoSibling(
            item.path,
            size=item.size,
            lfs=BlobLfsInfo(
                size=item.size,
                sha256=sha,  # noqa: E731
                pointer_size=134,
            ),
        )

    remote = pub.Remote(
        True,
        True,
        "a" * 40,
        {
            shard1.path: lfs(shard1, shard1.sha256().hex()),
            shard2.path: lfs(shard2, "0" * 64),
            config.path: RepoSibling(config.path, size=config.size, blob_id=git_hash(config.read())),
            "tokenizer.json": RepoSibling("tokenizer.json", size=3, blob_id="x"),
            "model.safetensors": RepoSibling("model.safetensors", size=10, lfs=BlobLfsInfo(10, "1" * 64, 134)),
            "notes.md": RepoSibling("notes.md", size=5, blob_id="y"),
        },
    )
    rows, digests = pub.plan(list(items.values()), remote)
    action = {r["path"]: r["action"] for r in rows}
    assert action == {
        "README.md": "create",
        "build_blocks.png": "create",
        "serving_throughput.png": "create",
        "config.json": "unchanged",
        shard1.path: "unchanged",
        shard2.path: "replace",
        "model.safetensors.index.json": "create",
        "reap_manifest.json": "create",
        "reap_recipe.yaml": "create",
        "tokenizer.json": "replace",
        "model.safetensors": "delete",
    }  # a stale weight file goes, the user's notes.md stays
    assert set(digests) == {shard1.path, shard2.path}  # hashed once, here, and handed to the client


def test_dry_run_plan_lists_every_file_with_its_size_and_the_total():
    record = {
        "repo": "org/x",
        "revision": "main",
        "private": True,
        "requested_private": True,
        "repo_exists": False,
        "branch_exists": False,
        "user": "alice",
        "message": "reap publish demo",
        "transfer": "lfs",
        "files": {"README.md": 5000, "model.safetensors": 3_947_168},
        "bytes": 3_952_168,
        "plan": [
            {"path": "README.md", "size": 5000, "action": "create"},
            {"path": "model.safetensors", "size": 3_947_168, "action": "create"},
        ],
    }
    text = pub.describe_plan(record)
    assert "repo      org/x (to be created, private)" in text and "revision  main\n" in text
    assert "  create        5.0 kB  README.md\n  create        3.9 MB  model.safetensors\n" in text
    assert "total     2 files, 4.0 MB; 2 to send (4.0 MB), 0 to delete" in text
    assert text.endswith("dry run: nothing was sent")
    record.update(repo_exists=True, branch_exists=False, revision="v1", private=False)
    text = pub.describe_plan(record)
    assert "(exists, public); reap does not change the visibility" in text and "revision  v1 (to be created)" in text


# --- the command --------------------------------------------------------------------------------------------


def test_cli_help_and_one_line_errors(run, tmp_path):
    out = CliRunner().invoke(reap, ["publish", "--help"]).output
    assert "Example" in out and "--dry-run" in out and "--private / --public" in out
    for args, needle in (
        ([str(run.root)], "pass --repo ORG/NAME"),
        ([str(run.root), "--repo", "x"], "'x' is not a Hub repo id"),
        ([str(tmp_path / "nope"), "--repo", "o/x"], "not a reap run folder"),
    ):
        result = CliRunner().invoke(reap, ["publish", *args])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output


def test_result_lines():
    record = {
        "repo": "org/x",
        "revision": "main",
        "commit": "c" * 40,
        "committed": False,
        "url": "https://hub/org/x",
        "changed": {"create": [], "replace": [], "delete": []},
        "files": {"a": 1},
        "bytes": 1,
        "bytes_changed": 0,
        "wall_s": 0.4,
    }
    assert pub.describe_result(record).startswith("unchanged org/x@main: commit cccccccccccc already holds these files")
    record.update(committed=True, changed={"create": [], "replace": ["README.md", "eval_results.json"], "delete": []})
    text = pub.describe_result(record)
    assert (
        text.startswith("published org/x@main: commit cccccccccccc") and "replace  README.md, eval_results.json" in text
    )
    record["changed"]["create"] = [f"model-{i:05d}-of-00040.safetensors" for i in range(1, 41)]
    assert (
        "create   40 files (model-00001-of-00040.safetensors, model-00002-of-00040.safetensors, "
        "model-00003-of-00040.safetensors, ...)"
    ) in pub.describe_result(record)


def test_published_recipe_and_prune_record_carry_no_local_absolute_path(run, manifest):
    """Issue 15: model.path, the calibration file and reap_prune.json's source/output/argv went up as local
    absolute paths; the files in the run folder stay as they are."""
    (run.model_dir / "reap_prune.json").write_text(
        json.dumps(
            {"source": "/home/alice/src", "argv": ["reap", "prune", "/home/alice/src", "--api-key", "k3y-v4lue"]}
        )
    )
    made = [i for i in pub.upload_set(run, manifest, "org/demo-w4a16") if i.data is not None]
    by = {i.path: i.read().decode() for i in made if not i.path.endswith(".png")}
    assert "/home/alice" not in by["reap_recipe.yaml"] and "path: <local path>" in by["reap_recipe.yaml"]
    prune_rec = json.loads(by["reap_prune.json"])
    assert prune_rec["source"] == "<local path>" and "k3y-v4lue" not in by["reap_prune.json"]
    assert all("/home/alice" not in text for text in by.values())
    assert "/home/alice" in (run.model_dir / "reap_recipe.yaml").read_text()  # local copy unchanged
