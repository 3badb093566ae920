"""Validation of the node's own files -- the snapshotter's TOML configuration and the layout's JSON records -- from
their annotations, without pydantic: pydantic and its core are ~6 MiB of the snapshotter daemon's resident memory
(issue 9's RSS goal, bench/README.md "Resident memory"), and these shapes need little of it. The messages are those
of :mod:`cvmfs_snap.validation` (which validates the publisher's files with pydantic, and takes its words from
here): ``<what>: <dotted key>: expected <words>, got <value>``.

Shapes: ``str``, ``int``, ``float``, ``bool``, ``object`` (anything), ``list[T]``, ``dict[str, T]``, a ``TypedDict``
(keys optional unless it says ``total=True``; values as declared) and a dataclass (its fields; those without a
default are required). Types are JSON's, strictly: no ``"2"`` for 2, no ``true`` for 1, an integer is a number (and
becomes a float), and a TOML date is not its text. Keys a shape does not name are ignored (:func:`unknown_keys`
lists them). ``Annotated`` metadata adds: ``annotated_types`` bounds (``Ge(1)``: "an integer >= 1"), :class:`Strip`
(surrounding white space dropped), :class:`Before` / :class:`After` (a function given the value before / after the
type check, returning the value to keep or raising ``ValueError("<words>")`` for "expected <words>"),
:class:`Expect` (the expectation in words) and :data:`SECRET` (the value is never echoed).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import annotated_types

from cvmfs_snap.errors import InvalidInputError

T = TypeVar("T")

#: a JSON type in words, and in the plural ("a list of strings")
TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
              "null": "null", "array": "a list", "object": "a mapping"}
PLURAL_WORDS = {"integer": "integers", "number": "numbers", "string": "strings", "boolean": "booleans",
                "object": "mappings", "array": "lists"}
#: JSON schema bound keywords and their operators
BOUND_WORDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def key_path(loc: Sequence[int | str]) -> str:
    """``a.b[0].c`` for a location; ``(the document)`` for the top."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def shown(value: object) -> str:
    """A value as an error message shows it (its repr, cut at 80 characters)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Strip:
    """Drop a string's surrounding white space."""


@dataclass(frozen=True)
class Before:
    """``fn(value)`` before the type check (e.g. ``"4GiB"`` -> 4294967296)."""

    fn: Callable[[object], object]


@dataclass(frozen=True)
class After:
    """``fn(value)`` after the type check (and the bounds)."""

    fn: Callable[[Any], object]


@dataclass(frozen=True)
class Expect:
    """What the value must be, in words, instead of the words of its type and bounds."""

    words: str


@dataclass(frozen=True)
class _Secret:
    pass


#: the value is a secret (or may carry one, e.g. a URL): never shown in an error
SECRET = _Secret()

