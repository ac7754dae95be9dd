"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``): ``Args:`` entries that name several parameters.

A few docstrings document related parameters together (``dense_mode, dense_rank, dense_targets: how ...``), which
the Google-style parser cannot read (``mkdocs build --strict`` fails on its warning). Before parsing, this splits
such an entry into one entry per name, each with the shared description, so the page shows every parameter.
"""

from __future__ import annotations

import re

import griffe

ENTRY = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):(.*)$")


def split_grouped_args(text: str) -> str:
    """Rewrite each ``a, b, c: description`` entry of the ``Args:`` section (its names may wrap onto continuation
    lines) as three entries; the rest of the docstring is left as it is."""
    lines = text.split("\n")
    if "Args:" not in lines:
        return text
    start = lines.index("Args:") + 1
    end = next((k for k in range(start, len(lines)) if lines[k].strip() and not lines[k][0].isspace()), len(lines))
    return "\n".join(lines[:start] + _split_block(lines[start:end]) + lines[end:])


def _split_block(lines: list[str]) -> list[str]:
    """The ``Args:`` section's lines with grouped entries split."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        head = line
        j = i
        # Names that wrap: "a, b, c,\n    d, e: description".
        while head.rstrip().endswith(",") and j + 1 < len(lines) and ":" not in head:
            j += 1
            head = head.rstrip() + " " + lines[j].strip()
        match = ENTRY.match(head)
        if match and len(match.group(1)) == 4:  # an entry of the section, not a continuation line
            indent, names, first = match.group(1), match.group(2), match.group(3).strip()
            description = [first]
            k = j + 1
            while k < len(lines) and lines[k].strip() and len(lines[k]) - len(lines[k].lstrip()) > len(indent):
                description.append(lines[k].strip())
                k += 1
            text_block = " ".join(description)
            for name in re.split(r",\s*", names):
                out.append(f"{indent}{name}: {text_block}")
            i = k
            continue
        out.append(line)
        i += 1
    return out


class GroupedArgs(griffe.Extension):
    """Split grouped ``Args:`` entries of every function's and class's docstring before it is parsed."""

    def _fix(self, obj: griffe.Object) -> None:
        if obj.docstring is not None and "Args:" in obj.docstring.value:
            obj.docstring.value = split_grouped_args(obj.docstring.value)

    def on_function_instance(self, *, func: griffe.Function, **kwargs) -> None:  # noqa: D102
        self._fix(func)

    def on_class_instance(self, *, cls: griffe.Class, **kwargs) -> None:  # noqa: D102
        self._fix(cls)
