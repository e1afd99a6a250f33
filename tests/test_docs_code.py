"""The Python code blocks of the README and docs/*.md run as written (from the repository
root, on the CPU), so the docs stay true. A block that cannot run here says so in its fence's
info string: ```` ```python no-run ```` (it trains, or needs files of its own; the docs say
which test runs it instead); ```` ```python slow ```` runs under ``pytest.mark.slow``.

docs/export.md and docs/benchmarks.md belong to the export and benchmark work; their blocks
are not collected here (their predictor and program blocks need exported files)."""

import re
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_COLLECTED = {"docs/export.md", "docs/benchmarks.md"}
FENCE = re.compile(r"^```(\S*)(.*)$")


def code_blocks(text: str) -> List[Tuple[int, str, List[str], str]]:
    """``(first line, language, info words, code)`` of every fenced block of ``text``."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            start, j = i + 1, i + 1
            while j < len(lines) and lines[j] != "```":
                j += 1
            blocks.append((start, m.group(1), m.group(2).split(), "\n".join(lines[start:j])))
            i = j
        i += 1
    return blocks


def _doc_files() -> List[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    return [f for f in files if f.relative_to(ROOT).as_posix() not in NOT_COLLECTED]


def _python_blocks():
    params = []
    for path in _doc_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, lang, words, code in code_blocks(path.read_text()):
            if lang != "python" or "no-run" in words:
                continue
            marks = [pytest.mark.slow] if "slow" in words else []
            params.append(pytest.param(rel, line, code, id=f"{rel}:{line}", marks=marks))
    return params


def test_code_blocks_parser():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python no-run\ny\n```\n```\nplain\n```"
    assert code_blocks(text) == [
        (2, "python", [], "x = 1"),
        (5, "bash", [], "ls"),
        (8, "python", ["no-run"], "y"),
    ]


def test_every_doc_says_whether_its_blocks_run():
    """Each Python block either runs here or is marked ``no-run``; the marks are known words."""
    for path in _doc_files():
        for line, lang, words, _ in code_blocks(path.read_text()):
            assert set(words) <= {"no-run", "slow"}, f"{path.name}:{line}: fence info {words}"
    assert len(_python_blocks()) >= 2  # the README's kernels and LazyConfig blocks


@pytest.mark.parametrize("doc, line, code", _python_blocks())
def test_doc_code_block_runs(doc, line, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": "__doc_block__"})
