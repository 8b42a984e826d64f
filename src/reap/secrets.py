"""What must not leave the machine: API keys and tokens are masked in every command reap prints or records
and removed from any text that goes into a log, the manifest, the card or the Hub; local absolute paths
become `<local path>` in what is published."""

from __future__ import annotations

import os
import re

MASK = "***"
SECRET_ENV = ("VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
# A flag names a secret when one of its dash/underscore-separated words is one of these (`--api-key`,
# `--hf-token`, `--client-secret`), not merely contains one (`--tokenizer`, `--max-num-batched-tokens`).
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})


def is_secret_flag(arg: str) -> bool:
    if not arg.startswith("-"):
        return False
    words = re.split(r"[-_]+", arg.lstrip("-").partition("=")[0].lower())
    return any(w in SECRET_WORDS for w in words)


def mask_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of every flag that names a key, token, secret or password replaced by ***
    (`--api-key X` and `--api-key=X` alike), and any known secret value wherever it appears."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("--"):
            out.append(MASK)
        elif is_secret_flag(arg) and "=" in arg:
            out.append(arg.partition("=")[0] + "=" + MASK)
        else:
            out.append(redact(arg))
        hide_next = is_secret_flag(arg) and "=" not in arg
    return out


def known_secrets() -> list[str]:
    """The values of the secret environment variables set in this process (at least 4 characters long)."""
    return [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 4]


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """`text` with every known secret value (and `extra` ones) replaced by ***."""
    for secret in sorted({*known_secrets(), *(e for e in extra if e and len(e) >= 4)}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


LOCAL_PATH = "<local path>"
PATH_RE = re.compile(r"(?<![\w.:/~<-])~?/[\w.~-][^\s\"',;)>]*")  # absolute paths, not URLs nor `org/name`


def hide_local_paths(text: str) -> str:
    """`text` with every absolute (or ~) path replaced by `<local path>`."""
    return PATH_RE.sub(LOCAL_PATH, text)
