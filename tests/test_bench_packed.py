"""The packed-vs-padded benchmark: reproducible lengths, and the CLI end to end on tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys

from fastdpo.bench.packed import CAP, draw_lengths, sequence_lengths


def test_lengths_are_reproducible_and_capped():
    a = draw_lengths(200, seed=3)
    assert a == draw_lengths(200, seed=3) and a != draw_lengths(200, seed=4)
    assert all(p >= 1 and c >= 1 and r >= 1 and p + c <= CAP and p + r <= CAP for p, c, r in a)
    prompts = [p for p, _, _ in a]
    responses = [c for _, c, _ in a] + [r for _, _, r in a]
    assert 120 < sum(prompts) / len(prompts) < 190 and 200 < sum(responses) / len(responses) < 300
    assert len(sequence_lengths(a)) == 400


def test_bench_packed_cli_tiny(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "fastdpo.bench.packed", "--suites", "loss", "--methods", "linear", "--pairs", "2",
         "--vocab", "300", "--hidden", "16", "--reps", "1", "--warmup", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    [folder] = list(tmp_path.iterdir())
    data = json.loads((folder / "packed.json").read_text())
    rows = data["results"]
    assert {(r["case"].split()[1], r["layout"]) for r in rows} == {("linear", "padded"), ("linear", "packed")}
    assert all("error" not in r and r["median_ms"] > 0 for r in rows), rows
    for case in {r["case"] for r in rows}:
        pad, pk = (next(r for r in rows if r["case"] == case and r["layout"] == lay) for lay in ("padded", "packed"))
        assert pk["tokens"] == pk["real_tokens"] == pad["real_tokens"] < pad["tokens"]
    assert "speed-up" in p.stdout and data["meta"]["command"].startswith("python -m fastdpo.bench.packed")


def test_bench_packed_end_to_end_step_tiny():
    """The end-to-end measurement (run in-process here: the CLI runs it in a fresh process)."""
    from fastdpo.bench.packed import _e2e_run

    spec = dict(pairs=1, steps=1, warmup=1, vocab=300, hidden=32, layers=1, seed=0, dtype="fp32", attn="sdpa")
    pad, pk = (_e2e_run({**spec, "layout": lay}) for lay in ("padded", "packed"))
    assert pad["median_ms"] > 0 and pk["median_ms"] > 0 and len(pk["times_ms"]) == len(pk["warmup_ms"]) == 1
    assert pk["tokens"] < pad["tokens"]  # the packed row holds the real tokens only
