"""containerd's filter language as List/Walk use it."""

from __future__ import annotations

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.snapshotter import filters as flt

SNAP = flt.snapshot_adaptor(
    "ns/3/sha256:abc", "ns/2/sha256:def", "committed",
    {"containerd.io/snapshot.ref": "sha256:abc", "containerd.io/gc.root": "2024", "a.b": "dotted", "empty": ""},
)


def matches(*texts: str) -> bool:
    return flt.match_any(flt.parse_all(list(texts)), SNAP)


@pytest.mark.parametrize("text", [
    "",
    "name==ns/3/sha256:abc",
    'name=="ns/3/sha256:abc"',
    "parent==ns/2/sha256:def",
    'parent!=""',
    "kind==committed",
    "kind!=active",
    'labels."containerd.io/snapshot.ref"==sha256:abc',
    'labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/2/sha256:def"',
    "labels.a.b==dotted",
    'labels."a.b"==dotted',
    "labels.empty",
    'labels.empty==""',
    'labels."containerd.io/gc.root"',
    "labels.missing!=x",
    "name~=sha256",
    "name~=/^ns\\/[0-9]+\\//",
    "name~=|abc$|",
    " kind == committed , name ~= abc ",
    'name=="ns/3/sha256\\x3aabc"',
    "labels.a.b==\"dotted\",kind==committed,parent~=def",
])
def test_matching(text: str) -> None:
    assert matches(text), text


@pytest.mark.parametrize("text", [
    "name==other",
    "kind==active",
    'parent==""',
    "labels.missing",
    'labels."containerd.io/snapshot.ref"==sha256:abc,parent==""',
])
def test_not_matching(text: str) -> None:
    assert not matches(text), text


def test_several_filters_are_or() -> None:
    assert matches("kind==active", "kind==committed")
    assert not matches("kind==active", "kind==view")
    assert flt.match_any([], SNAP)


@pytest.mark.parametrize("text", [
    "name==",
    "name=",
    "name=>x",
    ",name==x",
    "name==x,",
    "=x",
    'name=="unterminated',
    "name==/x/",  # /.../ quoting only after ~=
    "name~=/(/",  # bad regexp
    'labels."a\\q"',  # bad escape
    'name=="ns\\/3"',  # only the enclosing quote may be escaped
    "name==a b",
])
def test_parse_errors_are_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid filter"):
        flt.parse(text)
