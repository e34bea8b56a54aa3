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


def _zero(ax, y=0.0, label=None):
    """The line where the sign (or the balance) changes, with its meaning as a legend entry."""
    ax.axhline(y, color="0.25", lw=0.9, ls="--", zorder=1, label=label)


def _line(ax, records, key, color, label, scale=1.0, **kw):
    xs, ys = series(records, key, scale)
    if xs:
        ax.plot(xs, ys, color=color, label=label, **{"lw": 1.6, **kw})
    ex, ey = series(records, "eval_" + key, scale)
    if ex:  # evaluation: same colour, dotted with dots (one note for the whole figure, no legend entry)
        ax.plot(ex, ey, color=color, ls=":", marker="o", ms=3.5, lw=1.0)


def _band(ax, records, lo, hi, color, label):
    (x1, y1), (x2, y2) = series(records, lo), series(records, hi)
    if x1 and x1 == x2:
        ax.fill_between(x1, y1, y2, color=color, alpha=0.18, lw=0, label=label)


def _missing(ax, what):
    ax.text(0.5, 0.5, f"no {what} in this log\n(train with FastDPOTrainer(..., fastdpo_diagnostics=True))",
            ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")


def _share(records, prefix=""):
    """Chosen share (%) of the squared logits-gradient norm: c^2 / (c^2 + r^2)."""
    (xc, c), (xr, r) = series(records, prefix + D + "grad_norm/chosen"), series(records, prefix + D + "grad_norm/rejected")
    if xc != xr:
        return [], []
    out = [100 * a * a / (a * a + b * b) if (a * a + b * b) > 0 else math.nan for a, b in zip(c, r)]
    return xc, out


def plot(records: list[dict], out: Path, title: str) -> list[str]:
    """Draw the dynamics to ``out``; returns notes on what the log lacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes = []
    fig, axes = plt.subplots(3, 2, figsize=(12, 9.5), sharex=True)
    (ax_r, ax_d), (ax_b, ax_w), (ax_g, ax_s) = axes

    ax_r.set_title("implicit rewards and margin", fontsize=10, loc="left")
    if _has(records, "rewards/chosen"):
        _band(ax_r, records, D + "margin/p10", D + "margin/p90", MARGIN, "margin, 10th-90th percentile")
        _line(ax_r, records, "rewards/chosen", CHOSEN, "chosen")
        _line(ax_r, records, "rewards/rejected", REJECTED, "rejected")
        _line(ax_r, records, "rewards/margins", MARGIN, "margin (chosen - rejected)")
        _zero(ax_r, label="0: the reference's")
    else:
        ax_r.text(0.5, 0.5, "no rewards/* in this log", ha="center", va="center", transform=ax_r.transAxes)
        notes.append("no rewards/* metrics")
    ax_r.set_ylabel("beta x log-ratio (nats)")

    ax_d.set_title("likelihood displacement: log-ratio to the reference", fontsize=10, loc="left")
    if _has(records, D + "logratio_per_token/chosen"):
        _line(ax_d, records, D + "logratio_per_token/chosen", CHOSEN, "chosen")
        _line(ax_d, records, D + "logratio_per_token/rejected", REJECTED, "rejected")
        _zero(ax_d, label="0: as likely as under the reference")
    else:
        _missing(ax_d, "diagnostics/logratio_per_token/*")
    ax_d.set_ylabel("log pi - log pi_ref (nats / token)")

    ax_b.set_title("share of the batch: displaced responses, negligible weights", fontsize=10, loc="left")
    if _has(records, D + "below_ref/chosen", D + "weight/frac_small"):
        _line(ax_b, records, D + "below_ref/chosen", CHOSEN, "chosen below the reference", scale=100)
        _line(ax_b, records, D + "below_ref/rejected", REJECTED, "rejected below the reference", scale=100)
        _line(ax_b, records, D + "weight/frac_small", WEIGHT, "pairs with w < 1% of the batch max", scale=100,
              ls="--")
        ax_b.set_ylim(-3, 103)
        ax_b.legend(fontsize=7, loc="center left", framealpha=0.85)  # the middle of a 0-100% panel is emptiest
    else:
        _missing(ax_b, "diagnostics/below_ref/*")
    ax_b.set_ylabel("% of responses / pairs")

    ax_w.set_title("loss reweighting: per-pair weight w = -dL/d(log pi chosen)", fontsize=10, loc="left")
    if _has(records, D + "weight/mean"):
        _band(ax_w, records, D + "weight/p10", D + "weight/p90", WEIGHT, "10th-90th percentile")
        _line(ax_w, records, D + "weight/mean", WEIGHT, "mean")
        _zero(ax_w, label="0: the pair no longer pushes")
    else:
        _missing(ax_w, "diagnostics/weight/*")
    ax_w.set_ylabel("w (per nat of log-prob)")

    ax_g.set_title("positive vs negative learning: logits-gradient norm", fontsize=10, loc="left")
    if _has(records, D + "grad_norm/chosen"):
        _line(ax_g, records, D + "grad_norm/chosen", CHOSEN, "chosen tokens (positive)")
        _line(ax_g, records, D + "grad_norm/rejected", REJECTED, "rejected tokens (negative)")
        ax_g.set_yscale("log")
    else:
        _missing(ax_g, "diagnostics/grad_norm/*")
    ax_g.set_ylabel("||dL/dlogits|| (log scale)")

    ax_s.set_title("chosen share of the squared logits-gradient norm", fontsize=10, loc="left")
    if _has(records, D + "grad_norm/chosen"):
        for prefix, style in (("", dict(lw=1.6, label="chosen share")), ("eval_", dict(ls=":", marker="o", ms=3.5,
                                                                                          lw=1.0))):
            xs, ys = _share(records, prefix)
            if xs:
                ax_s.plot(xs, ys, color=CHOSEN, **style)
        _zero(ax_s, 50.0, label="50%: balanced (below: the rejected side dominates)")
        ax_s.set_ylim(-3, 103)
    else:
        _missing(ax_s, "diagnostics/grad_norm/*")
    ax_s.set_ylabel("% chosen")

    if not _has(records, D + "weight/mean"):
        notes.append("no diagnostics/* metrics: train with FastDPOTrainer(..., fastdpo_diagnostics=True) "
                     "or log fastdpo.dpo_loss(..., diagnostics=True).metrics")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    evals = any(k.startswith("eval_") for r in records for k in r)
    fig.suptitle(title + ("\nsolid: training logs; dotted with dots: evaluation" if evals else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
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
