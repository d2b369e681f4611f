"""Every ```python block of README.md runs as written, each in a fresh interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks(text):
    """[(line number of the opening fence, code)] of the ```python blocks in a Markdown text."""
    blocks, inside, code, start = [], None, [], 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = line.strip()
        if inside is None:
            if fence.startswith("```"):
                inside, code, start = fence[3:].strip() or "text", [], number
        elif fence == "```":
            if inside == "python":
                blocks.append((start, "\n".join(code) + "\n"))
            inside = None
        else:
            code.append(line)
    if inside is not None:
        raise ValueError(f"README.md line {start}: a ```{inside} block that is never closed")
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks():
    # Without this a README whose blocks were all dropped (or renamed ```py) would pass vacuously.
    assert BLOCKS, "README.md: no ```python block found"


def test_blocks_are_found_with_their_fence_line_and_other_languages_skipped():
    text = "intro\n```python\na = 1\n\nb = 2\n```\n```\n```python\n```\n```console\n$ make\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n\nb = 2\n")]
    with pytest.raises(ValueError, match="line 2"):
        python_blocks("x\n```python\na = 1\n")


@pytest.mark.parametrize("start, code", BLOCKS, ids=[f"README.md:{start}" for start, _ in BLOCKS])
def test_the_readme_block_runs(start, code, tmp_path):
    # PyTorch is an optional extra: a block that imports it (the weights recipe) needs it installed.
    if re.search(r"^import torch$", code, re.MULTILINE):
        pytest.importorskip("torch")
    # Padded so that a traceback's line numbers are README.md's; compiled under README.md's name.
    source = "\n" * start + code
    runner = ("import sys; src = sys.stdin.read(); "
              "exec(compile(src, sys.argv[1], 'exec'), {'__name__': '__main__'})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", runner, str(README)], input=source, cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"README.md: the python block at line {start} failed (exit {r.returncode}):\n"
                    f"{r.stderr[-4000:]}", pytrace=False)
