"""Where the project's data folders (templates/, evals/, recipes/) are, installed or from a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`templates`, `evals` or `recipes`: packaged inside the wheel, or at the root of a checkout."""
    for candidate in (_PKG / name, _PKG.parents[1] / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"reap's {name}/ folder is missing from this installation; reinstall reap")
