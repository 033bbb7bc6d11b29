"""Every `msdiff` command shown in README.md and docs/*.md parses with the real command line.

(README's commands also run, in test_readme.py; docs/training.md's in test_train_docs.py.)
"""

import re
import shlex
from pathlib import Path

import pytest

from msdiffusion.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
MODULES = {"msdiffusion": []}


def commands(page: str):
    for block in re.findall(r"```(?:bash|console)\n(.*?)```", (ROOT / page).read_text(), flags=re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            if re.match(r"^[A-Z_]+=\S+$", line):
                name, value = line.split("=", 1)
                variables[name] = value
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            words = shlex.split(line) if line else []
            if words[:1] == ["msdiff"]:
                yield line, words[1:]
            elif "-m" in words and words[0] in ("accelerate", "python"):
                module = words[words.index("-m") + 1]
                if module in MODULES:
                    yield line, MODULES[module] + words[words.index("-m") + 2 :]


CASES = [(page, line, args) for page in PAGES for line, args in commands(page)]


def test_pages_show_commands():
    assert {page for page, _, _ in CASES} >= {"README.md", "docs/benchmark.md", "docs/data.md", "docs/training.md"}


@pytest.mark.parametrize("page,line,args", CASES, ids=[f"{p}:{l[:60]}" for p, l, _ in CASES])
def test_command_parses(page, line, args):
    if args and args[-1] == "...":  # "the same arguments" placeholders
        pytest.skip("abbreviated command")
    parsed = build_parser().parse_args(args)
    assert getattr(parsed, "func", None) is not None, line
