"""Both configuration files go through cvmfs_snap.validation: a wrong value is an InvalidInputError naming the file,
the key (a dotted path) and what was expected; unknown keys are refused by the publisher and warned about by the
snapshotter (as the official snapshotter ignores them); a document that is not a mapping, or an empty file, is
handled plainly."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.snapshotter.config import Config, load_config, parse_config
from publisher.config import PublisherConfig


def _publisher(tmp_path: Path, text: str) -> str:
    p = tmp_path / "publisher.yaml"
    p.write_text(text)
    with pytest.raises(InvalidInputError) as ei:
        PublisherConfig.load(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: "), msg
    return msg.removeprefix(f"{p}: ")


@pytest.mark.parametrize(("text", "says"), [
    ("daemon:\n  workers: two\n", "daemon.workers: expected an integer >= 1, got 'two'"),
    ("concurrency: '2'\n", "concurrency: expected an integer >= 1, got '2'"),  # no quietly converted strings
    ("concurrency: true\n", "concurrency: expected an integer >= 1, got True"),
    ("skip_flat: 1\n", "skip_flat: expected true or false, got 1"),
    ("daemon:\n  poll_interval: 0\n", "daemon.poll_interval: expected a number > 0, got 0"),
    ("daemon:\n  debounce: soon\n", "daemon.debounce: expected a number >= 0, got 'soon'"),
    ("daemon:\n  listen: '8080'\n", "daemon.listen: expected host:port, e.g. 127.0.0.1:8080, got '8080'"),
    ("daemon:\n  publish_on_miss_allow: [a/*, 3]\n", "daemon.publish_on_miss_allow[1]: expected a string, got 3"),
    ("platforms: linux/amd64\n", "platforms: expected a list of strings, got 'linux/amd64'"),
    ("backend: nfs\n", "backend: expected one of 'local', 'cvmfs-ingest', 'cvmfs-transaction', got 'nfs'"),
    ("repo: 'my repo'\n", "repo: expected a CVMFS repository name such as unpacked.cern.ch, got 'my repo'"),
    ("lease_path: ../x\n", "lease_path: expected a relative path without '..', got '../x'"),
    ("limits:\n  max_expanded_size: -1\n", "limits.max_expanded_size: expected an integer >= 1 or null, got -1"),
    ("limits: [1]\n", "limits: expected a mapping, got [1]"),
    ("daemon: 3\n", "daemon: expected a mapping, got 3"),
])
def test_publisher_wrong_values_name_the_key_and_the_expectation(tmp_path: Path, text: str, says: str) -> None:
    assert _publisher(tmp_path, text) == says


def test_publisher_unknown_keys_are_refused_naming_the_known_ones(tmp_path: Path) -> None:
    msg = _publisher(tmp_path, "workers: 2\n")  # belongs under daemon:
    assert msg.startswith("workers: unknown setting; known here: backend, concurrency,") and "daemon" in msg
    msg = _publisher(tmp_path, "daemon:\n  worker: 2\n")
    assert msg.startswith("daemon.worker: unknown setting; known here: ") and "workers" in msg
    msg = _publisher(tmp_path, "limits:\n  max_dept: 2\n")
    assert msg.startswith("limits.max_dept: unknown setting; known here: ") and "max_depth" in msg


@pytest.mark.parametrize(("text", "says"), [
    ("[]\n", "expected a mapping of settings at the top level, got list []"),
    ("- backend: local\n", "expected a mapping of settings at the top level, got list [{'backend': 'local'}]"),
    ("just words\n", "expected a mapping of settings at the top level, got str 'just words'"),
])
def test_publisher_document_that_is_not_a_mapping(tmp_path: Path, text: str, says: str) -> None:
    assert _publisher(tmp_path, text) == says


@pytest.mark.parametrize("text", ["", "# only a comment\n", "daemon:\nlimits:\n"])
def test_publisher_empty_file_and_empty_tables_mean_defaults(tmp_path: Path, text: str) -> None:
    p = tmp_path / "publisher.yaml"
    p.write_text(text)
    assert PublisherConfig.load(p) == PublisherConfig()


def test_publisher_values_are_typed_and_secrets_never_echoed(tmp_path: Path) -> None:
    p = tmp_path / "publisher.yaml"
    p.write_text("concurrency: 3\ngrace_period_days: 2\ndaemon:\n  poll_interval: 60\n  webhook_secret: s3cret\n")
    c = PublisherConfig.load(p)
    assert c.concurrency == 3 and c.grace_period_days == 2.0 and c.daemon.poll_interval == 60.0
    assert c.daemon.webhook_secret == "s3cret"
    msg = _publisher(tmp_path, "daemon:\n  webhook_secret: 123456789\n")
    assert msg == "daemon.webhook_secret: expected a non-empty string or null" and "123456789" not in msg


def test_publisher_flags_are_checked_like_the_file() -> None:
    args = argparse.Namespace(concurrency=0)
    with pytest.raises(InvalidInputError, match=r"^command line: concurrency: expected an integer >= 1, got 0$"):
        PublisherConfig().apply_args(args)


# -- the snapshotter's TOML -------------------------------------------------------------------------------------------
def _snapshotter(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.toml"
    p.write_text(text)
    with pytest.raises(InvalidInputError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: "), msg
    return msg.removeprefix(f"{p}: ")


@pytest.mark.parametrize(("text", "says"), [
    ('repository = 5\n', "repository: expected a string, got 5"),
    ('[cvmfs-snap]\ngrpc-workers = "two"\n', "cvmfs-snap.grpc-workers: expected an integer >= 1, got 'two'"),
    ('[cvmfs-snap]\ngrpc-workers = 1.5\n', "cvmfs-snap.grpc-workers: expected an integer >= 1, got 1.5"),
    ('[cvmfs-snap]\nsources = "cvmfs"\n', "cvmfs-snap.sources: expected a list of strings, got 'cvmfs'"),
    ('cvmfs-snap = 5\n', "cvmfs-snap: expected a mapping, got 5"),
    ('[cvmfs-snap.lazy]\ncache-size = "lots"\n',
     'cvmfs-snap.lazy.cache-size: expected a size: a number of bytes or e.g. "4GiB", "512MiB", got \'lots\''),
    ('[cvmfs-snap.lazy]\nprefetch-bound = -1\n',
     'cvmfs-snap.lazy.prefetch-bound: expected a size: a number of bytes or e.g. "4GiB", "512MiB", got -1'),
    ('[cvmfs-snap.lazy]\nenabled = "no"\n', "cvmfs-snap.lazy.enabled: expected true or false, got 'no'"),
    ('[cvmfs-snap.lazy]\ncache-dir = "cache"\n', "cvmfs-snap.lazy.cache-dir: expected an absolute path (or empty), "
                                                 "got 'cache'"),
    ('[cvmfs-snap.source-options]\ncvmfs = 3\n', "cvmfs-snap.source-options.cvmfs: expected a mapping, got 3"),
])
def test_snapshotter_wrong_values_name_the_key_and_the_expectation(tmp_path: Path, text: str, says: str) -> None:
    assert _snapshotter(tmp_path, text) == says


def test_snapshotter_unknown_keys_are_warned_with_their_dotted_path(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "config.toml"
    p.write_text('repository = "sft.cern.ch"\nrepositry = "x"\n[cvmfs-snap]\ngrpc-worker = 3\n'
                 '[cvmfs-snap.lazy]\ncache-sise = "1GiB"\n[cvmfs-snap.lazzy]\nenabled = false\n')
    with caplog.at_level(logging.WARNING, logger="cvmfs_snap.snapshotter.config"):
        cfg = load_config(p)
    assert (cfg.repository, cfg.grpc_workers, cfg.lazy.cache_size) == ("sft.cern.ch", 16, Config().lazy.cache_size)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"{p}: unknown key {k!r} ignored" for k in (
        "repositry", "cvmfs-snap.grpc-worker", "cvmfs-snap.lazy.cache-sise", "cvmfs-snap.lazzy")]


def test_snapshotter_document_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"^config\.toml: expected a table of settings, got list \[\]$"):
        parse_config([], "config.toml")
    p = tmp_path / "list.toml"
    p.write_text("[]\n")  # not TOML at all: a table header needs a name
    with pytest.raises(InvalidInputError, match="is not valid TOML"):
        load_config(p)


@pytest.mark.parametrize("text", ["", "# nothing set\n", "[cvmfs-snap]\n[cvmfs-snap.lazy]\n"])
def test_snapshotter_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    p = tmp_path / "config.toml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg == Config(path=p)


def test_snapshotter_secrets_and_urls_are_never_echoed(tmp_path: Path) -> None:
    msg = _snapshotter(tmp_path, '[cvmfs-snap]\npublish-on-miss-secret = 123456789\n')
    assert msg == "cvmfs-snap.publish-on-miss-secret: expected a string"
    msg = _snapshotter(tmp_path, '[cvmfs-snap]\npublish-on-miss-url = "https://u:hunter2@s0.example/p"\n')
    assert msg.startswith("cvmfs-snap.publish-on-miss-url: expected a URL without credentials") and "hunter2" not in msg


def test_dates_do_not_pass_as_their_text(tmp_path: Path) -> None:
    """YAML and TOML dates are not JSON values: where a string is expected they are refused, not stringified."""
    assert _publisher(tmp_path, "state_dir: 2024-01-01\n") == (
        "state_dir: expected a string or null, got datetime.date(2024, 1, 1)")
    assert _publisher(tmp_path, "daemon:\n  webhook_secret: 2024-01-01\n") == (
        "daemon.webhook_secret: expected a non-empty string or null")  # a secret, even a silly one, is not shown
    assert _snapshotter(tmp_path, "repository = 1979-05-27\n") == (
        "repository: expected a string, got datetime.date(1979, 5, 27)")
    p = tmp_path / "unknown.toml"
    p.write_text("when = 1979-05-27\n")  # an unknown key stays a warning, whatever its value
    assert load_config(p).repository == "unpacked.cern.ch"


def test_snapshotter_values_are_stripped_sized_and_keys_under_free_mappings_found(tmp_path: Path) -> None:
    """What a type cannot say (a Check): strings stripped, sizes with units; a wrong value inside a free-form
    mapping is named by its own key, even one holding dots (msgspec's path says only ``[...]`` there)."""
    p = tmp_path / "config.toml"
    p.write_text('[cvmfs-snap]\nmetrics-address = " 127.0.0.1:9102 "\n[cvmfs-snap.lazy]\ncache-size = "2GiB"\n'
                 'prefetch-bound = 1024\n')
    cfg = load_config(p)
    assert (cfg.metrics_address, cfg.lazy.cache_size, cfg.lazy.prefetch_bound) == ("127.0.0.1:9102", 2 << 30, 1024)
    assert _snapshotter(tmp_path, '[cvmfs-snap.source-options]\ncvmfs = {}\n"a.b" = 3\n') == (
        "cvmfs-snap.source-options.a.b: expected a mapping, got 3")
    assert _snapshotter(tmp_path, '[cvmfs-snap]\nmetrics-address = "9102"\n') == (
        "cvmfs-snap.metrics-address: expected HOST:PORT (or empty: off), got '9102'")


ONE_LIBRARY = """
import json, sys
from cvmfs_snap.layout import ImageRecord
from cvmfs_snap.snapshotter.config import parse_config
from publisher.config import PublisherConfig
from publisher.recipe import Recipe
from publisher.webhooks import parse_webhook
parse_config({"cvmfs-snap": {"lazy": {"cache-size": "1GiB"}}})
PublisherConfig.from_dict({"daemon": {"workers": 3}, "limits": {"max_depth": 9}})
Recipe.parse("version: 1\\ninput: ['r.example/a:1']\\n")
parse_webhook(b'{"events": []}')
ImageRecord.from_json(json.dumps({"reference": "r", "manifest_digest": "d", "config_digest": "c", "layers": []}))
print(sorted({m.split(".")[0] for m in sys.modules} & {"pydantic", "pydantic_core", "msgspec", "annotated_types"}))
"""


def test_one_validation_library() -> None:
    """Every file the project reads is validated by msgspec (about 1 MiB resident; pydantic cost the snapshotter
    daemon 6-10 MiB): no part loads pydantic any more."""
    r = subprocess.run([sys.executable, "-c", ONE_LIBRARY], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[-2] == "['msgspec']"
