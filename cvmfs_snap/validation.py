"""One validation approach for what the project reads from files (the layout's JSON records, the publisher's YAML
and the snapshotter's TOML configuration): pydantic over the dataclasses that describe them, with messages that
name the file, the key (a dotted path) and what was expected, e.g.
``publisher.yaml: daemon.workers: expected an integer >= 1, got 'two'``.

What is expected is read from the JSON schema pydantic derives from the same annotations (types, ``Field``
bounds, ``Literal`` choices), so each fact is written once, on the dataclass. A field may say it in words with
``Field(json_schema_extra={EXPECT: "host:port"})``; a field marked ``{SECRET: True}`` never has its value echoed;
a validator raising ``ValueError("host:port")`` gives ``expected host:port``.

The node's own files (the snapshotter's TOML, the layout's JSON records) are validated with the same words and
messages by :mod:`cvmfs_snap.plainvalidation`, without pydantic (the snapshotter daemon's resident memory).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar, cast

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails, to_json

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.plainvalidation import BOUND_WORDS, PLURAL_WORDS, TYPE_WORDS, key_path, shown

T = TypeVar("T")

#: ``json_schema_extra`` key: what the value must be, in words (when the type and bounds do not say it)
EXPECT = "x-expect"
#: ``json_schema_extra`` key: the value is a secret (or may carry one, e.g. a URL): never shown in an error
SECRET = "x-secret"

_ADAPTERS: dict[type, TypeAdapter[object]] = {}
_SCHEMAS: dict[type, dict[str, object]] = {}

_TYPES, _PLURAL, _BOUNDS = TYPE_WORDS, PLURAL_WORDS, BOUND_WORDS
#: pydantic's error types for a key that is not a field
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


def _adapter(cls: type[T]) -> TypeAdapter[T]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return cast("TypeAdapter[T]", adapter)


def _schema(cls: type) -> dict[str, object]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = _adapter(cls).json_schema()
    return schema


def _resolve(node: Mapping[str, object], root: Mapping[str, object]) -> Mapping[str, object]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        defs = cast("Mapping[str, Mapping[str, object]]", root.get("$defs", {}))
        return {**defs.get(ref.removeprefix("#/$defs/"), {}), **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _alternatives(node: Mapping[str, object]) -> list[Mapping[str, object]]:
    alts = node.get("anyOf")
    return cast("list[Mapping[str, object]]", alts) if isinstance(alts, list) else [node]


def _at(root: Mapping[str, object], loc: Sequence[int | str]) -> tuple[Mapping[str, object], Mapping[str, object]]:
    """The schema of the value at ``loc`` and of the mapping holding it ({} where the path leaves the schema)."""
    node: Mapping[str, object] = root
    parent: Mapping[str, object] = {}
    for part in loc:
        parent = _resolve(node, root)
        for alt in map(lambda a: _resolve(a, root), _alternatives(parent)):
            props = alt.get("properties")
            if isinstance(part, str) and isinstance(props, Mapping) and part in props:
                parent, node = alt, props[part]
                break
            items = alt.get("items") if isinstance(part, int) else alt.get("additionalProperties")
            if isinstance(items, Mapping):
                parent, node = alt, items
                break
        else:
            return {}, parent
    return _resolve(node, root), parent


def _expected(node: Mapping[str, object], root: Mapping[str, object]) -> str:
    """``node`` (a JSON schema) in words: ``an integer >= 1``, ``one of 'a', 'b'``, ``a list of strings``."""
    words = node.get(EXPECT)
    if isinstance(words, str):
        return words
    alts = _alternatives(node)
    if len(alts) > 1:
        return " or ".join(_expected(_resolve(a, root), root) for a in alts)
    enum = node.get("enum", [node["const"]] if "const" in node else None)
    if isinstance(enum, list):
        return repr(enum[0]) if len(enum) == 1 else "one of " + ", ".join(map(repr, enum))
    kind = node.get("type")
    text = _TYPES.get(kind, "a value") if isinstance(kind, str) else "a value"
    items = node.get("items")
    if kind == "array" and isinstance(items, Mapping):
        inner = _resolve(items, root).get("type")
        if isinstance(inner, str) and inner in _PLURAL:
            text = f"a list of {_PLURAL[inner]}"
    if node.get("minLength") == 1 or node.get("minItems") == 1:
        text = text.replace("a ", "a non-empty ", 1)
    bounds = [f"{op} {node[key]}" for key, op in _BOUNDS if key in node]
    return " ".join([text, " and ".join(bounds)]) if bounds else text


_key, _shown = key_path, shown


def _problem(err: ErrorDetails, root: Mapping[str, object], prefix: Sequence[int | str]) -> str:
    loc = err["loc"]
    node, parent = _at(root, loc)
    key = _key([*prefix, *loc])
    if err["type"] == "missing":
        return f"{key}: missing (a required key)" + (f", expected {_expected(node, root)}" if node else "")
    if err["type"] in _UNKNOWN_KEY:
        known = parent.get("properties")
        names = ", ".join(sorted(known)) if isinstance(known, Mapping) else ""
        return f"{key}: unknown setting" + (f"; known here: {names}" if names else "")
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error" and "error" in ctx:
        expected = str(ctx["error"])  # a validator's own words
    elif node:
        expected = _expected(node, root)
    else:
        expected = err["msg"].lower().removeprefix("input should be ")
    return f"{key}: expected {expected}{_got(root, loc, err.get('input'))}"


def _got(root: Mapping[str, object], loc: Sequence[int | str], value: object) -> str:
    """``, got <value>``, or nothing when the value (or what holds it) is a SECRET."""
    if any(_at(root, loc[:i])[0].get(SECRET) for i in range(1, len(loc) + 1)):
        return ""
    return f", got {_shown(value)}"


def describe(exc: ValidationError, cls: type | None = None, prefix: Sequence[int | str] = ()) -> str:
    """The first problem of ``exc`` as ``key: expected ..., got ...`` (``cls``: the class validated, for the
    expectations its schema states)."""
    root = _schema(cls) if cls is not None else {}
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return _problem(exc.errors(include_url=False)[0], root, prefix) + more


def unknown_keys(cls: type, data: object) -> list[str]:
    """The dotted keys of ``data`` that ``cls`` does not describe (for files whose unknown keys are warned about and
    ignored rather than refused, as the snapshotter's TOML); keys under a free-form mapping are all known."""
    root = _schema(cls)
    found: list[str] = []

    def walk(node: Mapping[str, object], value: object, loc: list[int | str]) -> None:
        if not isinstance(value, dict):
            return
        for alt in map(lambda a: _resolve(a, root), _alternatives(_resolve(node, root))):
            props, free = alt.get("properties"), alt.get("additionalProperties")
            if not isinstance(props, Mapping) and not isinstance(free, Mapping):
                continue
            for k, v in value.items():
                if isinstance(props, Mapping) and k in props:
                    walk(props[k], v, [*loc, k])
                elif isinstance(free, Mapping):
                    walk(free, v, [*loc, k])
                else:
                    found.append(_key([*loc, k]))
            return

    walk(root, data, [])
    return found


_PLAIN = (str, int, float, bool, type(None))


def _not_plain(value: object, loc: list[int | str]) -> Iterator[tuple[list[int | str], object]]:
    """The values below ``value`` that JSON cannot hold (a YAML or TOML date, ...), with their paths."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _not_plain(v, [*loc, k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _not_plain(v, [*loc, i])
    elif not isinstance(value, _PLAIN):
        yield loc, value


def load_as(cls: type[T], data: object, what: str, *, strict: bool = False, kind: str = "a JSON object",
            prefix: Sequence[int | str] = ()) -> T:
    """``data`` (parsed JSON / YAML / TOML) as an instance of the dataclass ``cls``.

    Anything else is an :class:`InvalidInputError` starting with ``what`` (e.g. ``"malformed image.json"`` or a
    configuration file's path). ``strict``: types as written in the file (no ``"2"`` for 2, no ``true`` for 1; an
    integer is a number), as for configuration; unknown keys follow ``cls``'s pydantic config (ignored unless it
    says ``extra="forbid"``). ``kind`` names what the top level must be; ``prefix``: the keys above ``data``.
    """
    if not isinstance(data, dict):
        got = "nothing (the document is empty)" if data is None else f"{type(data).__name__} {_shown(data)}"
        raise InvalidInputError(f"{what}: expected {kind}, got {got}")
    try:
        if strict:  # JSON's strictness: mappings may become dataclasses, integers numbers
            root = _schema(cls)
            for loc, value in _not_plain(data, []):  # a date would pass as its text where a string is expected
                if node := _at(root, loc)[0]:  # (unknown keys and free-form values are left to the schema)
                    raise InvalidInputError(f"{what}: {_key([*prefix, *loc])}: expected {_expected(node, root)}"
                                            f"{_got(root, loc, value)}")
            return _adapter(cls).validate_json(to_json(data), strict=True)
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise InvalidInputError(f"{what}: {describe(exc, cls, prefix)}") from None
