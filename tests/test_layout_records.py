"""The layout's JSON records are validated one way (cvmfs_snap.validation): a malformed record is a clear
InvalidInputError naming the record, the key and the expected type, never a traceback."""

from __future__ import annotations

import json

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layout import ImageRecord, LayerRecord

D = "sha256:" + "a" * 64
IMAGE = {"reference": "r.example.org/a:1", "manifest_digest": D, "config_digest": D, "layers": [D]}
LAYER = {"digest": D, "diff_id": D, "media_type": "m", "compressed_size": 1, "uncompressed_size": 2, "entries": 3}


@pytest.mark.parametrize(("text", "says"), [
    ("[]", "malformed image.json: expected a JSON object, got list"),
    ("nope", "malformed image.json: Expecting value"),
    (json.dumps({**IMAGE, "layers": "x"}), "malformed image.json: layers: expected a list of strings, got 'x'"),
    (json.dumps({**IMAGE, "reference": 7}), "malformed image.json: reference: expected a string, got 7"),
    (json.dumps({k: v for k, v in IMAGE.items() if k != "config_digest"}), "config_digest: missing"),
])
def test_malformed_image_json(text: str, says: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        ImageRecord.from_json(text)
    assert says in str(info.value)


def test_image_json_round_trip_ignores_unknown_keys() -> None:
    rec = ImageRecord.from_json(json.dumps({**IMAGE, "future_key": 1}))
    assert rec.layers == [D] and ImageRecord.from_json(rec.to_json()) == rec


@pytest.mark.parametrize(("data", "says"), [
    ({**LAYER, "whiteouts": "no"}, "malformed layer.json: whiteouts: expected a list of strings, got 'no'"),
    ({**LAYER, "entries": "many"}, "malformed layer.json: entries: expected an integer, got 'many'"),
    ({**LAYER, "digest": "md5:x"}, "only sha256 layers can be served"),
    ({**LAYER, "version": 99}, "newer than this cvmfs-snap understands"),
    ([LAYER], "malformed layer.json: expected a JSON object, got list"),
])
def test_malformed_layer_json(data: object, says: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        LayerRecord.from_json(json.dumps(data))
    assert says in str(info.value)
