"""The docs a user navigates: the generated reference is current and complete, every command the README and the
docs show parses, every link lands, and the README stays short with the two commands first."""

from __future__ import annotations

import re
import shlex

import click
import pytest

from featcache.cli import main as cli
from featcache.cli import reference
from tests.support import ROOT

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console")
README_LIMIT = 12 * 1024


def _commands(group: click.Group = cli, prefix: str = "featcache"):
    """(name, command) for every command under `group`, groups included."""
    ctx = click.Context(group, info_name=prefix)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}")


def _options(command: click.Command) -> dict[str, bool]:
    """{option string: whether it is a switch (takes no value)} of `command`, --help included."""
    found = {"--help": True, "-h": True}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in param.opts + param.secondary_opts:
                found[opt] = param.is_flag or param.count
    return found


def check_featcache_args(args: list[str]) -> str | None:
    """Why `featcache ARGS` would not parse (an unknown command or option, an option missing its value), or None.
    Values are not checked: the docs write placeholders (ROOT, <the cache>) where a user puts a path."""
    command: click.Command = cli
    args = list(args)
    while args:
        token = args.pop(0)
        if token in ("--", "-"):
            return None
        if token.startswith("-") and not re.fullmatch(r"-\d.*", token):
            name, eq, _ = token.partition("=")
            options = _options(command)
            if name not in options:
                return f"{token!r} is not an option of {command.name}"
            if not options[name] and not eq:
                if not args:
                    return f"{token!r} needs a value"
                args.pop(0)
        elif isinstance(command, click.Group):
            sub = command.get_command(click.Context(command), token)
            if sub is None:
                return f"{token!r} is not a featcache command"
            command = sub
    return None


def _shell_lines(text: str):
    """The simple commands of a shell snippet: continuations joined, comments dropped, split at ; && || |."""
    text = re.sub(r"\\\n\s*", " ", text)
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.commenters = "#"
        lexer.whitespace_split = True
        words: list[str] = []
        for token in list(lexer) + [";"]:
            if token and set(token) <= set(";&|"):
                if words:
                    yield line, words
                words = []
            else:
                words.append(token)


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def _problem(words: list[str]) -> str | None:
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):   # VAR=value before the command
        words = words[1:]
    if not words:
        return None
    program, args = words[0], words[1:]
    if program.endswith("featcache"):
        return check_featcache_args(args)
    if program == "make":
        unknown = [a for a in args if not a.startswith("-") and "=" not in a and a not in _make_targets()]
        return f"make has no target {unknown[0]!r}" if unknown else None
    return None


def _blocks(lang: tuple[str, ...]):
    for page in PAGES:
        for m in FENCE.finditer(page.read_text(encoding="utf-8")):
            if m.group(1) in lang:
                yield page, m.group(2)


def test_generated_reference_pages_are_current():
    for name, make in reference.PAGES.items():
        page = ROOT / "docs" / "reference" / name
        assert page.read_text(encoding="utf-8") == make(), f"{page} is out of date: run `make docs`"


def test_every_command_and_option_is_in_the_cli_reference():
    text = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `(featcache[^`]*)`\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    for name, command in _commands():
        assert name in sections, f"{name} is missing from docs/reference/cli.md"
        for opt in _options(command):
            if opt not in ("--help", "-h"):
                assert f"`{opt}`" in sections[name], f"{name} {opt} is missing from docs/reference/cli.md"


def test_the_checker_refuses_what_click_refuses():
    """The parse check can fail: an unknown command, an unknown option, a missing value."""
    assert check_featcache_args(["train-head", "--cache", "x.h5", "--units", "400,256"]) is None
    assert check_featcache_args(["-q", "curve", "--sizes=5,all"]) is None
    assert "not a featcache command" in check_featcache_args(["train-heads"])
    assert "not an option" in check_featcache_args(["extract", "--limt", "5"])
    assert "needs a value" in check_featcache_args(["extract", "--data"])
    assert "no target" in _problem(["make", "nonsense"])


def test_every_shell_command_in_the_docs_parses():
    problems = [f"{page.relative_to(ROOT)}: {line!r}: {why}"
                for page, block in _blocks(SHELL) for line, words in _shell_lines(block)
                if (why := _problem(words))]
    assert not problems, "\n".join(problems)


def test_every_inline_featcache_command_in_the_docs_parses():
    """`featcache ...` in running text: a command and options that exist (`...` and [optional] parts left out)."""
    problems = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for span in re.findall(r"`(featcache [^`]+)`", text.replace("\n", " ")):
            if "[" in span or "..." in span or "|" in span.split("--")[0]:
                continue
            words = shlex.split(span.replace("<", "'<").replace(">", ">'"))
            why = check_featcache_args(words[1:])
            if why:
                problems.append(f"{page.relative_to(ROOT)}: `{span}`: {why}")
    assert not problems, "\n".join(problems)


def test_every_python_block_in_the_docs_compiles():
    """Python examples compile (the generated API page's blocks are signatures, not code)."""
    for page, block in _blocks(("python",)):
        if page.name != "api.md":
            compile(block, str(page), "exec")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_lands():
    problems = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target} does not exist")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", FENCE.sub("", dest.read_text(encoding="utf-8")), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    problems.append(f"{page.relative_to(ROOT)}: {target}: no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= README_LIMIT, f"README.md is {len(text.encode())} bytes; keep it under 12 KB"
    first_block = next(m.group(2) for m in FENCE.finditer(text))
    assert "make heads" in first_block and "make test" in first_block


@pytest.mark.parametrize("folder, index", [("guides", "README.md"), ("reference", "README.md"),
                                           ("explanation", "README.md"), ("results", "results/README.md")])
def test_docs_indexes_link_every_page(folder, index):
    text = (ROOT / "docs" / index).read_text(encoding="utf-8")
    for md in sorted((ROOT / "docs" / folder).glob("*.md")):
        name = md.name if index.startswith(folder) else f"{folder}/{md.name}"
        if md.name != "README.md" or folder != "results":
            assert f"]({name}" in text, f"docs/{index} does not link {folder}/{md.name}"
