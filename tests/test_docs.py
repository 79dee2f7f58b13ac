"""The README and docs/ say what works: every `mosaic-toolkit` / `mosaic-backend` command in their
code blocks parses with the options it shows, every relative link (and #anchor) resolves, and
the pages speak to users (no development history, no paths of a development machine).

Commands are parsed by the commands' own click parsers (options, option values, subcommands,
the number of arguments; choices and numbers are converted), without running anything: file
arguments need not exist. A value written as a placeholder (KEY, $PROJECT) is not converted.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from mosaic_backend.cli import command as backend_command
from mosaic_toolkit.cli import main as toolkit_command

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"mosaic-toolkit": toolkit_command, "mosaic-backend": backend_command}
PLACEHOLDER = re.compile(r"^(\$\{?[A-Za-z_][A-Za-z0-9_]*\}?.*|[A-Z][A-Z0-9_]*|<[^>]+>)$")
FENCE = re.compile(r"^```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
README_MAX_LINES = 250
# What the pages must not say: development history and places outside a user's clone.
FORBIDDEN = [
    (re.compile(r"\bissues? #?\d+", re.I), "an issue number"),
    (re.compile(r"\bthis branch\b", re.I), "'this branch'"),
    (re.compile(r"\bbefore this work\b", re.I), "'before this work'"),
    (re.compile(r"(^|[\s(`])notes/"), "the notes/ folder"),
    (re.compile(r"\.\./shared|/work/"), "a path outside the repository"),
]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass
class Command:
    page: Path
    line: int
    text: str
    argv: list[str]

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {self.text}"


def code_lines(page: Path) -> list[tuple[int, str]]:
    """The logical lines of the page's fenced code blocks (continuation lines joined)."""
    out, inside, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line.strip()):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def split_commands(text: str) -> list[list[str]]:
    """Each `mosaic-toolkit ...` / `mosaic-backend ...` command of a shell line, as argv (the
    program's name first), up to the next shell operator; comments are dropped."""
    text = re.sub(r"^\s*\$\s+", "", text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    commands, current = [], None
    for token in tokens:
        if current is not None and token and set(token) <= set("|&;<>()"):
            if token.startswith(">") and len(current) > 1 and current[-1].isdigit():
                current.pop()  # the 2 of 2>&1
            commands.append(current)
            current = None
        elif current is not None and len(current) == 1 and token.rsplit("/", 1)[-1] in PROGRAMS:
            current = [token.rsplit("/", 1)[-1]]  # `docker run ... mosaic-backend mosaic-toolkit ...`
        elif current is not None:
            current.append(token)
        elif token.rsplit("/", 1)[-1] in PROGRAMS:
            current = [token.rsplit("/", 1)[-1]]
    if current is not None:
        commands.append(current)
    return commands


def commands() -> list[Command]:
    found = []
    for page in pages():
        for number, text in code_lines(page):
            if not any(p in text for p in PROGRAMS):
                continue
            for argv in split_commands(text):
                found.append(Command(page, number, text.strip(), argv))
    return found


def check_command(argv: list[str]) -> None:
    """Parse ``argv`` with the program's click parsers; raise click.UsageError (or
    click.BadParameter) when an option, a value, a subcommand or an argument is wrong."""
    command: click.Command = PROGRAMS[argv[0]]
    args = argv[1:]
    parent = None
    name = argv[0]
    while True:
        if "--help" in args or "-h" in args:
            return
        context = click.Context(command, info_name=name, parent=parent)
        parser = command.make_parser(context)
        values, rest, _ = parser.parse_args(args=list(args))
        if isinstance(command, click.Group):
            if not rest:
                if "--version" in values or values.get("version"):
                    return
                raise click.UsageError(f"{name}: no subcommand given")
            sub_name, sub, sub_args = command.resolve_command(context, rest)
            if sub is None:
                raise click.UsageError(f"{name}: no such command {rest[0]!r}")
            parent, command, name, args = context, sub, sub_name, sub_args
            continue
        if rest and not command.allow_extra_args:
            raise click.UsageError(f"{name}: unexpected extra argument(s) {rest}")
        for param in command.params:
            value = values.get(param.name)
            if value is None:
                if param.required and isinstance(param, click.Argument):
                    raise click.UsageError(f"{name}: missing argument {param.human_readable_name}")
                continue
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, str) and not PLACEHOLDER.match(item) and isinstance(
                        param.type, (click.Choice, click.types._NumberParamTypeBase,
                                     click.types.BoolParamType)):
                    param.type.convert(item, param, context)
        return


