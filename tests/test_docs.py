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
