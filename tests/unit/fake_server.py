"""A stand-in for reap.serve.Server in unit tests of the stages that serve (no vLLM process is started):
what ServerPool uses of a server, and a log of what was started and stopped."""

from __future__ import annotations

from typing import Any


class Proc:
    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def fake_server(
    events: list[str], on_cpu: bool = False, record: dict[str, Any] | None = None, failing: tuple[str, ...] = ()
) -> type:
    """A Server class whose instances append "start NAME:PORT" / "stop NAME" to `events`; the served names in
    `failing` never get ready (ServeError, as vLLM exiting at start-up)."""
    from reap.serve import ServeError

    class FakeServer:
        def __init__(self, target, opts, log_name="serve.log"):
            self.target, self.opts, self.on_cpu = target, opts, on_cpu
            self.log_path = target.run.logs_dir / log_name
            self.base_url, self.api_key = f"http://127.0.0.1:{opts.port}/v1", None
            self.proc: Proc | None = None
            self.startup_s: float | None = None
            self.started_with: list[str] = []

        def start(self) -> None:
            events.append(f"start {self.target.served_name}:{self.opts.port}")
            self.proc = Proc()

        def ready_now(self) -> bool:
            if self.target.served_name in failing:
                self.stop()
                raise ServeError(f"vLLM exited (1): {self.target.served_name} cannot start")
            self.startup_s = 1.0
            return True

        def terminate(self) -> None:
            events.append(f"term {self.target.served_name}")

        def stop(self) -> None:
            events.append(f"stop {self.target.served_name}")
            if self.proc:
                self.proc.code = 0

        def record(self) -> dict[str, Any]:
            return dict(record or {"argv": [], "startup_s": self.startup_s, "started_with": self.started_with})

    return FakeServer
