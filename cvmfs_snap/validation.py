"""One validation approach for what the project reads from files (the layout's JSON records, the publisher's YAML
and the snapshotter's TOML configuration): msgspec (``msgspec.convert``) over the dataclasses and TypedDicts that
describe them, with messages that name the file, the key (a dotted path) and what was expected, e.g.
``publisher.yaml: daemon.workers: expected an integer >= 1, got 'two'``.

What is expected is read from the JSON schema msgspec derives from the same annotations (types, ``msgspec.Meta``
bounds, ``Literal`` choices), so each fact is written once, on the class. A field may say it in words with
``Meta(extra_json_schema={EXPECT: "host:port"})``; a field marked ``{SECRET: True}`` never has its value echoed.
What a type cannot say is a :class:`Check` in the field's ``Annotated`` metadata (msgspec ignores it): a function
run on the value once msgspec has converted it, returning the value to keep; raising ``ValueError("host:port")``
gives ``expected host:port``. A dataclass whose ``forbid_unknown_fields`` (a ``ClassVar``, as msgspec spells the
option for its Structs) is true refuses keys it does not describe; other unknown keys are ignored (or listed by
:func:`unknown_keys` for files that warn about them).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

import msgspec

from cvmfs_snap.errors import InvalidInputError

T = TypeVar("T")

#: ``extra_json_schema`` key: what the value must be, in words (when the type and bounds do not say it)
EXPECT = "x-expect"
#: ``extra_json_schema`` key: the value is a secret (or may carry one, e.g. a URL): never shown in an error
SECRET = "x-secret"
#: the ``ClassVar`` of a dataclass whose unknown keys are an error (a typo in a configuration file)
FORBID = "forbid_unknown_fields"


@dataclasses.dataclass(frozen=True)
class Check:
    """``Annotated`` metadata: ``fn`` gets the converted value and returns the value to keep, or raises
    ``ValueError(words)`` (what was expected, in words). Run where the type says so: on the field, each item of a
    list, each value of a mapping, the one alternative of ``X | None`` (not inside unions of several types)."""

    fn: Callable[[Any], Any]


_SCHEMAS: dict[object, dict[str, object]] = {}

_TYPES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "null": "null", "array": "a list", "object": "a mapping"}
_PLURAL = {"integer": "integers", "number": "numbers", "string": "strings", "boolean": "booleans",
           "object": "mappings", "array": "lists"}
_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
#: msgspec's message: "Expected `int` >= 1 - at `$.a.b[0]`" (the path is absent at the top level)
_MESSAGE = re.compile(r"(?P<msg>.*?)(?: - at (?:`[^`]*` in )?`(?P<path>\$[^`]*)`)?", re.S)
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]*)`")


# -- the annotations ------------------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(tp: object) -> dict[str, Any] | None:
    """The fields of a dataclass or TypedDict (None for other types)."""
    if not isinstance(tp, type) or not (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)):
        return None
    hints = _HINTS.get(tp)
    if hints is None:
        hints = get_type_hints(tp, include_extras=True)
        if dataclasses.is_dataclass(tp):
            hints = {f.name: hints[f.name] for f in dataclasses.fields(tp)}
        hints = _HINTS[tp] = {k: _unrequired(v) for k, v in hints.items()}
    return hints


def _unrequired(tp: object) -> object:
    while get_origin(tp) in (typing.Required, typing.NotRequired):
        tp = get_args(tp)[0]
    return tp


def _inner(tp: object) -> list[object]:
    """The types a value of ``tp`` may hold directly: the alternatives of a union, the item type of a list, the
    value type of a mapping, the fields of a class."""
    origin = get_origin(tp)
    if origin is Annotated:
        return [get_args(tp)[0]]
    if origin in (Union, types.UnionType):
        return list(get_args(tp))
    if origin is list:
        return [get_args(tp)[0]]
    if origin is dict:
        return [get_args(tp)[1]]
    return list((_hints(tp) or {}).values())


def _types(tp: object, seen: set[object]) -> Iterator[object]:
    """``tp`` and every type it is made of."""
    if tp in seen:
        return
    seen.add(tp)
    yield tp
    if get_origin(tp) is not Literal:
        for inner in _inner(tp):
            yield from _types(inner, seen)


def _in_order(node: object, choices: Mapping[tuple[object, ...], list[object]]) -> None:
    """msgspec sorts a ``Literal``'s values in the schema: put them back in the order the code gives them."""
    if isinstance(node, dict):
        enum = node.get("enum")
        if isinstance(enum, list):
            node["enum"] = choices.get(tuple(sorted(enum, key=repr)), enum)
        for v in node.values():
            _in_order(v, choices)
    elif isinstance(node, list):
        for v in node:
            _in_order(v, choices)


_HAS_CHECKS: dict[object, bool] = {}


