"""Shared fixtures. Unit tests (default) are fast and offline; integration tests (`-m integration`) run the
real AutoRound, transformers and (later) vLLM on the demo model, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
