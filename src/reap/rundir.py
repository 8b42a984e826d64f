"""The run folder: its paths, `manifest.json` (always written atomically: temp file + rename) and the life of
every stage record (`RunDir.stage`).

A stage record is opened `running`, timed and sampled (RSS of the process tree, GPU memory), and closed
`done` (with the fingerprint of its inputs), `failed` (with a one-line error) or `interrupted` (Ctrl-C,
SIGTERM). When it does not end `done`, every process group started inside it is stopped first. An attempt
that does not end `done` never replaces a `done` record: it is kept beside it as `last_attempt`, so a failed
or killed rebuild leaves the earlier build, its recipe and its results the current ones.

Records that describe a checkpoint (build, verify, serve, eval, bench) carry its `model_id` (`checkpoint_id`). A
record whose `model_id` is not the current build's is stale: `current` leaves it out, and a new build marks
it `stale` in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reap import procs
from reap.errors import DiskSpaceError, InputError, OutputExistsError, ReapError
from reap.secrets import redact
from reap.stats import ResourceSampler, now

CHECKPOINT_STAGES = ("verify", "serve", "eval", "bench")  # records of a checkpoint, stale once another one is built


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a torn one; the file gets
    the usual mode (0666 less the umask: 0644 under umask 022), not mkstemp's 0600."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (a chart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def usual_modes(root: Path) -> None:
    """Give `root`, its folders and files the modes `mkdir` and `open` give (0777 and 0666 less the umask):
    files copied from a source keep the source's mode otherwise (e.g. 0600 shards)."""
    mask = _umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def card_path(self) -> Path:
        return self.model_dir / "README.md"

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(
                f"{self.manifest_path} is not valid JSON ({getattr(exc, 'msg', exc)}); restore it or rebuild the run"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise InputError(
                f"{self.manifest_path} is not a reap manifest (a JSON object with `stages`); restore it or rebuild "
                "the run"
            )
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Written with every known secret masked: the manifest is, like the CLI's error line, a boundary that
        failure messages of other libraries (lm-eval, vLLM) cross."""
        atomic_write_text(self.manifest_path, redact(json.dumps(manifest, indent=2, sort_keys=False)) + "\n")

    def update_stage(
        self, stage: str, record: dict[str, Any], *, section: str = "stages", replace: bool = False, **top: Any
    ) -> dict[str, Any]:
        """Merge `record` into `<section>.<stage>` (`replace`: put it there whole), and `top` into the
        manifest's top level, atomically. `section` is dotted: `pipeline.stages` holds `reap run`'s records."""
        manifest = self.read_manifest()
        node = manifest
        for key in section.split("."):
            node = node.setdefault(key, {})
        if replace:
            node[stage] = dict(record)
        else:
            node.setdefault(stage, {}).update(record)
        manifest.update(top)
        self.write_manifest(manifest)
        return manifest

    def model_id(self) -> str | None:
        """The identity of the checkpoint in model/ now (None when there is none)."""
        return checkpoint_id(self.model_dir) if (self.model_dir / "config.json").is_file() else None

    @contextlib.contextmanager
    def stage(
        self,
        name: str,
        *,
        inputs: Any = None,
        checkpoint: str | None = None,
        section: str = "stages",
        keep_done: bool = True,
        **fields: Any,
    ) -> Iterator[StageRecord]:
        """The life of one stage record: `running` -> `done` / `failed` / `interrupted`, timed and sampled;
        SIGTERM is handled like Ctrl-C; the process groups started inside are stopped when it does not end
        `done`. `inputs` (JSON-able) gives the record's `fingerprint`, `checkpoint` its `model_id`; `fields`
        go into the record at once. The command fills in the yielded record (`rec.save()` writes it now) and
        `rec.top` (manifest top-level keys written only when the stage ends `done`). With `keep_done`, an
        attempt that does not end `done` is kept as `last_attempt` beside an earlier `done` record."""
        prior = self.read_manifest()
        for key in section.split("."):
            prior = prior.get(key, {})
        keep = keep_done and prior.get(name, {}).get("status") == "done"
        rec = StageRecord(self, name, section, keep, {"status": "running", "started": now(), **fields})
        rec.t0 = time.perf_counter()
        if checkpoint is not None:
            rec["model_id"] = checkpoint
        rec.save()
        before = procs.started()
        with sigterm_as_interrupt() as shield:
            try:
                with ResourceSampler() as rec.sampler:
                    yield rec
            except BaseException as exc:
                shield()  # a second SIGTERM must not cut the clean-up short
                procs.stop_started(before)
                if isinstance(exc, KeyboardInterrupt):
                    rec.update(status="interrupted")
                else:
                    rec.update(status="failed", error=one_line(exc))
                rec.update(ended=now(), wall_s=round(time.perf_counter() - rec.t0, 3))
                rec.save()
                raise
        if "wall_s" not in rec:  # else measured by the command itself, before it wrote its outputs
            rec.measure()
        rec.update(status="done", ended=now())
        if inputs is not None:
            rec["fingerprint"] = digest(inputs)
        rec.keep = False
        rec.save(**rec.top)

    def mark_stale(self, model_id: str) -> list[str]:
        """Label the checkpoint records measured on another checkpoint than `model_id`; returns their names."""
        manifest = self.read_manifest()
        stale = []
        for name in CHECKPOINT_STAGES:
            rec = manifest.get("stages", {}).get(name)
            if rec and rec.get("model_id") != model_id and not rec.get("stale"):
                rec["stale"] = f"measured on checkpoint {rec.get('model_id') or 'unknown'}, not the current {model_id}"
                stale.append(name)
        if stale:
            self.write_manifest(manifest)
        return stale


class StageRecord(dict):
    """A stage's record while it runs (see `RunDir.stage`)."""

    def __init__(self, run: RunDir, name: str, section: str, keep: bool, fields: dict[str, Any]):
        super().__init__(fields)
        self.run, self.name, self.section, self.keep = run, name, section, keep
        self.top: dict[str, Any] = {}
        self.sampler: ResourceSampler | None = None
        self.t0 = 0.0

    def measure(self) -> None:
        """Wall time since the stage opened and the peak memory so far, into the record."""
        self.sampler.sample()
        self.update(wall_s=round(time.perf_counter() - self.t0, 3), **self.sampler.summary())

    def save(self, **top: Any) -> None:
        if self.keep:  # the earlier done record stays the current one; this attempt is kept beside it
            self.run.update_stage(self.name, {"last_attempt": dict(self)}, section=self.section)
        else:
            self.run.update_stage(self.name, dict(self), section=self.section, replace=True, **top)


def one_line(exc: BaseException) -> str:
    """An error as one line: a ReapError's message, else its type and the first line of its message."""
    if isinstance(exc, ReapError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _in_finalizer(frame: Any) -> bool:
    """Whether `frame` runs inside an object's `__del__` (the garbage collector's, at any bytecode):
    measured, a SIGTERM taken inside regex's `Group.__del__` during AutoRound's set-up was swallowed
    ("Exception ignored in: ... __del__") and the build ran to the end."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Any]:
    """SIGTERM ends the stage like Ctrl-C; yields a function that ignores it from then on (while cleaning up).
    Only the main thread can take signals: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        if _in_finalizer(frame):  # Python ignores an exception raised in __del__: deliver it again just after
            threading.Timer(0.1, os.kill, (os.getpid(), signum)).start()
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGTERM, previous)


def current(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    """`stages.<name>` when it describes the current build's checkpoint (same `model_id`), else None."""
    rec = manifest.get("stages", {}).get(name)
    build_id = manifest.get("stages", {}).get("build", {}).get("model_id")
    if not rec or build_id is None or rec.get("model_id") != build_id:
        return None
    return rec


def checkpoint_id(model_dir: Path) -> str:
    """A checkpoint's identity: a digest of its config.json, its index and the names and sizes of its shards.
    Cheap (no weight is read); a new build, a resharding or a changed config give a new one."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    return digest(
        {
            "config": (model_dir / "config.json").read_text(),
            "index": index.read_text() if index.is_file() else None,
            "shards": sorted((p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors")),
        }
    )


def digest(obj: Any) -> str:
    """A short, stable fingerprint of a JSON-able value (recorded inputs of a stage or a worker)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Refuse, before anything is read or written, an output folder that cannot be made: an existing file, a
    folder under a file, or one under a folder this user cannot write to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; choose a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{option} {path} lies under {probe}, which is a file; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {probe} is not writable by this user; choose another folder")


def open_run(path: Path, overwrite: bool = False) -> RunDir:
    """A fresh run folder. An existing one is refused unless `overwrite` (then its model/ is replaced
    only when the new build succeeds: see build.py)."""
    check_output_dir(path)
    run = RunDir(path)
    if run.model_dir.exists() and not overwrite:
        raise OutputExistsError(f"{path} already holds a build; pass --overwrite to rebuild it or choose another --out")
    run.root.mkdir(parents=True, exist_ok=True)
    run.logs_dir.mkdir(exist_ok=True)
    return run


def existing_run(path: Path) -> RunDir:
    run = RunDir(Path(path))
    if not run.manifest_path.is_file():
        raise InputError(f"{path} is not a reap run folder (no manifest.json); run `reap build` first")
    return run


def check_free_disk(where: Path, needed_bytes: int) -> None:
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise DiskSpaceError(
            f"not enough disk at {probe}: {needed_bytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; "
            "free some space or pass --out on a larger disk"
        )


def swap_into_place(new: Path, dest: Path) -> None:
    """Replace `dest` by `new`; the old one is removed only once the new one is in place."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
