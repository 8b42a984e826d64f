"""A small Hugging Face Hub-compatible server for tests: the real `huggingface_hub` client (with Xet
disabled) talks to it through HF_ENDPOINT, and everything it receives is stored on disk.

It implements what the client uses to create a repo, upload (preupload, LFS batch + PUT + verify, NDJSON
commit), list (model_info, tree) and download (resolve), with the Hub's status codes and error headers:
401 for a bad token, 403 for a namespace the user does not belong to, 404 `RepoNotFound` for a repo the
user cannot see. Storage: `lfs/<ns>/<name>/<sha256>` (large files, per repo like the Hub's), `blobs/<git sha1>`
(regular files), `repos/<ns>/<name>.json` (branches and commits, each commit a full tree path -> entry).

Tests read the counters (`put_attempts`, `put_done`, `put_bytes`, `commit_count`, `requests`) and inject
faults: `fail("put", oid=..., mode="drop")` drops the connection of every PUT of that object halfway through
its body until `heal()`; `fail("commit", mode="drop")` reads the commit and drops it without an answer.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fnmatch
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The patterns of the .gitattributes the Hub writes into every new repo (the part that matters here).
LFS_PATTERNS = (
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "*.tar.*",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_SIZE = 10 * 1024 * 1024


@dataclass(frozen=True)
class User:
    name: str
    orgs: tuple[str, ...] = ()  # organizations the user may write to
    read_orgs: tuple[str, ...] = ()  # organizations the user is a member of with the "read" role
    role: str = "write"  # the token's role: "write" or "read"

    def can_read(self, namespace: str) -> bool:
        return namespace in (self.name, *self.orgs, *self.read_orgs)

    def can_write(self, namespace: str) -> bool:
        return self.role == "write" and namespace in (self.name, *self.orgs)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    """Repos, objects and counters; every method runs under one lock."""

    def __init__(self, root: Path, users: dict[str, User]):
        self.root = Path(root)
        self.users = users
        self.lock = threading.RLock()
        for d in ("lfs", "blobs", "repos", "tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.faults: list[dict[str, Any]] = []
        self.healed = threading.Event()
        self.reset_counters()

    def reset_counters(self) -> None:
        with self.lock:
            self.put_attempts: collections.Counter[str] = collections.Counter()  # PUT requests per oid
            self.put_done: collections.Counter[str] = collections.Counter()  # PUTs stored per oid
            self.put_bytes = 0  # body bytes read by PUTs
            self.requests: list[tuple[str, str]] = []

    # --- faults --------------------------------------------------------------------------------------
    def fail(self, op: str, *, oid: str | None = None, mode: str = "drop") -> None:
        """Make every `op` ("put" or "commit") request (of object `oid` if given) fail until heal():
        "drop" closes the connection halfway through the body, "hang" waits for heal() and then drops."""
        with self.lock:
            self.healed.clear()
            self.faults.append({"op": op, "oid": oid, "mode": mode})

    def heal(self) -> None:
        with self.lock:
            self.faults.clear()
            self.healed.set()

    def fault_for(self, op: str, oid: str | None = None) -> dict[str, Any] | None:
        with self.lock:
            return next((f for f in self.faults if f["op"] == op and f["oid"] in (None, oid)), None)

    # --- repos ---------------------------------------------------------------------------------------
    def _repo_path(self, repo: str) -> Path:
        ns, name = repo.split("/", 1)
        return self.root / "repos" / ns / f"{name}.json"

    def repo(self, repo: str) -> dict[str, Any] | None:
        p = self._repo_path(repo)
        return json.loads(p.read_text()) if p.is_file() else None

    def save_repo(self, repo: str, data: dict[str, Any]) -> None:
        p = self._repo_path(repo)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, p)

    def commits(self, repo: str, branch: str = "main") -> list[dict[str, Any]]:
        """The commits of `branch`, newest first."""
        data = self.repo(repo)
        out, sha = [], data["branches"].get(branch) if data else None
        while sha:
            out.append({"oid": sha, **data["commits"][sha]})
            sha = data["commits"][sha]["parent"]
        return out

    def commit_count(self, repo: str, branch: str = "main") -> int:
        return len(self.commits(repo, branch))

    def changed_paths(self, repo: str, branch: str = "main") -> set[str]:
        """Paths added, changed or deleted by the newest commit of `branch`."""
        new, old = (self.commits(repo, branch) + [{"tree": {}}])[:2]
        return {p for p in set(new["tree"]) | set(old["tree"]) if new["tree"].get(p) != old["tree"].get(p)}

    def lfs_path(self, repo: str, oid: str) -> Path:
        return self.root / "lfs" / repo / oid

    def read_file(self, repo: str, entry: dict[str, Any]) -> bytes:
        return (self.lfs_path(repo, entry["oid"]) if entry["lfs"] else self.root / "blobs" / entry["oid"]).read_bytes()

    def store_blob(self, data: bytes) -> str:
        sha = git_sha1(data)
        path = self.root / "blobs" / sha
        if not path.exists():
            path.write_bytes(data)
        return sha

    def new_commit(self, repo: str, data: dict[str, Any], branch: str, tree: dict[str, Any], summary: str) -> str:
        parent = data["branches"].get(branch)
        body = json.dumps({"parent": parent, "tree": tree, "summary": summary, "t": time.time_ns()}, sort_keys=True)
        sha = hashlib.sha1(body.encode()).hexdigest()
        data["commits"][sha] = {"parent": parent, "summary": summary, "tree": tree}
        data["branches"][branch] = sha
        self.save_repo(repo, data)
        return sha


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        """Quiet: tests read the server's counters and storage, not an access log."""

    # --- plumbing ------------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _send(
        self,
        code: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        head: bool = False,
    ) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, code: int, message: str, error_code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(code, {"error": message}, headers)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client may have gone already
            self.connection.shutdown(socket.SHUT_RDWR)

    def _body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if limit is not None and len(out) >= limit:
                    return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n if limit is None else min(n, limit))

    def _json(self) -> Any:
        return json.loads(self._body() or b"{}")

    def _user(self) -> User | None:
        auth = self.headers.get("Authorization", "")
        return self.state.users.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def _auth(self) -> User | None | bool:
        """The user, None when anonymous; False (401 sent) for a token the server does not know."""
        if self.headers.get("Authorization") and self._user() is None:
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return self._user()

    def _visible_repo(self, repo: str, user: User | None) -> dict[str, Any] | None:
        """The repo if it exists and `user` may read it; else None (404 RepoNotFound sent)."""
        data = self.state.repo(repo)
        ns = repo.split("/")[0]
        if data is None or (data["private"] and not (user and user.can_read(ns))):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return data

    def _writable_repo(self, repo: str) -> dict[str, Any] | None:
        """The repo if the user may write to it; else None (401, 403 or 404 sent)."""
        user = self._auth()
        if user is False:
            return None
        if user is None:
            self._error(401, "You must be authenticated to write", "RepoNotFound")
            return None
        data = self._visible_repo(repo, user)
        if data is None:
            return None
        if not user.can_write(repo.split("/")[0]):
            self._error(403, f"You don't have write access to {repo}")
            return None
        return data

    def _base(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    # --- routing -------------------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.query = parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append((method, url.path))
        try:
            self._dispatch(method, parts)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    def _dispatch(self, method: str, p: list[str]) -> None:
        if method == "GET" and p == ["api", "whoami-v2"]:
            return self.whoami()
        if method == "POST" and p == ["api", "validate-yaml"]:
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if method == "POST" and p == ["api", "repos", "create"]:
            return self.create_repo()
        if len(p) >= 4 and p[:2] == ["api", "models"]:
            repo, rest = f"{p[2]}/{p[3]}", p[4:]
            if method == "GET" and not rest:
                return self.model_info(repo, "main")
            if method == "GET" and rest[:1] == ["revision"] and len(rest) == 2:
                return self.model_info(repo, rest[1])
            if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                return self.tree(repo, rest[1], "/".join(rest[2:]))
            if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                return self.preupload(repo, rest[1])
            if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                return self.commit(repo, rest[1])
            if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
                return self.create_branch(repo, rest[1])
        if method == "POST" and len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(f"{p[0]}/{p[1].removesuffix('.git')}")
        if method == "PUT" and len(p) == 4 and p[0] == "_lfs":
            return self.lfs_put(f"{p[1]}/{p[2]}", p[3])
        if method == "POST" and len(p) == 5 and p[0] == "_lfs" and p[4] == "verify":
            return self.lfs_verify(f"{p[1]}/{p[2]}", p[3])
        if method in ("GET", "HEAD") and len(p) >= 5 and p[2] == "resolve":
            return self.resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]), head=method == "HEAD")
        self._error(404, f"no route for {method} {self.path}")

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    # --- endpoints -----------------------------------------------------------------------------------
    def whoami(self) -> None:
        user = self._auth()
        if user is False:
            return
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._send(
            200,
            {
                "type": "user",
                "name": user.name,
                "orgs": [{"name": o, "roleInOrg": "write"} for o in user.orgs]
                + [{"name": o, "roleInOrg": "read"} for o in user.read_orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user.role}},
            },
        )

    def create_repo(self) -> None:
        user = self._auth()
        body = self._json()
        if user is False:
            return
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        ns = body.get("organization") or user.name
        repo = f"{ns}/{body['name']}"
        if not user.can_write(ns):
            return self._error(403, f'You don\'t have the rights to create a model under the namespace "{ns}"')
        with self.state.lock:
            if self.state.repo(repo) is not None:  # the Hub answers with the repo's URL too
                return self._send(
                    409,
                    {"error": "You already created this model repo", "url": f"{self._base()}/{repo}"},
                    {"X-Error-Message": "You already created this model repo"},
                )
            data = {
                "private": body.get("visibility", "public") != "public" or bool(body.get("private")),
                "branches": {},
                "commits": {},
            }
            tree = {
                ".gitattributes": {
                    "lfs": False,
                    "oid": self.state.store_blob(GITATTRIBUTES),
                    "size": len(GITATTRIBUTES),
                }
            }
            self.state.new_commit(repo, data, "main", tree, "initial commit")
        self._send(200, {"url": f"{self._base()}/{repo}", "name": repo, "id": repo})

    def _readable_at(self, repo: str, rev: str) -> tuple[dict[str, Any], str] | None:
        """(repo data, commit sha of `rev`) when the caller may read the repo, else None (error sent)."""
        user = self._auth()
        if user is False or (data := self._visible_repo(repo, user)) is None:
            return None
        sha = self._head(repo, data, rev)
        return None if sha is None else (data, sha)

    def _head(self, repo: str, data: dict[str, Any], rev: str) -> str | None:
        sha = data["branches"].get(rev) or (rev if rev in data["commits"] else None)
        if sha is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def model_info(self, repo: str, rev: str) -> None:
        if (found := self._readable_at(repo, rev)) is None:
            return
        data, sha = found
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, e in sorted(data["commits"][sha]["tree"].items()):
            s = {"rfilename": path}
            if blobs:
                s.update(size=e["size"], blobId=git_sha1(b"") if e["lfs"] else e["oid"])
                if e["lfs"]:
                    s["lfs"] = {"sha256": e["oid"], "size": e["size"], "pointerSize": 134}
            siblings.append(s)
        self._send(
            200,
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": sha,
                "private": data["private"],
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
            },
        )

    def tree(self, repo: str, rev: str, folder: str) -> None:
        if (found := self._readable_at(repo, rev)) is None:
            return
        data, sha = found
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        out, dirs = [], set()
        for path, e in sorted(data["commits"][sha]["tree"].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            item = {"type": "file", "oid": git_sha1(b"") if e["lfs"] else e["oid"], "size": e["size"], "path": path}
            if e["lfs"]:
                item["lfs"] = {"oid": e["oid"], "size": e["size"], "pointerSize": 134}
            out.append(item)
        if recursive:
            for path in data["commits"][sha]["tree"]:
                parts = path[len(prefix) :].split("/")[:-1] if path.startswith(prefix) else []
                dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
        out += [{"type": "directory", "oid": git_sha1(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
        self._send(200, out)

    def preupload(self, repo: str, rev: str) -> None:
        body = self._json()
        if (data := self._writable_repo(repo)) is None:
            return
        sha = data["branches"].get(rev)
        tree = data["commits"][sha]["tree"] if sha else {}
        files = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (
                any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
                or f["size"] >= LFS_SIZE
                or b"\0" in sample
            )
            remote = tree.get(f["path"])
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote["oid"] if remote else None,
                }
            )
        self._send(200, {"files": files, "commitOid": sha})

    def lfs_batch(self, repo: str) -> None:
        body = self._json()
        if self._writable_repo(repo) is None:
            return
        objects = []
        for o in body["objects"]:
            item = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if not self.state.lfs_path(repo, o["oid"]).is_file():
                href = f"{self._base()}/_lfs/{repo}/{o['oid']}"
                item["actions"] = {
                    "upload": {"href": href, "header": {}},
                    "verify": {"href": f"{href}/verify", "header": {}},
                }
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, repo: str, oid: str) -> None:
        """The upload link of the LFS batch answer: no Authorization header, like a pre-signed S3 URL."""
        with self.state.lock:
            self.state.put_attempts[oid] += 1
        size = int(self.headers.get("Content-Length") or 0)
        fault = self.state.fault_for("put", oid)
        if fault:
            got = len(self._body(limit=max(1, size // 2)))
            with self.state.lock:
                self.state.put_bytes += got
            if fault["mode"] == "hang":
                self.state.healed.wait(timeout=120)
            return self._drop()
        fd, tmp = tempfile.mkstemp(dir=self.state.root / "tmp")
        digest, got = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as fh:
            data = self._body()
            fh.write(data)
            digest.update(data)
            got = len(data)
        with self.state.lock:
            self.state.put_bytes += got
        if digest.hexdigest() != oid:
            os.unlink(tmp)
            return self._error(400, f"sha256 mismatch for {oid}")
        dest = self.state.lfs_path(repo, oid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        with self.state.lock:
            self.state.put_done[oid] += 1
        self._send(200, headers={"ETag": f'"{oid}"'})

    def lfs_verify(self, repo: str, oid: str) -> None:
        body = self._json()
        if self._auth() in (None, False):
            return self._error(401, "Invalid credentials in Authorization header")
        path = self.state.lfs_path(repo, oid)
        if not path.is_file() or path.stat().st_size != body.get("size"):
            return self._error(404, f"object {oid} not found")
        self._send(200, {"success": True})

    def commit(self, repo: str, rev: str) -> None:
        raw = self._body()
        if self.state.fault_for("commit"):
            return self._drop()
        if self._writable_repo(repo) is None:
            return
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        with self.state.lock:
            data = self.state.repo(repo)
            if rev not in data["branches"]:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = data["branches"][rev]
            if header.get("parentCommit") and header["parentCommit"] != head:
                return self._error(412, "A commit has happened since the parent commit")
            tree = dict(data["commits"][head]["tree"])
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "file":
                    content = base64.b64decode(v["content"])
                    tree[v["path"]] = {"lfs": False, "oid": self.state.store_blob(content), "size": len(content)}
                elif key == "lfsFile":
                    if not self.state.lfs_path(repo, v["oid"]).is_file():
                        return self._error(
                            422,
                            f"Your push was rejected because an LFS pointer pointed to a file that "
                            f"does not exist: {v['path']}",
                        )
                    tree[v["path"]] = {"lfs": True, "oid": v["oid"], "size": v["size"]}
                elif key == "deletedFile":
                    if tree.pop(v["path"], None) is None:
                        return self._error(404, f"A file with this name doesn't exist: {v['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    tree = {p: e for p, e in tree.items() if not p.startswith(v["path"].rstrip("/") + "/")}
            sha = self.state.new_commit(repo, data, rev, tree, header.get("summary", ""))
        self._send(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._base()}/{repo}/commit/{sha}",
                "pullRequestUrl": None,
            },
        )

    def create_branch(self, repo: str, branch: str) -> None:
        body = self._json()
        if self._writable_repo(repo) is None:
            return
        with self.state.lock:
            data = self.state.repo(repo)
            if branch in data["branches"]:
                return self._error(409, f"Reference refs/heads/{branch} already exists")
            start = body.get("startingPoint") or "main"
            data["branches"][branch] = data["branches"].get(start, start)
            self.state.save_repo(repo, data)
        self._send(200, {})

    def resolve(self, repo: str, rev: str, path: str, head: bool) -> None:
        if (found := self._readable_at(repo, rev)) is None:
            return
        data, sha = found
        entry = data["commits"][sha]["tree"].get(path)
        if entry is None:
            return self._error(404, f"{path} not found", "EntryNotFound")
        content = self.state.read_file(repo, entry)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["oid"]}"', "X-Linked-Size": str(entry["size"])})
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and not head:
            start = int(rng[6:].split("-")[0] or 0)
            return self._send(206, raw=content[start:], headers=headers)
        self._send(200, raw=content, headers=headers, head=head)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, users: dict[str, User]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(root, users)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.serve_forever, name="hub", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.heal()
        self.shutdown()
        self.server_close()