@pytest.mark.parametrize("command", commands(), ids=str)
def test_command_in_the_docs_parses(command: Command) -> None:
    try:
        check_command(command.argv)
    except click.ClickException as exc:
        pytest.fail(f"{command}\n  -> {exc.format_message()}", pytrace=False)


def test_the_docs_show_commands() -> None:
    """The collector finds the commands (a broken collector would pass every page)."""
    found = commands()
    programs = {c.argv[0] for c in found}
    assert programs == set(PROGRAMS), programs
    readme = [c for c in found if c.page.name == "README.md"]
    assert len(readme) >= 10, [str(c) for c in readme]


@pytest.mark.parametrize("argv, fragment", [
    ("mosaic-toolkit export --url http://localhost:8080 --no-such-option 1 --out d", "no-such-option"),
    ("mosaic-toolkit segment photos --out pred --engine magic", "magic"),
    ("mosaic-toolkit segment photos --out", "--out"),
    ("mosaic-toolkit weights fetchall sam2.1-large", "fetchall"),
    ("mosaic-toolkit weights", "no subcommand"),
    ("mosaic-toolkit tasks photos --out wall --max-tesserae many", "many"),
    ("mosaic-toolkit stats a b --out r --extra-flag", "extra-flag"),
    ("mosaic-backend --port 9090 --engine sam3", "sam3"),
    ("mosaic-backend --port 9090 stray", "stray"),
])
def test_the_checker_rejects_bad_commands(argv: str, fragment: str) -> None:
    [parsed] = split_commands(argv)
    with pytest.raises(click.ClickException) as caught:
        check_command(parsed)
    assert fragment in caught.value.format_message()


def test_the_checker_accepts_placeholders_and_shell_around_commands() -> None:
    line = ("LABEL_STUDIO_API_KEY=KEY .venv/bin/mosaic-toolkit export --url $LABEL_STUDIO_URL "
            "--project PROJECT --out dataset 2>&1 | tail -3  # a comment --bad")
    [argv] = split_commands(line)
    assert argv == ["mosaic-toolkit", "export", "--url", "$LABEL_STUDIO_URL", "--project", "PROJECT",
                    "--out", "dataset"]
    check_command(argv)
    assert split_commands("docker compose run --rm mosaic-backend mosaic-toolkit weights list") == [
        ["mosaic-toolkit", "weights", "list"]]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    out = set()
    inside = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
        if inside or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower().replace("`", "")
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def links(page: Path) -> list[tuple[int, str]]:
    found, inside = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line.strip()):
            inside = not inside
        if not inside:
            found += [(number, m.group(1)) for m in LINK.finditer(line)]
    return found


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"line {number}: {target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for _, target in links(page):
            path = target.partition("#")[0]
            if path and not re.match(r"^[a-z][a-z0-9+.-]*:", path) and path.endswith(".md"):
                todo.append((page.parent / path).resolve())
    unreachable = [str(p.relative_to(ROOT)) for p in pages() if p.resolve() not in seen]
    assert not unreachable, unreachable


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_to_users(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    found = [f"line {text[:m.start()].count(chr(10)) + 1}: {what} ({m.group(0).strip()!r})"
             for pattern, what in FORBIDDEN for m in pattern.finditer(text)]
    assert not found, f"{page.relative_to(ROOT)}: " + "; ".join(found)


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"
