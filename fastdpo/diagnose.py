"""``python -m fastdpo.diagnose OUTPUT_DIR_OR_LOG``: draw a DPO run's training dynamics to one PNG.

Reads a trainer's ``trainer_state.json`` (its ``log_history``; a run's output directory, or the newest
``checkpoint-*/`` in it) or a JSONL file of metric dicts (one per line, ``step`` optional), and plots
against the optimizer step: the implicit rewards and margins, likelihood displacement (log-ratios to
the reference and the share of responses below it), the distribution of the per-pair loss weights and
the chosen / rejected logits-gradient norms and the chosen share. The ``diagnostics/...`` metrics come
from ``FastDPOTrainer(..., fastdpo_diagnostics=True)`` or ``fastdpo.dpo_loss(..., diagnostics=True)``;
their definitions are in docs/diagnostics.md. Prints the PNG's path.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

D = "diagnostics/"
CHOSEN, REJECTED, MARGIN, WEIGHT = "tab:green", "tab:red", "tab:blue", "tab:purple"


class LogError(ValueError):
    """The input is not a readable log of metrics."""


def find_log(path: Path) -> Path:
    """The log file behind ``path``: the file itself, or a directory's ``trainer_state.json`` (else that of
    its newest ``checkpoint-<step>/``, else its only ``*.jsonl``)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise LogError(f"{path} does not exist")
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    ckpts = sorted((p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
                    and (p / "trainer_state.json").is_file()), key=lambda p: int(p.name.split("-")[1]))
    if ckpts:
        return ckpts[-1] / "trainer_state.json"
    jsonl = sorted(path.glob("*.jsonl"))
    if len(jsonl) == 1:
        return jsonl[0]
    raise LogError(f"{path} holds no trainer_state.json, no checkpoint-*/trainer_state.json and "
                   f"{'several' if jsonl else 'no'} *.jsonl file{'s' if jsonl else ''}: pass the log file itself")


def load_records(log: Path) -> list[dict]:
    """Metric dicts, each with a ``step``: a ``trainer_state.json``'s ``log_history``, a JSON list of dicts, or a
    JSONL file of dicts (a missing ``step`` is the record's 1-based position)."""
    text = log.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "log_history" in data:
        records = data["log_history"]
    elif isinstance(data, list):
        records = data
    elif isinstance(data, dict):  # a one-line JSONL file
        records = [data]
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LogError(f"{log}:{i}: not a JSON object per line ({e.msg})") from None
    if not all(isinstance(r, dict) for r in records):
        raise LogError(f"{log}: expected metric dicts (a trainer_state.json, or JSONL of objects)")
    return [{**r, "step": r.get("step", i)} for i, r in enumerate(records, 1)]


