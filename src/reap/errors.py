"""Typed errors. Library code raises these; `reap.cli` maps each to one line and an exit code."""

from __future__ import annotations


class ReapError(Exception):
    """Base of every error the CLI reports as one clean line (exit code 1)."""

    exit_code = 1


class RecipeError(ReapError):
    """The recipe file is missing, unreadable or invalid; carries every problem at once."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = "; ".join(problems)
        super().__init__(f"invalid recipe {path}: {lines}")


class InputError(ReapError):
    """A path, model or option given by the user cannot be used."""


class OutputExistsError(ReapError):
    """The output folder exists and the user did not ask to overwrite or resume."""


class DiskSpaceError(ReapError):
    """Not enough free disk for the output."""


class UnsupportedModelError(ReapError):
    """The model is not a Mixture-of-Experts architecture reap supports."""


class VerificationError(ReapError):
    """A checkpoint failed one or more verification gates."""

    def __init__(self, where: str, failures: list[str]):
        self.where = where
        self.failures = failures
        super().__init__(f"verification failed for {where}: " + "; ".join(failures))


class CardError(ReapError):
    """The model card cannot be rendered (a value it needs is missing)."""


class StageError(ReapError):
    """A third-party tool (AutoRound, transformers) failed inside a stage."""


class HubAuthError(ReapError):
    """No Hugging Face token, or one the Hub does not accept."""


class RepoAccessError(ReapError):
    """The token's user cannot write to the Hub repo."""


class UploadError(ReapError):
    """The upload to the Hub failed; nothing was committed, and a re-run sends only what did not arrive."""
