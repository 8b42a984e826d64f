"""The run folder: its paths and `manifest.json`, always written atomically (temp file + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reap.errors import DiskSpaceError, InputError, OutputExistsError
from reap.secrets import redact


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