def series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    """``(steps, values)`` of ``key`` where it is logged (non-finite values become gaps)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v * scale if math.isfinite(v) else math.nan)
    return xs, ys


def _has(records, *keys) -> bool:
    """Whether any record holds one of ``keys`` (from training, or from evaluation: ``eval_<key>``)."""
    return any(k in r or "eval_" + k in r for r in records for k in keys)


class Line(NamedTuple):
    what: object  # a metric key, or a derived series: fn(records, key prefix) -> (steps, values)
    colour: str
    label: str
    scale: float = 1.0
    ls: str = "-"


class Panel(NamedTuple):
    title: str
    ylabel: str
    lines: tuple
    needs: tuple = ()  # keys whose presence means the panel has data (default: the lines' keys)
    band: tuple | None = None  # (low key, high key, colour, label): a percentile band
    zero: tuple | None = None  # (y, meaning): where a sign or a balance changes
    ylim: tuple | None = None
    log: bool = False
    legend: str = "best"


def _share(records, prefix=""):
    """Chosen share (%) of the squared logits-gradient norm: c^2 / (c^2 + r^2)."""
    (xc, c), (xr, r) = series(records, prefix + D + "grad_norm/chosen"), series(records, prefix + D + "grad_norm/rejected")
    if xc != xr:
        return [], []
    return xc, [100 * a * a / (a * a + b * b) if (a * a + b * b) > 0 else math.nan for a, b in zip(c, r)]


PERCENT = (-3, 103)
PANELS = (
    Panel("implicit rewards and margin", "beta x log-ratio (nats)",
          (Line("rewards/chosen", CHOSEN, "chosen"), Line("rewards/rejected", REJECTED, "rejected"),
           Line("rewards/margins", MARGIN, "margin (chosen - rejected)")), needs=("rewards/chosen",),
          band=(D + "margin/p10", D + "margin/p90", MARGIN, "margin, 10th-90th percentile"),
          zero=(0.0, "0: the reference's")),
    Panel("likelihood displacement: log-ratio to the reference", "log pi - log pi_ref (nats / token)",
          (Line(D + "logratio_per_token/chosen", CHOSEN, "chosen"),
           Line(D + "logratio_per_token/rejected", REJECTED, "rejected")),
          zero=(0.0, "0: as likely as under the reference")),
    Panel("share of the batch: displaced responses, negligible weights", "% of responses / pairs",
          (Line(D + "below_ref/chosen", CHOSEN, "chosen below the reference", 100),
           Line(D + "below_ref/rejected", REJECTED, "rejected below the reference", 100),
           Line(D + "weight/frac_small", WEIGHT, "pairs with w < 1% of the batch max", 100, "--")),
          ylim=PERCENT, legend="center left"),  # the middle of a 0-100% panel is usually empty
    Panel("loss reweighting: per-pair weight w = -dL/d(log pi chosen)", "w (per nat of log-prob)",
          (Line(D + "weight/mean", WEIGHT, "mean"),), band=(D + "weight/p10", D + "weight/p90", WEIGHT,
                                                            "10th-90th percentile"),
          zero=(0.0, "0: the pair no longer pushes")),
    Panel("positive vs negative learning: logits-gradient norm", "||dL/dlogits|| (log scale)",
          (Line(D + "grad_norm/chosen", CHOSEN, "chosen tokens (positive)"),
           Line(D + "grad_norm/rejected", REJECTED, "rejected tokens (negative)")), log=True),
    Panel("chosen share of the squared logits-gradient norm", "% chosen", (Line(_share, CHOSEN, "chosen share"),),
          needs=(D + "grad_norm/chosen",), zero=(50.0, "50%: balanced (below: the rejected side dominates)"),
          ylim=PERCENT),
)


def _get(records, what, prefix, scale):
    return what(records, prefix) if callable(what) else series(records, prefix + what, scale)


def _draw(ax, panel: Panel, records) -> None:
    ax.set_title(panel.title, fontsize=10, loc="left")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    needs = panel.needs or tuple(line.what for line in panel.lines)
    if not _has(records, *needs):
        hint = "\n(train with FastDPOTrainer(..., fastdpo_diagnostics=True))" if needs[0].startswith(D) else ""
        ax.text(0.5, 0.5, f"no {needs[0].rsplit('/', 1)[0]}/* in this log{hint}", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="0.4")
        return
    if panel.band:
        lo, hi, colour, label = panel.band
        (x1, y1), (x2, y2) = series(records, lo), series(records, hi)
        if x1 and x1 == x2:
            ax.fill_between(x1, y1, y2, color=colour, alpha=0.18, lw=0, label=label)
    for line in panel.lines:
        xs, ys = _get(records, line.what, "", line.scale)
        if xs:
            ax.plot(xs, ys, color=line.colour, label=line.label, lw=1.6, ls=line.ls)
        xs, ys = _get(records, line.what, "eval_", line.scale)
        if xs:  # evaluation: same colour, dotted with dots (one note for the whole figure)
            ax.plot(xs, ys, color=line.colour, ls=":", marker="o", ms=3.5, lw=1.0)
    if panel.zero:
        ax.axhline(panel.zero[0], color="0.25", lw=0.9, ls="--", zorder=1, label=panel.zero[1])
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    if panel.log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc=panel.legend, framealpha=0.85)


def plot(records: list[dict], out: Path, title: str) -> list[str]:
    """Draw the dynamics to ``out`` (the panels of :data:`PANELS`); returns notes on what the log lacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 9.5), sharex=True)
    for ax, panel in zip(axes.flat, PANELS):
        _draw(ax, panel, records)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    evals = any(k.startswith("eval_") for r in records for k in r)
    fig.suptitle(title + ("\nsolid: training logs; dotted with dots: evaluation" if evals else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    notes = []
    if not _has(records, "rewards/chosen"):
        notes.append("no rewards/* metrics")
    if not _has(records, D + "weight/mean"):
        notes.append("no diagnostics/* metrics: train with FastDPOTrainer(..., fastdpo_diagnostics=True) "
                     "or log fastdpo.dpo_loss(..., diagnostics=True).metrics")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", metavar="OUTPUT_DIR_OR_LOG", help="a trainer output directory, a trainer_state.json or "
                    "a JSONL file of metrics")
    ap.add_argument("--out", default=None, help="PNG path (default: diagnostics.png in OUTPUT_DIR, or beside the log)")
    args = ap.parse_args(argv)
    try:
        log = find_log(Path(args.log))
        records = load_records(log)
    except (LogError, OSError, UnicodeDecodeError) as e:
        print(f"fastdpo.diagnose: {e}", file=sys.stderr)
        return 2
    if not any(k != "step" for r in records for k in r):
        print(f"fastdpo.diagnose: {log} holds no metrics", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastdpo.diagnose: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    given = Path(args.log)
    out = Path(args.out) if args.out else (given if given.is_dir() else log.parent) / "diagnostics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    for note in plot(records, out, f"DPO training dynamics: {log}"):
        print(f"fastdpo.diagnose: note: {note}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
