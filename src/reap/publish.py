"""`reap publish`: a verified run to the Hugging Face Hub, in one commit.

What goes up: every file of `model/` (weights, index, configs, tokenizer and processor files,
`reap_recipe.yaml`), the card rendered for the repo (`README.md` with its metadata), `reap_manifest.json` (the
manifest's public part: no local paths, no environment, no tokens) and `eval_results.json` once the run was
evaluated. The run folder is not changed, except `stages.publish` of its manifest.

Gates, before anything is sent: the build finished and passed verification; every shard of the index is there
with the size its header implies; the card renders; a token is there (HF_TOKEN or `hf auth login`), the Hub
accepts it (`whoami`) and its user may write to the repo's namespace; no file to upload contains the token.

One commit (`HfApi.create_commit`): the repo goes from the old release to the new one at once, never to a half
upload. Resume: the client sends large files to the Hub's storage before that commit (without Xet: preupload,
then the LFS batch API and one PUT per file; with `hf_xet`: deduplicated chunks). After an interruption a
re-run asks again, the Hub answers that it holds what arrived (an LFS batch entry without upload action, Xet
deduplication) and only the rest is sent. Files identical to the repo's are left out; with nothing changed
there is no commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reap import charts as reap_charts
from reap.card import comparisons, fmt_bytes, render_card
from reap.checkpoint import Checkpoint, read_header, shard_size
from reap.errors import HubAuthError, InputError, ReapError, RepoAccessError, UploadError, VerificationError
from reap.prune import PRUNE_FILE
from reap.recipe import RECIPE_FILE, PublishSection, check_repo_id, check_revision, load_section
from reap.rundir import CHECKPOINT_STAGES, RunDir, current, existing_run
from reap.secrets import hide_local_paths, mask_argv, names_secret, redact
from reap.stats import log

LOGIN_HINT = "run `hf auth login` or set HF_TOKEN"
# Remote files of these kinds that the new upload does not have are deleted: a stale shard or index left
# beside the new ones would be loaded with them.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
# Manifest keys that describe this machine, not the model: left out of the public manifest.
LOCAL_KEYS = frozenset({"source", "outputs", "rejected", "log", "pid", "env", "base_url", "endpoint"})


@dataclass(frozen=True)
class Item:
    """One file of the upload: a file of model/, or content made here (card, public manifest, eval results)."""

    path: str
    size: int
    source: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else self.source.read_bytes()

    def sha256(self) -> bytes:
        if self.data is not None:
            return hashlib.sha256(self.data).digest()
        digest = hashlib.sha256()
        with open(self.source, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
        return digest.digest()


@dataclass
class Remote:
    """The repo as the Hub has it: `head` is the branch's commit (None when the repo or branch is absent)."""

    exists: bool
    private: bool | None = None
    head: str | None = None
    files: dict[str, Any] = field(default_factory=dict)  # path -> RepoSibling (size, blob_id, lfs)


# --- what goes up -----------------------------------------------------------------------------------------


