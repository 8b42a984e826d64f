"""The card's charts: PNG files rendered from the manifest alone (matplotlib, Agg, offline), written into
model/ so that they travel with the release and render on the Hub.

A chart is drawn only when the manifest holds its figures (a current bench record with results, a build
that logged its blocks): a missing figure leaves the chart out of the card, never an empty one. Rendering is
deterministic: matplotlib's default style (not the user's matplotlibrc), fixed size and resolution, and no
metadata in the PNG (no software version, no time), so the same manifest gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reap.rundir import atomic_write_bytes, current
from reap.stats import log

THROUGHPUT = "serving_throughput.png"
BLOCKS = "build_blocks.png"


def _bench_rows(manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(quantized rows, baseline rows) of the current bench record, only passes that completed requests."""
    rec = current(manifest, "bench") or {}
    if rec.get("status") != "done":
        return [], []
    ok = [r for r in rec.get("results") or [] if r.get("completed")]
    base = [r for r in (rec.get("baseline") or {}).get("results") or [] if r.get("completed")]
    return ok, base


def _blocks(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in manifest.get("stages", {}).get("build", {}).get("blocks") or [] if b.get("wall_s")]


def _draw_throughput(fig, manifest: dict[str, Any]) -> None:
    quantized, baseline = _bench_rows(manifest)
    rec = manifest["stages"]["bench"]
    s = rec["settings"]
    ax = fig.subplots()
    for rows, label, marker in ((quantized, "W4A16", "o"), (baseline, "bf16 source", "s")):
        if rows:
            xs = [r["concurrency"] for r in rows]
            ax.plot(xs, [r["output_throughput"] for r in rows], marker=marker, label=label)
    levels = sorted({r["concurrency"] for r in quantized + baseline})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"vllm bench serve: {s['input_len']} tokens in, {s['output_len']} out")
    ax.grid(True, alpha=0.3)
    ax.legend()


def _draw_blocks(fig, manifest: dict[str, Any]) -> None:
    blocks = _blocks(manifest)
    idx = [b["index"] for b in blocks]
    with_loss = [b for b in blocks if b.get("loss_best") is not None]
    axes = fig.subplots(1, 2 if with_loss else 1, squeeze=False)[0]
    axes[0].bar(idx, [b["wall_s"] for b in blocks], color="tab:blue")
    axes[0].set_xlabel("decoder block")
    axes[0].set_ylabel("wall time (s)")
    axes[0].set_title("AutoRound time per block")
    if with_loss:
        li = [b["index"] for b in with_loss]
        axes[1].plot(li, [b["loss_iter0"] for b in with_loss], marker="o", label="iteration 0")
        axes[1].plot(li, [b["loss_best"] for b in with_loss], marker="s", label="best")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("decoder block")
        axes[1].set_ylabel("block output MSE")
        axes[1].set_title("AutoRound loss per block")
        axes[1].legend()
    for ax in axes:
        ax.set_xticks(idx if len(idx) <= 16 else idx[:: max(1, len(idx) // 12)])
        ax.grid(True, axis="y", alpha=0.3)


# name -> (does the manifest hold its figures, draw it, figure size in inches, alt text in the card)
CHARTS: dict[str, tuple[Callable[[dict], bool], Callable[[Any, dict], None], tuple[float, float], str]] = {
    THROUGHPUT: (
        lambda m: bool(_bench_rows(m)[0]),
        _draw_throughput,
        (6.4, 4.0),
        "Output tokens per second against concurrency, W4A16 and bf16",
    ),
    BLOCKS: (lambda m: bool(_blocks(m)), _draw_blocks, (9.6, 3.6), "AutoRound wall time and loss per decoder block"),
}


def available(manifest: dict[str, Any]) -> list[str]:
    """The charts the manifest has figures for (a pure function of the manifest)."""
    return [name for name, (has, *_rest) in CHARTS.items() if has(manifest)]


def alt_text(name: str) -> str:
    return CHARTS[name][3]


def render(manifest: dict[str, Any], name: str) -> bytes:
    """One chart as PNG bytes: the same manifest gives the same bytes."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _has, draw, size, _alt = CHARTS[name]
    with matplotlib.style.context("default"), matplotlib.rc_context({"figure.dpi": 100, "savefig.dpi": 100}):
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig, manifest)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def render_all(manifest: dict[str, Any]) -> dict[str, bytes]:
    """{name: PNG} for every chart the manifest has figures for; {} (and a log line) where matplotlib is not
    installed: the card then shows no chart."""
    names = available(manifest)
    if not names:
        return {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("card: matplotlib is not installed (pip install 'reap[cpu]' or 'reap[gpu]'): no charts")
        return {}
    return {name: render(manifest, name) for name in names}


def write_into(model_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Write the charts into `model_dir` and remove chart files the manifest no longer has figures for (a
    stale chart never stays beside the card); returns the names written."""
    charts = render_all(manifest)
    for name in CHARTS:
        path = Path(model_dir) / name
        if name in charts:
            atomic_write_bytes(path, charts[name])
        else:
            path.unlink(missing_ok=True)
    return list(charts)
