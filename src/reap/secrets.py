"""What must not leave the machine: API keys and tokens are masked in every command reap prints or records
and removed from any text that goes into a log, the manifest, the card or the Hub; local absolute paths
become `<local path>` in what is published."""

from __future__ import annotations

import os
import re

MASK = "***"
SECRET_ENV = ("VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
# A flag or a record key names a secret when one of its dash/underscore-separated words is one of these
# (`--api-key`, `--hf-token`, `client_secret`), not merely contains one (`--tokenizer`, `max_num_batched_tokens`).
SECRET_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth"}
)
HUB_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")  # a Hub token, whether or not this process knows it


def names_secret(name: str) -> bool:
    """Whether a flag (`--api-key`, `--hf-token=X`) or a record key (`api_key`) names a secret."""
    words = re.split(r"[-_]+", name.lstrip("-").partition("=")[0].lower())
    return any(w in SECRET_WORDS for w in words)


def is_secret_flag(arg: str) -> bool:
    return arg.startswith("-") and names_secret(arg)


# A secret value is looked for in text only when it is at least this long. Real keys and tokens are (an
# `hf_` token is 37 characters, an `sk-` key longer), while a short value such as `test` is also an ordinary
# word: replacing it as a substring damaged legitimate text (`"task": "la***"`, `***-model`). A short value
# given after a secret flag is still masked there, by its position.
MIN_SECRET_LEN = 8
_given: set[str] = set()  # secret values reap took from a command line (`-- --api-key K`) in this process


def remember(secret: str) -> None:
    """Treat `secret` as known from now on (redacted like the secret environment variables)."""
    _given.add(secret)


def mask_argv(argv: list[str]) -> list[str]:
    """`argv` with every value of a flag that names a key, token, secret or password replaced by *** (all of
    `--api-key K1 K2` up to the next flag, and `--api-key=K`), and any element that holds a known secret
    masked whole (never cut out of a longer value)."""
    secrets = known_secrets()
    out: list[str] = []
    hiding = False
    for arg in argv:
        if arg.startswith("-"):
            flag, eq, value = arg.partition("=")
            hiding = is_secret_flag(arg) and not eq
            secret_value = eq and (is_secret_flag(arg) or any(s in value for s in secrets))
            out.append(flag + "=" + MASK if secret_value else MASK if any(s in arg for s in secrets) else arg)
        else:
            out.append(MASK if hiding or any(s in arg for s in secrets) else arg)
    return out


def known_secrets() -> list[str]:
    """The secret values known in this process: those of the secret environment variables and those given
    on a command line, at least MIN_SECRET_LEN characters long."""
    values = {*(os.environ.get(k, "") for k in SECRET_ENV), *_given}
    return [v for v in values if len(v) >= MIN_SECRET_LEN]


def redact(text: str) -> str:
    """`text` with every known secret value, and anything shaped like a Hub token, replaced by ***."""
    for secret in sorted(known_secrets(), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return HUB_TOKEN_RE.sub(MASK, text)


LOCAL_PATH = "<local path>"
PATH_RE = re.compile(r"(?<![\w.:/~<-])~?/[\w.~-][^\s\"'`,;)>]*")  # absolute paths, not URLs nor `org/name`


def hide_local_paths(text: str) -> str:
    """`text` with every absolute (or ~) path replaced by `<local path>`."""
    return PATH_RE.sub(LOCAL_PATH, text)
