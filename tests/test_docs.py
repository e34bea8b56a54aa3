"""README.md and docs/*.md stay true: every ```python block runs as written (in a fresh interpreter, on
CPU), unless the line directly above its fence is ``<!-- snippet: no-run (the reason) -->``; every measured
figure in the README is rendered from the committed result files (one machine, the recorded commands),
and none stands outside the generated blocks; the main job's default shapes are the README's."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = re.compile(r"^<!-- snippet: no-run \((?P<reason>.*\S.*)\) -->$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, no-run reason or None)`` of each fenced block whose info string is exactly ``python``."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"{path.name}:{start + 1}: unclosed ```python block")
            prev = lines[start - 1].strip() if start else ""
            if prev.startswith("<!-- snippet:") and not NO_RUN.match(prev):
                raise AssertionError(f"{path.name}:{start}: malformed marker {prev!r}; expected "
                                     "'<!-- snippet: no-run (the reason) -->'")
            m = NO_RUN.match(prev)
            blocks.append((start + 1, "\n".join(lines[start + 1 : j]) + "\n", m.group("reason") if m else None))
            i = j
        i += 1
    return blocks


SNIPPETS = [(p, line, code, reason) for p in DOCS for line, code, reason in python_blocks(p)]


def test_the_snippet_collector_sees_the_readme_blocks():
    readme = [s for s in SNIPPETS if s[0].name == "README.md"]
    assert len(readme) >= 3 and all(reason is None for *_, reason in readme)  # the README's blocks all run


@pytest.mark.parametrize("path, line, code, reason", SNIPPETS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in SNIPPETS])
def test_snippet_runs_as_written(path, line, code, reason, tmp_path):
    compile(code, f"{path.name}:{line}", "exec")  # even a block that cannot run here must be valid Python
    if reason is not None:
        pytest.skip(f"no-run: {reason}")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FASTDPO_BACKEND", None)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", p.stderr)
    if p.returncode != 0 and missing and not missing.group(1).startswith("fastdpo"):
        pytest.skip(f"{missing.group(1)} is not installed")
    assert p.returncode == 0, f"{path.name}:{line} failed:\n{code}\n{p.stderr[-3000:]}"


# ----------------------------------------------------------------------------------------- figures

figures = runpy.run_path(str(ROOT / "bench" / "readme_figures.py"))


@pytest.mark.parametrize("path", list(figures["BLOCKS"]), ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_figures_match_the_committed_results(path):
    text = path.read_text()
    rendered = figures["render"](text, figures["BLOCKS"][path])  # raises if the files disagree on the machine
    assert rendered == text, f"{path.relative_to(ROOT)} is out of date: run python bench/readme_figures.py"


@pytest.fixture
def fake_results(tmp_path, monkeypatch):
    """The renderer pointed at a checkout in ``tmp_path``; returns ``write(set, suite, data)``."""
    g = figures["render"].__globals__  # the functions' own globals (run_path hands back a copy)
    for name, value in (("ROOT", tmp_path), ("RESULTS", tmp_path / "bench" / "results"),
                        ("PACKING_DOC", tmp_path / "docs" / "packing.md"),
                        ("DIAGNOSTICS_DOC", tmp_path / "docs" / "diagnostics.md")):
        monkeypatch.setitem(g, name, value)

    def write(set_name, suite, data, device="cpu-test-2c"):
        folder = tmp_path / "bench" / "results" / set_name / device
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{suite}.json").write_text(json.dumps(data))

    return write


FAKE_META = {"device": "cpu-test-2c", "machine": "Test CPU, 2 logical CPUs", "torch": "2.0", "threads": 2,
             "fastdpo": "0.1.0", "revision": "abc123", "date": "2026-01-01 00:00:00"}


def _timed(times, **extra):
    return {"median_ms": sorted(times)[len(times) // 2], "min_ms": min(times), "max_ms": max(times),
            "times_ms": times, **extra}


def test_packed_blocks_render_from_the_packed_file(fake_results):
    loss = dict(suite="loss", method="logits", pairs=4, seed=0, vocab=300, hidden=16, dtype="fp32")
    e2e = dict(suite="e2e", pairs=4, seed=0, vocab=300, hidden=32, layers=1, dtype="fp32")
    rows = [{"case": "loss logits", "layout": "padded", "spec": loss,
             **_timed([3000.0, 4000.0, 5000.0], tokens=1000, real_tokens=600, extra_mb=200.0)},
            {"case": "loss logits", "layout": "packed", "spec": loss,
             **_timed([1000.0, 2000.0, 2000.0], tokens=600, real_tokens=600, extra_mb=100.0)},
            {"case": "e2e", "layout": "padded", "spec": e2e, **_timed([1.0], tokens=9, real_tokens=5, extra_mb=1.0)},
            {"case": "e2e", "layout": "packed", "spec": e2e, "error": "worker exited with 1"}]
    command = "python -m fastdpo.bench.packed --pairs 4 --out bench/results/packed"
    fake_results("packed", "packed", {"meta": {**FAKE_META, "command": command}, "results": rows})
    readme, doc = figures["block_packed"](), figures["block_packed_details"]()
    for text in (readme, doc):
        assert "4 pairs per batch from seed 0 (the first batch is 40% padding), V = 300, fp32" in text
        assert "Test CPU, 2 logical CPUs (`cpu-test-2c`" in text and command in text
        assert "e2e" not in text and "Llama" not in text  # a case missing a layout is left out, not invented
    # the speed-up is the median of the per-step ratios (3, 2, 2.5), as the benchmark prints it
    assert "| LM head + `dpo_loss` | 1000 → 600 | 2.50× | 200 → 100 MB |" in readme
    assert "| LM head + `dpo_loss` | 1000 | 600 | 4.0 s | 2.0 s | 2.50× | 200 → 100 MB (0.50) |" in doc
    assert "](../bench/results/packed/cpu-test-2c/)" in doc  # linked from docs/


def test_diagnostics_blocks_render_the_overhead_from_their_file(fake_results):
    case = {"N": 2048, "H": 512, "V": 32000, "T": 256, "dtype": "fp32", "backend": "cpu"}
    command = "python -m fastdpo.bench.overhead --out x"
    times = {"plain": [100.0, 200.0, 90.0], "diagnostics": [103.0, 190.0, 120.0]}
    ratios = [d / p for p, d in zip(times["plain"], times["diagnostics"])]  # 1.03, 0.95, 1.333: median 1.03
    data = {"meta": {**FAKE_META, "command": command}, "case": case, "times_ms": times, "ratios": ratios,
            "median_ms": {"plain": 100.0, "diagnostics": 120.0}, "overhead": sorted(ratios)[1] - 1}
    fake_results("diagnostics-overhead", "overhead", data)
    main = {"meta": {**FAKE_META, "command": "python -m fastdpo.bench"}, "results": []}
    fake_results("main", "linear", main)
    readme, doc = figures["block_diagnostics"](), figures["block_diagnostics_cost"]()
    # the median of the per-pair ratios (3.0%), not the ratio of the medians (20%)
    assert readme.startswith("turning them on costs 3.0% of the fused-linear fp32 DPO step (B = 4 pairs of T = 256, "
                             "H = 512, V = 32000: 100 ms → 120 ms, medians of 3 interleaved pairs, on Test CPU, 2 "
                             "logical CPUs;")
    assert command in doc and "Diagnostics add 3.0% to the step" in doc and "from -5.0% to 33.3%" in doc
    assert "| `diagnostics=True` | 120 ms | 103-190 ms |" in doc
    fake_results("main", "linear", {**main, "meta": {**FAKE_META, "machine": "Other CPU", "command": "c"}})
    with pytest.raises(figures["FiguresError"], match="one machine"):
        figures["block_diagnostics"]()  # the README quotes one machine's figures


MEASURED = re.compile(r"\d[\d,.]*\s?(ms|MB|s|min|minutes|seconds|[×x])(?![\w^])")


def test_no_measured_figure_outside_the_generated_blocks():
    text = figures["_MARK"].sub("", (ROOT / "README.md").read_text())
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands and code
    hits = [m.group(0) for m in MEASURED.finditer(text)]
    assert not hits, f"figures in README.md that no result file backs: {hits}"


def test_default_benchmark_shapes_are_the_readme_shapes():
    from fastdpo.bench import __main__ as bench

    main = ROOT / "bench" / "results" / "main"
    for suite, defaults in (("logprobs", bench.CPU_QUICK), ("linear", bench.CPU_LINEAR), ("kl", bench.CPU_KL)):
        [path] = list(main.glob(f"*/{suite}.json"))
        data = json.loads(path.read_text())
        args = shlex.split(data["meta"]["command"])
        assert args[:3] == ["python", "-m", "fastdpo.bench"]
        flags = {a for a in args[3:] if a.startswith("--")}
        assert flags <= {"--out", "--reps", "--warmup"}, data["meta"]["command"]  # the default shapes, nothing else
        shapes = {(r["case"]["N"], r["case"]["H"], r["case"]["V"]) if suite == "linear" else
                  (r["case"]["N"], r["case"]["V"]) for r in data["results"]}
        assert shapes == set(defaults), (suite, shapes)


def test_readme_installs_from_a_checkout_with_two_commands_at_the_top():
    text = (ROOT / "README.md").read_text()
    top = text[: text.index("\n## ")]
    assert re.findall(r"```bash\n(.*?)\n```", top, re.S) == [
        'pip install -e ".[dev]" && python -m fastdpo.bench', 'pip install -e ".[dev]" && python -m pytest -q']
    assert not re.search(r"pip install +['\"]?fastdpo", text)  # not on a package index (yet)
    install = text[text.index("## Install"):]
    install = install[: install.index("\n## ", 1)]
    assert "git clone" in install and 'pip install -e ".[trl]"' in install
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in install


def test_committed_results_show_the_torch_fallback_no_slower_than_naive():
    for suite, naive in (("logprobs", "naive"), ("kl", "naive-kl")):
        [path] = list((ROOT / "bench" / "results" / "main").glob(f"*/{suite}.json"))
        rows = json.loads(path.read_text())["results"]
        for dtype in ("fp32", "bf16"):
            by = {r["provider"]: r for r in rows if r["case"]["dtype"] == dtype and "error" not in r}
            ref = by["fastdpo-torch" if suite == "logprobs" else "fastdpo-torch-kl"]
            assert ref["kind"] == "reference"
            assert ref["median_ms"] <= by[naive]["median_ms"], (suite, dtype, ref["median_ms"], by[naive]["median_ms"])


def test_quick_benchmark_set_by_default_full_set_behind_a_flag():
    def collected(*flags):
        p = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "--collect-only", "-q",
                            *flags], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert p.returncode == 0, p.stdout + p.stderr
        return [line for line in p.stdout.splitlines() if "::" in line]

    quick, full = collected(), collected("--bench-full")
    assert set(quick) < set(full) and 4 * len(quick) < len(full)
    assert all("fwd+bwd-fp32" in t for t in quick)
    assert any("bf16" in t for t in full) and any("-bwd-" in t for t in full)
    # the README's counts of both sets
    assert f"({len(full)} cases against the quick set's {len(quick)}," in (ROOT / "README.md").read_text()


def test_remeasure_runs_the_tests_before_any_step_that_changes_what_they_check():
    # The tests compare the README with the committed results and timings; every other step rewrites some of
    # them (the build steps their timings), so the tests must come first.
    remeasure = runpy.run_path(str(ROOT / "bench" / "remeasure.py"))
    order = list(remeasure["steps"]())
    assert order[0] == "tests", order
    assert set(remeasure["REPLACES"]) <= set(order)
