"""``python -m fastdpo.diagnose``: run as a subprocess on a small saved log (tests/data/diagnose/trainer_state.json,
20 steps of the log of examples/train_dpo_diagnostics.py), on JSONL, on logs without diagnostics, and on
bad inputs; plus the log discovery and parsing it is built on."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo import diagnose

FIXTURE = Path(__file__).parent / "data" / "diagnose"
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "fastdpo.diagnose", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_trainer_output_dir_gives_one_png_and_prints_its_path(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    p = _cli(run)
    assert p.returncode == 0, p.stderr
    png = run / "diagnostics.png"
    assert p.stdout.strip() == str(png)
    w, h = _png_size(png)
    assert w > 1000 and h > 800
    assert "note" not in p.stderr  # the fixture has every metric


def test_jsonl_without_steps_and_out_option(tmp_path):
    records = json.loads((FIXTURE / "trainer_state.json").read_text())["log_history"]
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "step"}) for r in records if "loss" in r))
    out = tmp_path / "plots" / "dyn.png"
    p = _cli(log, "--out", out)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(out)
    _png_size(out)


def test_a_log_without_diagnostics_still_draws_and_says_what_is_missing(tmp_path):
    records = json.loads((FIXTURE / "trainer_state.json").read_text())["log_history"]
    trl_only = [{k: v for k, v in r.items() if not k.startswith(("diagnostics/", "eval_diagnostics/"))} for r in records]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": trl_only}))
    p = _cli(tmp_path)
    assert p.returncode == 0, p.stderr
    assert "fastdpo_diagnostics=True" in p.stderr
    _png_size(tmp_path / "diagnostics.png")


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d, "no trainer_state.json"),
    (lambda d: (d / "bad.jsonl").write_text('{"loss": 1}\nnot json\n') and d / "bad.jsonl", "bad.jsonl:2"),
    (lambda d: (d / "x.json").write_text('{"log_history": [1, 2]}') and d / "x.json", "expected metric dicts"),
    (lambda d: (d / "empty.jsonl").write_text("\n") and d / "empty.jsonl", "holds no metrics"),
])
def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys, make, message):
    rc = diagnose.main([str(make(tmp_path))])  # in process: the subprocess path is covered above
    err = capsys.readouterr()
    assert rc == 2 and message in err.err, (rc, err.err)
    assert not err.out


def test_find_log_prefers_the_run_then_the_newest_checkpoint(tmp_path):
    for step in (5, 40, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-7-tmp").mkdir()
    assert diagnose.find_log(tmp_path) == tmp_path / "checkpoint-100" / "trainer_state.json"
    (tmp_path / "trainer_state.json").write_text("{}")
    assert diagnose.find_log(tmp_path) == tmp_path / "trainer_state.json"


def test_records_and_series(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"a": 1.0}\n\n{"a": Infinity, "b": true}\n{"step": 10, "a": 3}\n')
    records = diagnose.load_records(log)
    assert [r["step"] for r in records] == [1, 2, 10]
    xs, ys = diagnose.series(records, "a", scale=2.0)
    assert xs == [1, 2, 10] and ys[0] == 2.0 and math.isnan(ys[1]) and ys[2] == 6.0
    assert diagnose.series(records, "b") == ([], [])  # booleans are not metrics
