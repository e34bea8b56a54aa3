"""The benchmark's plots: one row per case, time (log scale, each bar labelled with its time and its
speed-up over naive torch) beside peak extra memory, one colour per implementation in every plot
(:data:`fastdpo.bench.providers.STYLES`), the torch reference hatched and named as the reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def _is_naive(p) -> bool:
    return (p.impl or p.name) == "naive"


def _num(x: float) -> str:
    """Three significant digits at most, without an exponent: 0.0123, 1.23, 12.3, 123, 1,234."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 0.001 else f"{x:.1e}"


def plot_suite(results: list[dict], cases: list, family: list, path: Path, title: str) -> str | None:
    """Draw ``results`` of ``family``'s providers over ``cases`` into ``path``; returns a problem
    (e.g. matplotlib missing) or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    ok = [r for r in results if "error" not in r]
    provs = [p for p in family if any(r["provider"] == p.name for r in ok)]
    if not provs or not cases:
        return "nothing to plot: every measurement failed"
    row_h = 0.9 + 0.34 * len(provs)
    fig, axes = plt.subplots(len(cases), 2, figsize=(13.5, 0.9 + row_h * len(cases)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    for (ax_t, ax_m), case in zip(axes, cases):
        key = dataclasses.asdict(case)
        by = {r["provider"]: r for r in ok if r["case"] == key}
        shown = [p for p in provs if p.name in by]
        ys = list(range(len(shown)))[::-1]  # first provider on top
        naive = next((by[p.name]["median_ms"] for p in shown if _is_naive(p)), None)
        times = [by[p.name]["median_ms"] for p in shown]
        for y, p, t in zip(ys, shown, times):
            st = p.style
            ax_t.barh(y, t, color=st.color, hatch=st.hatch, edgecolor="black" if p.kind == "fastdpo" else "0.35",
                      linewidth=0.8)
            text = f"{_num(t)} ms"
            if naive and p.kind != "floor":
                text += "   (baseline)" if _is_naive(p) else f"   {_num(naive / t)}× vs naive"
            ax_t.text(t * 1.08, y, text, va="center", fontsize=8.5,
                      fontweight="bold" if p.kind == "fastdpo" else "normal")
        if naive:
            ax_t.axvline(naive, color=next(p.style.color for p in shown if _is_naive(p)), ls="--", lw=0.9)
        if times:
            ax_t.set_xscale("log")
            ax_t.set_xlim(min(times) / 1.6, max(times) * 14)
        ax_t.set_yticks(ys)
        ax_t.set_yticklabels([p.display for p in shown], fontsize=8.5)
        ax_t.set_xlabel("time per step, median (ms, log scale)", fontsize=8.5)
        ax_t.set_title(f"{case.label()}: time (lower is better)", fontsize=9.5, loc="left")
        ax_t.grid(axis="x", which="both", alpha=0.25)

        mems = [by[p.name].get("extra_mb") for p in shown]
        top = max([m for m in mems if m is not None] or [1.0])
        for y, p, m in zip(ys, shown, mems):
            st = p.style
            ax_m.barh(y, m or 0.0, color=st.color, hatch=st.hatch, edgecolor="0.35", linewidth=0.8)
            ax_m.text((m or 0.0) + top * 0.02, y, "n/a" if m is None else f"{m:,.0f} MB", va="center", fontsize=8.5)
        ax_m.set_xlim(0, top * 1.3)
        ax_m.set_yticks(ys)
        ax_m.set_yticklabels([])
        ax_m.set_xlabel("peak memory beyond the inputs (MB)", fontsize=8.5)
        ax_m.set_title("extra memory (lower is better)", fontsize=9.5, loc="left")
        ax_m.grid(axis="x", alpha=0.25)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