#: annotated_types bounds: (class, operator, its attribute, the check)
_BOUNDS: tuple[tuple[type, str, str, Callable[[Any, Any], bool]], ...] = (
    (annotated_types.Ge, ">=", "ge", lambda v, b: v >= b), (annotated_types.Gt, ">", "gt", lambda v, b: v > b),
    (annotated_types.Le, "<=", "le", lambda v, b: v <= b), (annotated_types.Lt, "<", "lt", lambda v, b: v < b),
)
_KINDS: dict[object, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


class _Problem(Exception):
    def __init__(self, loc: list[int | str], text: str) -> None:
        super().__init__(text)
        self.loc = loc
        self.text = text


_SPLIT: dict[object, tuple[object, tuple[object, ...]]] = {}


def _split(tp: object) -> tuple[object, tuple[object, ...]]:
    """(the type, its Annotated metadata), worked out once per type."""
    try:
        return _SPLIT[tp]
    except KeyError:
        pass
    except TypeError:  # not hashable
        return _unannotated(tp)
    out = _SPLIT[tp] = _unannotated(tp)
    return out


def _unannotated(tp: object) -> tuple[object, tuple[object, ...]]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        inner, more = _unannotated(base)
        return inner, (*more, *meta)
    return tp, ()


_FIELDS: dict[type, dict[str, tuple[object, bool]]] = {}


def _fields(tp: object) -> dict[str, tuple[object, bool]] | None:
    """{key: (type, required)} of a TypedDict or a dataclass (resolved once per class); None for anything else."""
    if isinstance(tp, type) and tp in _FIELDS:
        return _FIELDS[tp]
    fields = _resolve_fields(tp)
    if fields is not None and isinstance(tp, type):
        _FIELDS[tp] = fields
    return fields


def _resolve_fields(tp: object) -> dict[str, tuple[object, bool]] | None:
    # a TypedDict of typing or of typing_extensions (which typing.is_typeddict does not know on Python 3.11)
    if isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__"):
        hints = typing.get_type_hints(tp, include_extras=True)
        required = cast("frozenset[str]", getattr(tp, "__required_keys__", frozenset()))
        return {k: (v, k in required) for k, v in hints.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {f.name: (hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                for f in dataclasses.fields(tp) if f.init}
    return None


def expected(tp: object) -> str:
    """What a value of ``tp`` must be, in words: ``an integer >= 1``, ``a list of strings``, ``a mapping``."""
    base, meta = _split(tp)
    for m in meta:
        if isinstance(m, Expect):
            return m.words
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(expected(a) for a in typing.get_args(base))
    if base is type(None):
        text = TYPE_WORDS["null"]
    elif base in _KINDS:
        text = TYPE_WORDS[_KINDS[base]]
    elif origin is list:
        (item,) = typing.get_args(base)
        inner = _KINDS.get(_split(item)[0])
        text = f"a list of {PLURAL_WORDS[inner]}" if inner else TYPE_WORDS["array"]
    elif origin is dict or _fields(base) is not None:
        text = TYPE_WORDS["object"]
    else:
        text = "a value"
    bounds = [f"{op} {getattr(m, attr)}" for m in meta for kind, op, attr, _ in _BOUNDS if isinstance(m, kind)]
    return " ".join([text, " and ".join(bounds)]) if bounds else text


def _plain(tp: object) -> bool:
    """``str``, ``int`` or ``bool`` as such (no metadata): checked by its exact type."""
    return tp is str or tp is int or tp is bool


def _fail(tp: object, value: object, loc: list[int | str], secret: bool, words: str | None = None) -> _Problem:
    got = "" if secret else f", got {shown(value)}"
    return _Problem(loc, f"{key_path(loc)}: expected {words or expected(tp)}{got}")


def _check(tp: object, value: object, loc: list[int | str], secret: bool, problems: list[_Problem]) -> object:
    """``value`` as ``tp`` (converted: stripped, parsed, int -> float); problems are appended, never raised."""
    base, meta = _split(tp)
    if not meta:  # no markers: just the type
        try:
            return _typed(tp, base, value, loc, secret, problems)
        except _Problem as p:
            problems.append(p)
            return value
    secret = secret or any(m is SECRET for m in meta)
    try:
        for m in meta:
            if isinstance(m, Before):
                value = m.fn(value)
        value = _typed(tp, base, value, loc, secret, problems)
        for m in meta:
            if isinstance(m, Strip) and isinstance(value, str):
                value = value.strip()
            for kind, _, attr, ok in _BOUNDS:
                if isinstance(m, kind) and not ok(value, getattr(m, attr)):
                    raise _fail(tp, value, loc, secret)
        for m in meta:
            if isinstance(m, After):
                value = m.fn(value)
    except ValueError as exc:  # a Before/After function's words
        problems.append(_fail(tp, value, loc, secret, str(exc)))
    except _Problem as p:
        problems.append(p)
    return value


def _typed(tp: object, base: object, value: object, loc: list[int | str], secret: bool,
           problems: list[_Problem]) -> object:
    if base is object or base is Any:
        return value
    if type(base) is type and base in _KINDS:
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not base:
            raise _fail(tp, value, loc, secret)
        return value
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(base):
            trial: list[_Problem] = []
            checked = _check(alt, value, loc, secret, trial)
            if not trial:
                return checked
        raise _fail(tp, value, loc, secret)
    if base is type(None):
        if value is not None:
            raise _fail(tp, value, loc, secret)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(tp, value, loc, secret)
        (item,) = typing.get_args(base)
        if _plain(item):  # the common case (a record's list of paths), without a call per item
            bad = [i for i, v in enumerate(value) if type(v) is not item]
            problems.extend(_fail(item, value[i], [*loc, i], secret) for i in bad)
            return list(value)
        return [_check(item, v, [*loc, i], secret, problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(tp, value, loc, secret)
        _, item = typing.get_args(base)
        if _plain(item):
            wrong = [k for k, v in value.items() if type(v) is not item]
            problems.extend(_fail(item, value[k], [*loc, str(k)], secret) for k in wrong)
            return dict(value)
        return {k: _check(item, v, [*loc, str(k)], secret, problems) for k, v in value.items()}
    fields = _fields(base)
    if fields is None:
        raise TypeError(f"plainvalidation cannot check {base!r}")
    if not isinstance(value, dict):
        raise _fail(tp, value, loc, secret)
    out: dict[str, object] = {}
    for k, (ftp, required) in fields.items():
        if k in value:
            out[k] = _check(ftp, value[k], [*loc, k], secret, problems)
        elif required:
            problems.append(_Problem([*loc, k], f"{key_path([*loc, k])}: missing (a required key), expected "
                                                f"{expected(ftp)}"))
    if isinstance(base, type) and dataclasses.is_dataclass(base) and not problems:
        return base(**out)
    return out


def load_as(cls: type[T], data: object, what: str, *, kind: str = "a JSON object",
            prefix: Sequence[int | str] = ()) -> T:
    """``data`` (parsed JSON or TOML) as ``cls`` (a dataclass: an instance; a TypedDict: the checked dict), or an
    :class:`InvalidInputError` starting with ``what`` naming the first problem (and how many more there are)."""
    if not isinstance(data, dict):
        got = "nothing (the document is empty)" if data is None else f"{type(data).__name__} {shown(data)}"
        raise InvalidInputError(f"{what}: expected {kind}, got {got}")
    problems: list[_Problem] = []
    out = _check(cls, data, list(prefix), False, problems)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidInputError(f"{what}: {problems[0].text}{more}")
    return cast("T", out)


def unknown_keys(cls: type, data: object) -> list[str]:
    """The dotted keys of ``data`` that ``cls`` does not name (keys under a ``dict[str, T]`` are all known)."""
    found: list[str] = []

    def walk(tp: object, value: object, loc: list[int | str]) -> None:
        base, _ = _split(tp)
        if not isinstance(value, Mapping):
            return
        fields = _fields(base)
        if fields is not None:
            for k, v in value.items():
                if k in fields:
                    walk(fields[k][0], v, [*loc, k])
                else:
                    found.append(key_path([*loc, k]))
        elif typing.get_origin(base) is dict:
            _, item = typing.get_args(base)
            for k, v in value.items():
                walk(item, v, [*loc, k])

    walk(cls, data, [])
    return found