def _scrub(obj: Any, drop_local: bool = True) -> Any:
    """Drop keys that hold secrets (and, with `drop_local`, keys that describe this machine); replace absolute
    paths, Hub tokens and known secret values in strings, and mask secret flags in command lines."""
    if isinstance(obj, dict):
        return {
            k: _scrub(v, drop_local)
            for k, v in obj.items()
            if not (drop_local and k in LOCAL_KEYS) and not names_secret(k)
        }
    if isinstance(obj, list):
        if obj and all(isinstance(v, str) for v in obj):
            obj = mask_argv(obj)  # a command line: the values of --api-key, --hf-token, ...
        return [_scrub(v, drop_local) for v in obj]
    if isinstance(obj, str):
        return redact(hide_local_paths(obj))
    return obj


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without this machine: stats, versions, kernels, verification, hardware, the recipe, of the
    checkpoint that is published (records of an earlier build are left out). The eval stage goes to
    eval_results.json; the publish stage is this command's own record; `reap run`'s own bookkeeping
    (`pipeline`) says what ran here, not what the model is."""
    out = {k: v for k, v in manifest.items() if k not in ("stages", "pipeline")}
    stages = manifest.get("stages", {})
    out["stages"] = {
        k: v
        for k, v in stages.items()
        if k not in ("eval", "publish") and (k not in CHECKPOINT_STAGES or current(manifest, k))
    }
    out = _scrub(out)
    for key in ("status", "server"):  # whether a server runs on this machine now
        out["stages"].get("serve", {}).pop(key, None)
    for rec in out["stages"].values():
        rec.pop("last_attempt", None)  # an attempt that did not replace the published record
    return out


def eval_results(manifest: dict[str, Any]) -> dict[str, Any] | None:
    ev = current(manifest, "eval")
    if not ev or not ev.get("results"):
        return None
    paired, stats, agreement = comparisons(manifest, ev)
    ev = {k: v for k, v in ev.items() if k not in ("baseline", "last_attempt", "paired", "agreement")}
    if paired:  # only what compares with the build's source, as in the card
        ev.update(baseline=dict(manifest["stages"]["eval"]["baseline"], results=paired), paired=stats)
    if agreement:
        ev["agreement"] = agreement
    return _scrub(ev)


def card_for(manifest: dict[str, Any], repo: str, charts: list[str] | None = None) -> str:
    """The card as published: its serve command names the repo (the same card `reap card` renders once the
    manifest records the publish); `charts`: the chart files that go up beside it."""
    stages = {**manifest.get("stages", {}), "publish": {"repo": repo}}
    return str(render_card({**manifest, "stages": stages}, charts=charts))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def upload_set(run: RunDir, manifest: dict[str, Any], repo: str) -> list[Item]:
    """Every file of the upload, sorted by path. Raises CardError when the card does not render."""
    results = eval_results(manifest)
    charts = reap_charts.render_all(manifest)  # drawn from the manifest published, never a stale file of model/
    made = {
        "README.md": card_for(manifest, repo, list(charts)).encode(),
        **charts,
        "reap_manifest.json": _json_bytes(public_manifest(manifest)),
        "eval_results.json": _json_bytes(results) if results else None,
        # `reap build` writes it without local paths; an older build's copy is cleaned here
        RECIPE_FILE: hide_local_paths((run.model_dir / RECIPE_FILE).read_text()).encode()
        if (run.model_dir / RECIPE_FILE).is_file()
        else None,
        PRUNE_FILE: _json_bytes(_scrub(json.loads((run.model_dir / PRUNE_FILE).read_text()), drop_local=False))
        if (run.model_dir / PRUNE_FILE).is_file()
        else None,
    }
    items = [Item(name, len(data), data=data) for name, data in made.items() if data is not None]
    for p in sorted(run.model_dir.rglob("*")):
        rel = p.relative_to(run.model_dir).as_posix()
        if (
            p.is_file()
            and rel not in made
            and rel not in reap_charts.CHARTS
            and not any(part.startswith(".") for part in rel.split("/"))
        ):
            items.append(Item(rel, p.stat().st_size, source=p))
    return sorted(items, key=lambda i: i.path)


# --- gates --------------------------------------------------------------------------------------------------


def check_build(run: RunDir, manifest: dict[str, Any]) -> None:
    build = manifest.get("stages", {}).get("build", {})
    verification = build.get("verification") or {}
    if verification and not verification.get("passed"):
        failures = [
            f"{name}: {gate['failures'][0]}" if gate.get("failures") else name
            for name, gate in verification.get("gates", {}).items()
            if not gate.get("passed")
        ]
        raise VerificationError(f"{run.root}, so it is not published", failures or ["see the manifest"])
    if build.get("status") != "done" or not verification:
        raise InputError(
            f"{run.root} has no finished, verified build (status: {build.get('status', 'none')}); "
            "run `reap build` first"
        )


def check_shards(model_dir: Path) -> None:
    """Every shard of the index exists with the size its header implies; no stray shard beside them."""
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir} holds no checkpoint (no config.json); run `reap build` first")
    listed = set(Checkpoint.open(model_dir).weight_map.values())
    problems = []
    for name in sorted(listed):
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != (want := shard_size(path)):
            problems.append(f"{name} has {size} bytes, its header says {want}")
    problems += [
        f"{p.name} is not in the index" for p in sorted(model_dir.glob("*.safetensors")) if p.name not in listed
    ]
    if problems:
        raise InputError(f"{model_dir} is incomplete: {'; '.join(problems)}; rebuild it (`reap build --overwrite`)")


def check_no_token(items: list[Item], token: str) -> None:
    """No file of the upload holds the token (safetensors: their header, the only text in them)."""
    needle = token.encode()
    for item in items:
        text = json.dumps(read_header(item.source)).encode() if item.path.endswith(".safetensors") else item.read()
        if needle in text:
            raise InputError(
                f"{item.path} contains your Hugging Face token; remove it and publish again (nothing was sent)"
            )


def resolve_settings(
    run: RunDir, *, repo: str | None, private: bool | None, revision: str | None, message: str | None
) -> PublishSection:
    """The recipe's `publish:` section (the run's recipe.yaml) with the given values on top."""
    for option, value, check in (("--repo", repo, check_repo_id), ("--revision", revision, check_revision)):
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise InputError(f"{option}: {exc}") from None
    given = {"repo": repo, "private": private, "revision": revision, "message": message}
    section = load_section(run.recipe_path, "publish").model_copy(
        update={k: v for k, v in given.items() if v is not None}
    )
    if section.repo is None:
        raise InputError("no repo to publish to: pass --repo ORG/NAME or set publish.repo in the recipe")
    return section


# --- the Hub ------------------------------------------------------------------------------------------------


def explain(exc: BaseException, repo: str, sending: bool = True) -> ReapError | None:
    """The one-line error for a failure of the Hub client, or None when it is none of the known kinds.
    `sending`: the upload had begun (else a connection failure means the Hub cannot be reached at all)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ReapError):
            return seen
        if isinstance(seen, OfflineModeIsEnabled):
            return UploadError(
                "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), so the Hub cannot be "
                "reached; unset it to publish"
            )
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            code = seen.response.status_code
            why = (seen.server_message or "").strip().splitlines()
            why = f": {why[0]}" if why else ""
            if code == 401:
                return HubAuthError(f"the Hugging Face token is invalid or expired; {LOGIN_HINT}")
            if code in (403, 404):
                return RepoAccessError(
                    f"you cannot write to {repo} (HTTP {code}{why}); check the name, or use a "
                    "token with write access to it"
                )
            if code == 412:
                return UploadError(
                    f"{repo} changed while publishing (another commit came first); run the same command again"
                )
            return UploadError(f"the Hub refused the upload to {repo} (HTTP {code}{why}); nothing was committed")
        if isinstance(seen, (httpx2.TransportError, ConnectionError, TimeoutError)):
            first = (str(seen).strip().splitlines() or [""])[0]
            if not sending:
                from huggingface_hub import constants

                return UploadError(
                    f"cannot reach the Hub at {constants.ENDPOINT} ({type(seen).__name__}"
                    f"{': ' + first if first else ''}); check the network (or HF_ENDPOINT); nothing was sent"
                )
            return UploadError(
                f"the upload to {repo} was cut off ({type(seen).__name__}{': ' + first if first else ''}); "
                "nothing was committed; run the same command again: files the Hub already received "
                "are not sent again"
            )
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def hub_errors(repo: str, sending: bool = True) -> Iterator[None]:
    try:
        yield
    except ReapError:
        raise
    except Exception as exc:
        mapped = explain(exc, repo, sending)
        if mapped is None:
            raise
        raise mapped from exc


