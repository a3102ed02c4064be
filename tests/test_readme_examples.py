"""Every fenced block of README.md is checked: command lines of our entry points are parsed by
their real argument parsers (a flag that does not exist fails), `make` targets must exist, the
TOML config goes through `deployment/config.py`, JSON must parse. A block that cannot be checked
here carries `<!-- readme-test: REASON -->` right before it; its lines of our entry points are
still parsed. Any other block fails."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from deployment import cli as deployment_cli
from deployment import config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"^<!-- readme-test: (?P<reason>\S.*\S) -->$")
MAKE_TARGETS = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    text: str
    reason: str | None


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines, i = text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, lang = i, lines[i][3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            mark = MARK.match(lines[start - 1]) if start else None
            body = "\n".join(lines[start + 1 : end])
            found.append(Block(start + 1, lang, body, mark["reason"] if mark else None))
            i = end
        i += 1
    return found


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from agent.__main__ import _parser as agent_parser  # noqa: PLC0415
    from module.__main__ import _parser as module_parser  # noqa: PLC0415
    from simulator.__main__ import _parser as simulator_parser  # noqa: PLC0415

    edgeml = deployment_cli._parser()
    return {
        "deployment": edgeml,
        "edgeml": edgeml,
        "agent": agent_parser(),
        "module": module_parser(),
        "simulator": simulator_parser(),
    }


# A shell default (`${PORT:-8080}`) stands for its value; a command ends at a shell operator
# (`|` stays: synopsis lines use it for alternatives).
_DEFAULT = re.compile(r"\$\{\w+:-([^}]*)\}")
_ENDS = frozenset({"&", "&&", ";", "||"})


def commands(text: str) -> list[list[str]]:
    """The shell lines of a block, continuations joined, comments dropped."""
    joined = _DEFAULT.sub(r"\1", re.sub(r"\\\n", " ", text))
    lines = (shlex.split(line, comments=True) for line in joined.splitlines())
    cut = ([*itertools.takewhile(lambda word: word not in _ENDS, argv)] for argv in lines)
    return [argv for argv in cut if argv]


def synopsis(argv: list[str]) -> list[list[str]]:
    """`a [--x X] | b` synopsis lines as the command lines they stand for: optional parts
    included, alternatives after the first keep the first one's leading words."""
    words = [w.replace("[", "").replace("]", "") for w in argv]
    words = [w for w in words if w]
    if "|" not in words:
        return [words]
    groups: list[list[str]] = []
    current: list[str] = []
    for w in words:
        if w == "|":
            groups.append(current)
            current = []
        else:
            current.append(w)
    groups.append(current)
    prefix = groups[0][:-1] if len(groups[0]) > 1 else []
    return [groups[0], *[prefix + g if prefix and g[0] != prefix[0] else g for g in groups[1:]]]


def entry_point(argv: list[str]) -> tuple[str, list[str]] | None:
    """(program, its arguments) for our entry points; None for any other command."""
    if argv and argv[0] == "edgeml":
        return "edgeml", argv[1:]
    if len(argv) >= 3 and argv[0].endswith("python") and argv[1] == "-m":
        return argv[2], argv[3:]
    return None


def check_line(argv: list[str], parsers: dict[str, argparse.ArgumentParser]) -> str | None:
    """Why the line is wrong; None when it parses. Raises LookupError for a line not ours."""
    if re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", argv[0]) and len(argv) == 1:
        # EDGEML_X is the agent's settings field `x` (pydantic-settings, prefix EDGEML_).
        name = argv[0].split("=")[0]
        field = re.compile(rf"^\s+{name.removeprefix('EDGEML_').lower()}\s*:", re.M)
        sources = (p.read_text() for p in (ROOT / "agent").rglob("*.py"))
        known = name.startswith("EDGEML_") and any(field.search(s) for s in sources)
        return None if known else f"unknown variable {name}"
    if argv[0] == "make":
        missing = [t for t in argv[1:] if "=" not in t and t not in MAKE_TARGETS]
        return f"no make target {missing}" if missing else None
    found = entry_point(argv)
    if found is None or found[0] not in parsers:
        raise LookupError(" ".join(argv))
    program, args = found
    for alternative in synopsis(args):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parsers[program].parse_args(alternative)
        except SystemExit as e:
            if e.code:
                return f"{program} {' '.join(alternative)}: {err.getvalue().strip()}"
    return None


def check_block(block: Block, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    problems = []
    if block.lang == "toml":
        return _check_toml(block.text)
    if block.lang == "json":
        try:
            json.loads(block.text)
        except json.JSONDecodeError as e:
            if block.reason is None:
                problems.append(f"not JSON ({e}) and not marked")
        return problems
    if block.lang == "sh":
        for argv in commands(block.text):
            if argv[0] == "export":
                continue
            try:
                problem = check_line(argv, parsers)
            except LookupError as e:
                if block.reason is None:
                    problems.append(f"cannot check {e} and the block is not marked")
                continue
            if problem:
                problems.append(problem)
        return problems
    return [] if block.reason else [f"a {block.lang or 'plain'} block that is not marked"]


def _check_toml(text: str) -> list[str]:
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edgeml.toml"
        path.write_text(text)
        try:
            config.load(path, None, {})
        except Exception as e:
            return [f"config: {e}"]
    return []


README_BLOCKS = blocks(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("block", README_BLOCKS, ids=lambda b: f"line{b.line}-{b.lang or 'plain'}")
def test_every_readme_block_is_checked_or_marked(block: Block) -> None:
    assert check_block(block, _parsers()) == []


@pytest.mark.parametrize(
    ("text", "lang", "reason", "fails"),
    [
        ("edgeml list --no-such-flag", "sh", None, True),
        ("edgeml list | show NAME:1 | history NAME", "sh", None, False),
        ("edgeml audit verify | show [NAME:VERSION]", "sh", None, False),
        ("python -m agent serve --model m.onnx [--port 1]", "sh", None, True),
        ("az iot hub create --name H", "sh", None, True),
        (
            "az iot hub create --name H\npython -m deployment list --bogus",
            "sh",
            "needs Azure",
            True,
        ),
        ("az iot hub create --name H\npython -m deployment list", "sh", "needs Azure", False),
        ("make no-such-target", "sh", None, True),
        ("make demo", "sh", None, False),
        ("EDGEML_NO_SUCH_SETTING=1", "sh", None, True),
        ("[environments.x]\nbogus = 1", "toml", None, True),
        ("{not json", "json", None, True),
        ("a diagram", "", None, True),
        ("a diagram", "", "a diagram", False),
    ],
)
def test_the_checker_fails_what_it_should(
    text: str, lang: str, reason: str | None, fails: bool
) -> None:
    assert bool(check_block(Block(1, lang, text, reason), _parsers())) is fails
