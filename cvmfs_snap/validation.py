"""One validation approach for what the project reads from files (the layout's JSON records, configuration):
pydantic over the dataclasses that describe them, with messages that name the file, the key and the expected type.
"""

from __future__ import annotations

from typing import TypeVar, cast

from pydantic import TypeAdapter, ValidationError

from cvmfs_snap.errors import InvalidInputError

T = TypeVar("T")


_ADAPTERS: dict[type, TypeAdapter[object]] = {}


def _adapter(cls: type[T]) -> TypeAdapter[T]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)  # a stdlib dataclass: unknown keys are ignored
    return cast("TypeAdapter[T]", adapter)


def describe(exc: ValidationError) -> str:
    """The first problem of ``exc`` as ``key: expected ..., got <type>``."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(the document)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "missing":
        return f"{key}: missing (a required key){more}"
    return f"{key}: {err['msg'].lower()}, got {type(err.get('input')).__name__}{more}"


def load_as(cls: type[T], data: object, what: str) -> T:
    """``data`` (parsed JSON / YAML / TOML) as an instance of the dataclass ``cls``; unknown keys are ignored.

    Anything else is an :class:`InvalidInputError` starting with ``what`` (e.g. ``"malformed image.json"``).
    """
    if not isinstance(data, dict):
        raise InvalidInputError(f"{what}: expected a JSON object, got {type(data).__name__}")
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise InvalidInputError(f"{what}: {describe(exc)}") from None