def _has_checks(tp: object) -> bool:
    found = _HAS_CHECKS.get(tp)
    if found is None:
        found = _HAS_CHECKS[tp] = any(isinstance(m, Check) for t in _types(tp, set()) if get_origin(t) is Annotated
                                      for m in get_args(t)[1:])
    return found


def _checked(tp: object, value: Any, loc: list[int | str]) -> Any:
    """``value`` (converted by msgspec to ``tp``) after the :class:`Check` functions of its annotations."""
    if not _has_checks(tp):  # (most records: their lists are not walked)
        return value
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        value = _checked(base, value, loc)
        for m in meta:
            if isinstance(m, Check):
                try:
                    value = m.fn(value)
                except ValueError as exc:
                    raise _Failed(loc, str(exc), value) from None
        return value
    if origin in (Union, types.UnionType):
        alts = [a for a in get_args(tp) if a is not type(None)]
        return _checked(alts[0], value, loc) if len(alts) == 1 and value is not None else value
    if origin is list and isinstance(value, list):
        return [_checked(get_args(tp)[0], v, [*loc, i]) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {k: _checked(get_args(tp)[1], v, [*loc, k]) for k, v in value.items()}
    if (hints := _hints(tp)) is not None:
        if isinstance(value, dict):  # a TypedDict
            return {k: _checked(hints[k], v, [*loc, k]) if k in hints else v for k, v in value.items()}
        for name, hint in hints.items():
            if (new := _checked(hint, old := getattr(value, name), [*loc, name])) is not old:
                object.__setattr__(value, name, new)  # (a frozen dataclass too: it is being built)
    return value


class _Failed(Exception):
    """A :class:`Check` refused the value at ``loc``."""

    def __init__(self, loc: list[int | str], expected: str, value: object) -> None:
        super().__init__(expected)
        self.loc, self.expected, self.value = loc, expected, value


# -- the schema -----------------------------------------------------------------------------------------------------
def _schema(cls: object) -> dict[str, object]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = msgspec.json.schema(cls, schema_hook=_free)
        defs = cast("dict[str, dict[str, object]]", schema.get("$defs", {}))
        found = list(_types(cls, set()))
        _in_order(schema, {tuple(sorted(get_args(t), key=repr)): list(get_args(t))
                           for t in found if get_origin(t) is Literal})
        for klass in found:
            fields = _hints(klass)
            if isinstance(klass, type) and fields is not None and getattr(klass, FORBID, False):
                names = set(fields)  # (additionalProperties: JSON schema's "no other keys")
                for node in defs.values():
                    props = node.get("properties")
                    if node.get("title") == klass.__name__ and isinstance(props, Mapping) and set(props) == names:
                        node["additionalProperties"] = False
        _SCHEMAS[cls] = schema
    return schema


def _free(tp: type) -> dict[str, object]:
    """The schema of ``object`` (any value; msgspec passes it through unchecked)."""
    if tp is object:
        return {"description": "any value"}
    raise NotImplementedError(tp)


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


# -- msgspec's errors -----------------------------------------------------------------------------------------------
def _step(tp: object, part: int | str) -> object | None:
    """The type of ``part`` (a key or an index) of a value of type ``tp`` (None: not described)."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _step(get_args(tp)[0], part)
    if origin in (Union, types.UnionType):
        return next((s for a in get_args(tp) if (s := _step(a, part)) is not None), None)
    if origin is list:
        return get_args(tp)[0] if isinstance(part, int) else None
    if origin is dict:
        return get_args(tp)[1] if isinstance(part, str) else None
    hints = _hints(tp)
    return hints.get(part) if hints is not None and isinstance(part, str) else None


def _located(exc: msgspec.ValidationError, tp: object, data: object, strict: bool) -> tuple[list[int | str], str]:
    """Where in ``data`` msgspec's error is (its ``$.a.b[0]`` path as keys and indexes) and its message."""
    match = _MESSAGE.fullmatch(str(exc))
    msg, rest = (match["msg"], (match["path"] or "$")[1:]) if match else (str(exc), "")
    loc: list[int | str] = []
    value: object = data
    while rest:
        if rest.startswith("[...]"):  # a value of a mapping; msgspec does not say which: convert each to find it
            vtype = _step(tp, "")
            for k, v in value.items() if isinstance(value, dict) and vtype is not None else ():
                try:
                    msgspec.convert(v, vtype, strict=strict)
                except msgspec.ValidationError as sub:
                    inner, msg = _located(sub, vtype, v, strict)
                    return [*loc, k, *inner], msg
            break
        if rest.startswith("["):
            end = rest.find("]")
            part: int | str = int(rest[1:end]) if rest[1:end].isdigit() else rest[1:end]
            rest = rest[end + 1:]
        else:  # ".key": the longest key of the mapping that the path goes on from (a key may hold dots)
            body = rest[1:]
            keys = [k for k in value if isinstance(k, str) and body.startswith(k)
                    and body[len(k):len(k) + 1] in ("", ".", "[")] if isinstance(value, dict) else []
            part = max(keys, key=len) if keys else re.split(r"[.\[]", body, maxsplit=1)[0]
            rest = body[len(part):]
        loc.append(part)
        tp = _step(tp, part)
        value = _value_at(value, [part])
    if missing := _MISSING.fullmatch(msg):
        loc.append(missing["name"])
    return loc, msg


def _value_at(value: object, loc: Sequence[int | str]) -> object:
    for part in loc:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            return None
    return value


def _key(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(root: Mapping[str, object], loc: Sequence[int | str], value: object) -> str:
    """``, got <value>``, or nothing when the value (or what holds it) is a SECRET."""
    if any(_at(root, loc[:i])[0].get(SECRET) for i in range(1, len(loc) + 1)):
        return ""
    return f", got {_shown(value)}"


def _problem(msg: str, loc: list[int | str], data: object, root: Mapping[str, object],
             prefix: Sequence[int | str]) -> str:
    node, _ = _at(root, loc)
    key = _key([*prefix, *loc])
    if _MISSING.fullmatch(msg):
        return f"{key}: missing (a required key)" + (f", expected {_expected(node, root)}" if node else "")
    expected = _expected(node, root) if node else msg[:1].lower() + msg[1:].removeprefix("Expected ")
    return f"{key}: expected {expected}{_got(root, loc, _value_at(data, loc))}"


# -- keys -----------------------------------------------------------------------------------------------------------
def _unknown(root: Mapping[str, object], data: object) -> list[tuple[list[int | str], Mapping[str, object]]]:
    """The keys of ``data`` that the schema does not describe, with the schema of the mapping holding each."""
    found: list[tuple[list[int | str], Mapping[str, object]]] = []

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
                    found.append(([*loc, k], alt))
            return

    walk(root, data, [])
    return found


def _forbids(root: Mapping[str, object]) -> bool:
    """Some mapping of the schema refuses unknown keys."""
    defs = cast("Mapping[str, Mapping[str, object]]", root.get("$defs", {}))
    return any(node.get("additionalProperties") is False for node in defs.values())


def unknown_keys(cls: type, data: object) -> list[str]:
    """The dotted keys of ``data`` that ``cls`` does not describe (for files whose unknown keys are warned about and
    ignored rather than refused, as the snapshotter's TOML); keys under a free-form mapping are all known."""
    return [_key(loc) for loc, _ in _unknown(_schema(cls), data)]


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
    """``data`` (parsed JSON / YAML / TOML) as an instance of the dataclass (or TypedDict) ``cls``.

    Anything else is an :class:`InvalidInputError` starting with ``what`` (e.g. ``"malformed image.json"`` or a
    configuration file's path). ``strict``: types as written in the file (no ``"2"`` for 2, no ``true`` for 1; an
    integer is a number), as for configuration; unknown keys are ignored unless a dataclass forbids them
    (:data:`FORBID`). ``kind`` names what the top level must be; ``prefix``: the keys above ``data``.
    """
    if not isinstance(data, dict):
        got = "nothing (the document is empty)" if data is None else f"{type(data).__name__} {_shown(data)}"
        raise InvalidInputError(f"{what}: expected {kind}, got {got}")
    root = _schema(cls)
    if strict:  # JSON's strictness: mappings may become dataclasses, integers numbers
        for loc, value in _not_plain(data, []):  # a date would pass as its text where a string is expected
            if node := _at(root, loc)[0]:  # (unknown keys and free-form values are left to the schema)
                raise InvalidInputError(f"{what}: {_key([*prefix, *loc])}: expected {_expected(node, root)}"
                                        f"{_got(root, loc, value)}")
    for loc, parent in _unknown(root, data) if _forbids(root) else ():
        if parent.get("additionalProperties") is False:
            known = parent.get("properties")
            names = ", ".join(sorted(known)) if isinstance(known, Mapping) else ""
            raise InvalidInputError(f"{what}: {_key([*prefix, *loc])}: unknown setting"
                                    + (f"; known here: {names}" if names else ""))
    try:
        return cast("T", _checked(cls, msgspec.convert(data, cls, strict=strict), []))
    except msgspec.ValidationError as exc:
        loc, msg = _located(exc, cls, data, strict)
        raise InvalidInputError(f"{what}: {_problem(msg, loc, data, root, prefix)}") from None
    except _Failed as exc:
        raise InvalidInputError(f"{what}: {_key([*prefix, *exc.loc])}: expected {exc.expected}"
                                f"{_got(root, exc.loc, exc.value)}") from None
