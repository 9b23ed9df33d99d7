"""The one-way imports of design.md ("Dependencies run one way"), read from every module's source.

Every import counts: module-level or inside a function, absolute or relative. Dynamic imports
(`importlib.import_module`, as setseq/cli.py registers the commands) are not read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "lora", "weights", "train", "sample", "toyworld", "setseq", "benchmarks")
# Which of our packages each one may import, itself included.
MAY_IMPORT = {
    "model": {"model"},  # a network knows nothing of adapters, training, sampling or checkpoints
    "lora": {"model", "lora"},
    "weights": {"model", "weights"},
    "train": {"model", "lora", "train"},  # takes built modules; a sampler is passed in
    "sample": {"model", "lora", "sample"},
    "toyworld": {"model", "lora", "weights", "train", "sample", "toyworld"},
    "setseq": set(PACKAGES) - {"benchmarks"},
    "benchmarks": set(PACKAGES) - {"setseq"},  # benchmarks import libraries, never the command line
}

class Violation(NamedTuple):
    path: str  # relative to the repository, e.g. "sample/clip.py"
    line: int
    module: str  # the imported module, relative imports resolved
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.path.split('/')[0]} -> {self.module} ({self.rule})"


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_of(path: str) -> str:
    """The dotted package a module file lives in: "weights/load.py" -> "weights"."""
    return ".".join(Path(path).parent.parts)


def from_base(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` reads from, relative levels resolved against `package`."""
    if node.level == 0:
        return node.module
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(source: str, path: str) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the source, at any depth; `from p import m` names p.m when m
    is a module of ours."""
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, package_of(path))
            names = (f"{base}.{alias.name}" for alias in node.names)
            yield from ((node.lineno, m) for m in sorted({m if is_module(m) else base for m in names}))


def is_command(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[0] == "setseq" and parts[1].startswith("cmd_")


def broken_rule(path: str, module: str) -> str | None:
    """Why the file at `path` may not import `module`, or None when it may."""
    src, dst = path.split("/")[0], module.split(".")[0]
    if dst not in PACKAGES:
        return None
    if dst not in MAY_IMPORT[src]:
        return f"{src}/ never imports {dst}/"
    importer = path.removesuffix(".py").replace("/", ".")
    if is_command(importer) and is_command(module) and module.split(".")[1] != importer.split(".")[1]:
        return "a command imports no other command; shared code belongs in a library"
    return None


def violations(source: str, path: str) -> Iterator[Violation]:
    for line, module in imported_modules(source, path):
        if rule := broken_rule(path, module):
            yield Violation(path, line, module, rule)


@cache
def found() -> tuple[Violation, ...]:
    files = sorted(f for package in PACKAGES for f in (ROOT / package).rglob("*.py"))
    return tuple(v for f in files for v in violations(f.read_text(), f.relative_to(ROOT).as_posix()))


def test_imports_follow_the_design():
    bad = [str(v) for v in found()]
    assert not bad, "imports against design.md's dependency arrows:\n" + "\n".join(bad)


@pytest.mark.parametrize(("path", "source", "module"), [
    ("sample/fake.py", "from weights.io import read_state_dict\n", "weights.io"),
    ("sample/fake.py", "def f():\n    from ..weights import load\n", "weights.load"),  # in a function
    ("model/fake.py", "import lora.layers as L\n", "lora.layers"),
    ("train/fake.py", "from sample.generate import generate\n", "sample.generate"),
    ("sample/fake.py", "import toyworld.world\n", "toyworld.world"),
    ("toyworld/fake.py", "from setseq import cli\n", "setseq.cli"),
    ("benchmarks/fake.py", "from setseq.cli import main\n", "setseq.cli"),
    ("setseq/cmd_fake.py", "from setseq.cmd_other import parse_size\n", "setseq.cmd_other"),
])
def test_the_checker_catches_a_violation(path, source, module):
    assert [(v.line, v.module) for v in violations(source, path)] == [(source.count("\n"), module)]


@pytest.mark.parametrize(("path", "source"), [
    ("weights/fake.py", "from .io import preview\nfrom model.clip import ClipModel\n"),
    ("setseq/cli.py", "from setseq import cmd_fake\n"),
    ("setseq/cmd_fake.py", "from sample.generate import generate\nimport numpy\n"),
    ("toyworld/fake.py", "from train import data\nfrom weights.clip import load_clip\n"),
])
def test_the_checker_passes_allowed_imports(path, source):
    assert list(violations(source, path)) == []
