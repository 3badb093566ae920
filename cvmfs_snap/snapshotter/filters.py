"""containerd's filter language, as the snapshot service's List (``ctr snapshots ls``, ``Walk``) uses it.

Why our own parser: containerd sends these strings over gRPC and expects the snapshotter to evaluate them; after an
``AlreadyExists`` from a remote snapshotter it lists with ``labels."containerd.io/snapshot.ref"==<chainID>,parent==<p>``
to find the snapshot it was told exists. The grammar follows containerd's ``filters`` package::

    filters   := filter*                      (several strings: a snapshot matches if it matches ANY of them)
    filter    := selector ("," selector)*     (every selector must match)
    selector  := fieldpath (operator value)?  (no operator: the field must be present)
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="           (~= is a regular expression search)
    value     := quoted | [^\\s,]+
    quoted    := "..." with Go escapes; /.../ and |...| too after ~=

Fields of a snapshot: ``name``, ``parent``, ``kind`` (active, view, committed) and ``labels.<key>`` (the rest of the
path joined with "." is the label key, so ``labels.a.b`` and ``labels."a.b"`` are the same).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidInputError

#: a field lookup: returns (value, present)
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_QUOTES = '"/|'
_OPERATORS = ("==", "!=", "~=")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "?" (present), "==", "!=", "~="
    value: str = ""
    regexp: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "?":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.regexp is not None
        return self.regexp.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """All selectors of one filter string must match (an empty filter matches everything)."""

    selectors: tuple[Selector, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(s.match(adaptor) for s in self.selectors)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidInputError:
        return InvalidInputError(
            f"invalid filter {self.text!r} at position {self.pos}: {msg} "
            '(expected e.g. name==foo, kind==committed, labels."containerd.io/gc.root", a,b for AND)'
        )

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self, allow_alt: bool) -> str:
        quote = self.text[self.pos]
        if quote != '"' and not allow_alt:
            raise self.error(f"quote {quote!r} is only allowed after ~=")
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error("quoted literal not terminated")
            ch = self.text[self.pos]
            if ch == quote:
                self.pos += 1
                return "".join(out)
            if ch == "\\":
                self.pos += 1
                out.append(self.escape(quote))
                continue
            out.append(ch)
            self.pos += 1

    def escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self.error("quoted literal not terminated")
        ch = self.text[self.pos]
        self.pos += 1
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        if ch in "\"'/|":
            if ch != quote:  # like containerd: only the enclosing quote character may be escaped
                raise self.error(f"illegal escape \\{ch} inside {quote}...{quote}")
            return ch
        widths = {"x": 2, "u": 4, "U": 8}
        if ch in widths:
            digits = self.text[self.pos : self.pos + widths[ch]]
            if len(digits) != widths[ch] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise self.error("illegal numeric escape sequence")
            self.pos += widths[ch]
            return chr(int(digits, 16))
        if ch in "01234567":
            digits = ch + self.text[self.pos : self.pos + 2]
            if len(digits) != 3 or not all(c in "01234567" for c in digits) or int(digits, 8) > 255:
                raise self.error("illegal octal escape sequence")
            self.pos += 2
            return chr(int(digits, 8))
        raise self.error(f"illegal escape sequence \\{ch}")

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted(False)
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] == "_") and (
            self.text[self.pos].isascii()
        ):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a field name or a quoted field")
        return self.text[start : self.pos]

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        ch = self.peek()
        if ch in ("", ","):
            return Selector(tuple(path), "?")
        op = self.text[self.pos : self.pos + 2]
        if op not in _OPERATORS:
            raise self.error('expected an operator ("==", "!=" or "~=") or "," ')
        self.pos += 2
        ch = self.peek()
        if ch == "":
            raise self.error("missing value after operator")
        if ch in _QUOTES:
            value = self.quoted(op == "~=")
        else:
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
                self.pos += 1
            value = self.text[start : self.pos]
        regexp = None
        if op == "~=":
            try:
                regexp = re.compile(value)
            except re.error as exc:
                raise self.error(f"invalid regular expression {value!r}: {exc}") from exc
        return Selector(tuple(path), op, value, regexp)

    def parse(self) -> Filter:
        if not self.text.strip():
            return Filter(())
        selectors = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return Filter(tuple(selectors))
            if ch != ",":
                raise self.error(f"unexpected input {ch!r}")
            self.pos += 1
            selectors.append(self.selector())


def parse(text: str) -> Filter:
    """Parse one filter string (selectors joined by ","); InvalidInputError when malformed."""
    return _Parser(text).parse()


def parse_all(texts: Sequence[str]) -> list[Filter]:
    """Parse several filter strings (OR between them); an empty list matches everything."""
    return [parse(t) for t in texts]


def match_any(filters: Sequence[Filter], adaptor: Adaptor) -> bool:
    return not filters or any(f.match(adaptor) for f in filters)


def snapshot_adaptor(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Adaptor:
    """The fields of a snapshot as containerd's snapshot storage exposes them to filters."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "kind":
            return kind, True
        if head == "labels":
            if len(path) < 2:
                return "", False
            key = ".".join(path[1:])
            if key in labels:
                return labels[key], True
        return "", False

    return field
