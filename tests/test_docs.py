"""The documentation builds with warnings as errors, and its generated pages are complete.

The option reference and the backend table are generated from the registries by
docs/_ext/chaussette_docs.py; these tests read the built HTML back, so a generator that
drops an option, a flag or a backend fails here. The README's backend table and its
CI test command are checked against the same sources.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chaussette.backends.registry import BACKENDS
from chaussette.settings import OPTIONS
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(out / "doctrees"),
            str(ROOT / "docs"),
            str(out / "html"),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout}\n{result.stderr}"
    return out / "html"


class _Blocks(HTMLParser):
    """Collects the text of <dt>/<dd> pairs inside <dl class="... option ..."> (Sphinx's
    rendering of ``.. option::``) and of every table row."""

    def __init__(self) -> None:
        super().__init__()
        self.options: list[tuple[str, str]] = []
        self.rows: list[list[str]] = []
        self._dl_depth = 0  # nesting depth of <dl>, and where the option lists start
        self._option_dls: list[int] = []
        self._field: str | None = None  # "dt" / "dd" of an option being read
        self._field_depth = 0
        self._text: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_headerlink = False  # the pilcrow Sphinx appends to each signature

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "a" and "headerlink" in classes:
            self._in_headerlink = True
        elif tag == "dl":
            self._dl_depth += 1
            if "option" in classes:
                self._option_dls.append(self._dl_depth)
        elif tag in ("dt", "dd") and self._option_dls and self._dl_depth == self._option_dls[-1]:
            if self._field is None:
                self._field, self._field_depth, self._text = tag, self._dl_depth, []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._in_headerlink = False
        elif tag in ("dt", "dd") and self._field == tag and self._dl_depth == self._field_depth:
            text = " ".join("".join(self._text).split())
            if tag == "dt":
                self.options.append((text, ""))
            else:
                self.options[-1] = (self.options[-1][0], text)
            self._field = None
        elif tag == "dl":
            if self._option_dls and self._option_dls[-1] == self._dl_depth:
                self._option_dls.pop()
            self._dl_depth -= 1
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_headerlink:
            return
        if self._field is not None:
            self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(page: Path) -> _Blocks:
    parser = _Blocks()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_docs_build_with_warnings_as_errors(built_docs: Path) -> None:
    for page in (
        "index",
        "usage",
        "options",
        "backends",
        "deployment/circus",
        "deployment/supervisor",
        "deployment/systemd",
        "deployment/nginx",
    ):
        assert (built_docs / f"{page}.html").is_file(), page


def test_option_reference_has_every_option(built_docs: Path) -> None:
    entries = parse(built_docs / "options.html").options
    assert len(entries) == len(OPTIONS), [dt for dt, _ in entries]
    for opt, (signature, body) in zip(OPTIONS, entries, strict=True):
        # registry order, each entry with its own flags (or positional name) ...
        names = opt.flags or (opt.metavar or opt.name.upper(),)
        for name in names:
            assert re.search(rf"(^|[\s,]){re.escape(name)}($|[\s,])", signature), (
                opt.name,
                signature,
            )
        if opt.metavar and not opt.switch:
            assert opt.metavar in signature, (opt.name, signature)
        # ... and its own environment variable, ini key and help text.
        if opt.env:
            assert f"Environment: {opt.env}" in body, (opt.name, body)
        else:
            assert "Environment:" not in body, (opt.name, body)
        if not opt.cli_only:
            assert f"Ini key: {opt.name}" in body, (opt.name, body)
        assert " ".join(opt.help.split()) in body, (opt.name, body)
        for value in opt.choices or ():
            assert value in body, (opt.name, value)


def test_option_reference_groups_by_section(built_docs: Path) -> None:
    text = html.unescape((built_docs / "options.html").read_text(encoding="utf-8"))
    headings = re.findall(r"<h2>(.*?)<a class=\"headerlink\"", text)
    assert headings == list(dict.fromkeys(opt.section for opt in OPTIONS))


def test_backend_page_lists_every_backend(built_docs: Path) -> None:
    rows = parse(built_docs / "backends.html").rows
    assert rows[0][:2] == ["protocol", "backend"]
    listed = [(row[0], row[1]) for row in rows[1:]]
    assert listed == [(b.protocol, b.name) for b in BACKENDS]


def test_readme_backend_table_matches_registry() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Backends\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    pairs = [(cells[0].strip(), cells[1].strip()) for cells in rows[2:]]  # after header, ---
    assert pairs == [(b.protocol, b.name) for b in BACKENDS]


def test_ci_runs_the_readme_test_command() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-test-command"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip()
    assert "\n" not in command and "pytest" in command and ".[test]" in command, command
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"```sh\n{command}\n```" in readme
