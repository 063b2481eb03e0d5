"""Sphinx directives that render chaussette's registries, so the docs cannot drift.

``.. chaussette-options::``
    Every option of ``chaussette.settings.OPTIONS``, grouped by section, in registry order:
    the flags (as ``std:option`` entries of the ``chaussette`` program, so ``:option:`--fd```
    links resolve and dangling ones warn), the environment variable, the ini key, the
    default, the accepted values and the help text.
``.. chaussette-backends::``
    A table of ``chaussette.backends.registry.BACKENDS``: every (protocol, backend) pair,
    what it can do and how to install it.

Both directives generate reStructuredText and parse it in place. Text taken from the
registries is escaped, so a ``*`` or a backquote in a help string is shown as written.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

PROGRAM = "chaussette"
_SPECIAL = re.compile(r"([\\`*_|\[\]<>:])")


def escape(text: str) -> str:
    """Backslash-escape reST markup characters so that ``text`` renders literally."""
    return _SPECIAL.sub(r"\\\1", text)


def literal(text: str) -> str:
    """An inline literal that survives any content (the :literal: role escapes for us)."""
    return f":literal:`{escape(text)}`" if text else "(empty)"


def _default(opt: Any) -> str:
    value = opt.default
    if opt.switch:
        return "off"
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return literal(str(value))


def _signature(opt: Any) -> str:
    """What ``.. option::`` shows: each flag with its metavar, or the positional name."""
    if opt.positional:
        return opt.metavar or opt.name.upper()
    if opt.switch:
        return ", ".join(opt.flags)
    metavar = opt.metavar or opt.name.upper()
    return ", ".join(f"{flag} {metavar}" for flag in opt.flags)


def option_lines(opt: Any) -> list[str]:
    """The reST for one option."""
    lines = [f".. option:: {_signature(opt)}", ""]
    lines += [f"   {escape(opt.help)}", ""]
    fields = []
    if opt.env:
        fields.append(("environment", literal(opt.env)))
    if not opt.cli_only:
        fields.append(("ini key", literal(opt.name)))
    fields.append(("default", _default(opt)))
    if opt.choices:
        fields.append(("one of", ", ".join(literal(c) for c in opt.choices)))
    if opt.many:
        fields.append(("repeatable", "yes: the values add up"))
    if opt.cli_only:
        fields.append(("command line only", "yes: prints and exits, not a server setting"))
    lines += [f"   :{name}: {value}" for name, value in fields]
    lines.append("")
    return lines


def options_rst(options: Any) -> list[str]:
    lines = [f".. program:: {PROGRAM}", ""]
    sections: dict[str, list[Any]] = {}
    for opt in options:
        sections.setdefault(opt.section, []).append(opt)
    for section, opts in sections.items():
        lines += [escape(section), "-" * len(escape(section)), ""]
        for opt in opts:
            lines += option_lines(opt)
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def backends_rst(backends: Any) -> list[str]:
    columns = (
        "protocol",
        "backend",
        "install",
        "unix socket",
        "drains on SIGTERM",
        "concurrency option",
        "what it is",
    )
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines.append("   * - " + columns[0])
    lines += [f"     - {c}" for c in columns[1:]]
    for b in backends:
        install = literal(f"pip install 'chaussette[{b.extra}]'") if b.extra else "stdlib"
        knobs = [name for name, on in (("--threads", b.threads), ("--spawn", b.pool)) if on]
        if b.monkey:
            knobs.append("--no-monkey")
        knob_text = ", ".join(f":option:`{k} <{PROGRAM} {k}>`" for k in knobs) or "none"
        row = (
            literal(b.protocol),
            literal(b.name),
            install,
            _yes(b.unix),
            _yes(b.drain),
            knob_text,
            escape(b.summary),
        )
        lines.append("   * - " + row[0])
        lines += [f"     - {cell}" for cell in row[1:]]
    lines.append("")
    return lines


class _Generated(SphinxDirective):
    has_content = False

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        source = f"<{self.name} generated from the registry>"
        content = StringList(self.lines(), source=source)
        container = nodes.section() if self.name == "chaussette-options" else nodes.container()
        container.document = self.state.document
        nested_parse_with_titles(self.state, content, container)
        return list(container.children)


class OptionsDirective(_Generated):
    def lines(self) -> list[str]:
        from chaussette import settings

        self.env.note_dependency(settings.__file__)
        return options_rst(settings.OPTIONS)


class BackendsDirective(_Generated):
    def lines(self) -> list[str]:
        from chaussette.backends import registry

        self.env.note_dependency(registry.__file__)
        return backends_rst(registry.BACKENDS)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("chaussette-options", OptionsDirective)
    app.add_directive("chaussette-backends", BackendsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