def get_token(token: str | None) -> str:
    from huggingface_hub import get_token as stored_token

    token = token or stored_token()
    if not token:
        raise HubAuthError(f"no Hugging Face token; {LOGIN_HINT}")
    return token


def check_can_write(me: dict[str, Any], repo: str) -> None:
    """Refuse before hashing or sending anything: a namespace the user is not in, or a read-only token."""
    if not isinstance(me, dict) or not isinstance(me.get("name"), str):
        from huggingface_hub import constants

        raise HubAuthError(
            f"the Hub at {constants.ENDPOINT} answered whoami without a user name; check HF_ENDPOINT and the token"
        )
    ns = repo.split("/")[0]
    names = [me["name"], *(o["name"] for o in me.get("orgs") or [] if isinstance(o, dict) and "name" in o)]
    if ns not in names:
        raise RepoAccessError(
            f"you cannot write to {repo}: the token is {me['name']}'s, who is not a member of "
            f"{ns!r} (namespaces: {', '.join(names)})"
        )
    if ((me.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        raise RepoAccessError(
            f"you cannot write to {repo}: the token is read-only; create a write token, then {LOGIN_HINT}"
        )


def remote_state(api, repo: str, revision: str) -> Remote:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
        head = info.sha
    except RepositoryNotFoundError:
        return Remote(exists=False)
    except RevisionNotFoundError:  # a new branch starts from main: compare with main's files
        info, head = api.model_info(repo, files_metadata=True), None
    return Remote(True, info.private, head, {s.rfilename: s for s in info.siblings or []})


def plan(items: list[Item], remote: Remote) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """(rows {path, size, action}, sha256 of the files hashed here). Action: create, replace, unchanged or
    delete. Only a file the repo holds with the same size is hashed (its digest is handed to the client,
    which then does not hash it again)."""
    from huggingface_hub.utils.sha import git_hash

    same_size = [
        i for i in items if (f := remote.files.get(i.path)) is not None and f.lfs is not None and f.size == i.size
    ]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib runs outside the GIL
        digests = dict(zip((i.path for i in same_size), pool.map(Item.sha256, same_size), strict=False))
    rows = []
    for item in items:
        theirs = remote.files.get(item.path)
        if theirs is None:
            action = "create"
        elif theirs.size != item.size:
            action = "replace"
        elif theirs.lfs is not None:
            action = "unchanged" if digests[item.path].hex() == theirs.lfs.sha256 else "replace"
        else:
            action = "unchanged" if git_hash(item.read()) == theirs.blob_id else "replace"
        rows.append({"path": item.path, "size": item.size, "action": action})
    ours = {i.path for i in items}
    rows += [
        {"path": p, "size": f.size, "action": "delete"}
        for p, f in sorted(remote.files.items())
        if p not in ours and p.endswith(WEIGHT_SUFFIXES)
    ]
    return rows, digests


def transfer_mode() -> str:
    """How the client sends large files: Xet whenever `hf_xet` imports, unless HF_HUB_DISABLE_XET is set."""
    from importlib.util import find_spec

    from huggingface_hub import constants

    return "lfs" if constants.HF_HUB_DISABLE_XET or find_spec("hf_xet") is None else "xet"


def _commit(
    api,
    repo: str,
    revision: str,
    items: list[Item],
    rows: list[dict[str, Any]],
    digests: dict[str, bytes],
    message: str,
    parent: str | None,
):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    by_path = {i.path: i for i in items}
    ops: list[Any] = []
    for row in rows:
        if row["action"] in ("create", "replace"):
            item = by_path[row["path"]]
            op = CommitOperationAdd(
                path_in_repo=item.path, path_or_fileobj=item.data if item.data is not None else item.source
            )
            if item.path in digests:
                op.upload_info.sha256 = digests[item.path]
            ops.append(op)
        elif row["action"] == "delete":
            ops.append(CommitOperationDelete(path_in_repo=row["path"]))
    return api.create_commit(repo, operations=ops, commit_message=message, revision=revision, parent_commit=parent)


def publish(
    run_dir: Path,
    *,
    repo: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
) -> dict[str, Any]:
    """Publish a run to the Hub (or, with `dry_run`, check everything and return the plan, sending nothing).

    `repo`, `private`, `revision` and `message` override the run recipe's `publish:` section; `token` defaults
    to HF_TOKEN or the stored login. Returns the record written to `stages.publish` (the plan on a dry run).
    """
    from huggingface_hub import HfApi
    from huggingface_hub import __version__ as hub_version

    run = existing_run(Path(run_dir))
    manifest = run.read_manifest()
    s = resolve_settings(run, repo=repo, private=private, revision=revision, message=message)
    check_build(run, manifest)
    check_shards(run.model_dir)
    items = upload_set(run, manifest, s.repo)
    token = get_token(token)
    api = HfApi(token=token)
    with hub_errors(s.repo, sending=False):
        me = api.whoami()
        check_can_write(me, s.repo)
        check_no_token(items, token)
        remote = remote_state(api, s.repo, s.revision)
    record: dict[str, Any] = {
        "repo": s.repo,
        "revision": s.revision,
        "private": remote.private if remote.exists else s.private,
        "url": f"{api.endpoint}/{s.repo}",
        "user": me["name"],
        "transfer": transfer_mode(),
        "huggingface_hub": hub_version,
        "files": {i.path: i.size for i in items},
        "bytes": sum(i.size for i in items),
    }
    message = s.message or f"reap publish {manifest['name']}"
    if dry_run:
        rows, _ = plan(items, remote)
        return {
            **record,
            "dry_run": True,
            "message": message,
            "repo_exists": remote.exists,
            "branch_exists": remote.head is not None,
            "requested_private": s.private,
            "plan": rows,
        }
    # the whole record is replaced: a failed attempt claims no earlier commit
    with run.stage("publish", keep_done=False, checkpoint=manifest["stages"]["build"].get("model_id"), **record) as rec:
        with hub_errors(s.repo):
            if not remote.exists:
                log(f"publish: creating {'private' if s.private else 'public'} repo {s.repo}")
                api.create_repo(s.repo, private=s.private, exist_ok=True)
            if remote.head is None and s.revision != "main":
                api.create_branch(s.repo, branch=s.revision, exist_ok=True)
            if remote.head is None:
                remote = remote_state(api, s.repo, s.revision)
            rows, digests = plan(items, remote)
            changed = [r for r in rows if r["action"] != "unchanged"]
            log(
                f"publish: {len(items)} files, {fmt_bytes(record['bytes'])} -> {s.repo}@{s.revision} ("
                + ", ".join(
                    f"{sum(r['action'] == a for r in rows)} {a}" for a in ("create", "replace", "delete", "unchanged")
                )
                + f"; {record['transfer'].upper()} transfer)"
            )
            if changed:
                info = _commit(api, s.repo, s.revision, items, rows, digests, message, parent=remote.head)
                commit, commit_url = info.oid, info.commit_url
            else:
                commit, commit_url = remote.head, f"{api.endpoint}/{s.repo}/commit/{remote.head}"
        rec.update(
            commit=commit,
            commit_url=commit_url,
            committed=bool(changed),
            changed={a: [r["path"] for r in rows if r["action"] == a] for a in ("create", "replace", "delete")},
            bytes_changed=sum(r["size"] for r in rows if r["action"] in ("create", "replace")),
        )
    return rec


# --- what the command prints --------------------------------------------------------------------------------


def describe_plan(plan_record: dict[str, Any]) -> str:
    r = plan_record
    if r["repo_exists"]:
        repo_line = f"{r['repo']} (exists, {'private' if r['private'] else 'public'})"
        if r["requested_private"] != r["private"]:
            repo_line += "; reap does not change the visibility of an existing repo"
    else:
        repo_line = f"{r['repo']} (to be created, {'private' if r['private'] else 'public'})"
    branch = r["revision"] + (
        "" if r["branch_exists"] or not r["repo_exists"] and r["revision"] == "main" else " (to be created)"
    )
    lines = [
        f"repo      {repo_line}",
        f"revision  {branch}",
        f"user      {r['user']}",
        f"message   {r['message']}",
        f"transfer  {r['transfer']}",
        "",
    ]
    lines += [f"  {row['action']:<9} {fmt_bytes(row['size']):>10}  {row['path']}" for row in r["plan"]]
    send = [row for row in r["plan"] if row["action"] in ("create", "replace")]
    lines += [
        "",
        f"total     {len(r['files'])} files, {fmt_bytes(r['bytes'])}; "
        f"{len(send)} to send ({fmt_bytes(sum(row['size'] for row in send))}), "
        f"{sum(row['action'] == 'delete' for row in r['plan'])} to delete",
        "dry run: nothing was sent",
    ]
    return "\n".join(lines)


def describe_result(record: dict[str, Any]) -> str:
    r = record
    head = (
        f"published {r['repo']}@{r['revision']}: commit {r['commit'][:12]}"
        if r["committed"]
        else f"unchanged {r['repo']}@{r['revision']}: commit {r['commit'][:12]} already holds these files"
    )
    lines = [head, f"  {r['url']}"]
    for action in ("create", "replace", "delete"):
        names = r["changed"][action]
        if names:
            shown = ", ".join(names) if len(names) <= 6 else f"{len(names)} files ({', '.join(names[:3])}, ...)"
            lines.append(f"  {action:<8} {shown}")
    lines.append(
        f"  {len(r['files'])} files, {fmt_bytes(r['bytes'])} ({fmt_bytes(r['bytes_changed'])} new or changed) "
        f"in {r['wall_s']:.1f} s"
    )
    return "\n".join(lines)
