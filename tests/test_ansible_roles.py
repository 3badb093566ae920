"""The Ansible roles, run for real against localhost (local connection) into a temporary prefix: both roles via
site.yml, a second run that changes nothing, a check-mode run after a variable change that reports exactly that
change and writes nothing; then the programs are started from the rendered units' ExecStart lines and a real
containerd from the merged config, and an image is published and pulled through all of it.

No systemd here: ``*_manage_service: false``. The wheel is built from this checkout; pip installs the
dependencies into the role's virtualenv from the machine's configured package mirror.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from cvmfs_snap import fsutil
from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.containerd import CONTAINERD_BIN, Containerd
from cvmfs_snap_devenv.procs import stop_process, unmount_below
from cvmfs_snap_devenv.registry import Registry, free_port
from tests.support.playbooks import PlaybookRun, localhost_inventory, read_unit, run_playbook
from tests.support.publisher_env import FakeCvmfs, base_layer, make_fake_cvmfs
from tests.support.trees import TYPES, listing
from tests.support.wheel import build_wheel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SECRET = "webhook-secret-7f3a9c1e-never-printed"
PLUGIN = "cvmfs-snapshotter"
MIRROR = "https://mirror.site.example.org"


@dataclass
class Site:
    tmp: Path
    prefix: Path
    inventory: Path
    fake: FakeCvmfs
    registry: Registry
    image_ref: str
    image: im.BuiltImage
    listen_port: int
    containerd_dir: Path
    runs: dict[str, PlaybookRun]
    tree_before_check: dict[str, tuple[Any, ...]]
    tree_after_check: dict[str, tuple[Any, ...]]

    @property
    def etc(self) -> Path:
        return self.prefix / "etc"

    @property
    def venv(self) -> Path:
        return self.prefix / "opt" / "venv"

    @property
    def containerd_config(self) -> Path:
        return self.etc / "containerd" / "config.toml"

    @property
    def snapshotter_address(self) -> Path:
        return self.prefix / "run" / "s.sock"

    @property
    def snapshotter_root(self) -> Path:
        return self.prefix / "var" / "lib" / "snap"

    def unit(self, name: str) -> Path:
        return self.etc / "systemd" / "system" / name


def site_containerd_config(d: Path, registry: Registry) -> str:
    """A site's own containerd config (version 2) before the role: paths, CRI settings and registry mirrors."""
    return f"""\
version = 2
root = "{d}/root"
state = "{d}/state"

# the site's own settings: the role must keep every one of them
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  address = "{d}/c.sock.debug"
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "127.0.0.1:1/none:none"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/conf"
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["{MIRROR}"]
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry.host}"]
  endpoint = ["http://{registry.host}"]
"""


@pytest.fixture(scope="module")
def site(registry: Registry) -> Iterator[Site]:
    tmp = Path(tempfile.mkdtemp(prefix="ans-", dir="/tmp"))  # short: unix socket paths
    try:
        prefix = tmp / "p"
        wheel = build_wheel(tmp / "wheel")
        img = im.image([base_layer("ansible")])
        im.push_image(registry.url, "ansible/site", "v1", img)
        image_ref = registry.ref("ansible/site", "v1")
        fake = make_fake_cvmfs(tmp, repo="unpacked.test.ch")
        ctd = tmp / "ctd"
        (prefix / "etc" / "containerd").mkdir(parents=True)
        (prefix / "etc" / "containerd" / "config.toml").write_text(site_containerd_config(ctd, registry))
        port = free_port()
        variables: dict[str, Any] = {
            "cvmfs_snap_install_venv": f"{prefix}/opt/venv",
            "cvmfs_snap_install_wheel_dir": f"{prefix}/opt/wheels",
            "cvmfs_snap_install_wheel": str(wheel),
            "cvmfs_snap_install_python": sys.executable,
            "cvmfs_snap_install_manage_packages": False,
            # publisher: cvmfs-ingest through the recording cvmfs_server stand-in
            "cvmfs_snap_publisher_manage_service": False,
            "cvmfs_snap_publisher_config_dir": f"{prefix}/etc/cvmfs-snap",
            "cvmfs_snap_publisher_unit_dir": f"{prefix}/etc/systemd/system",
            "cvmfs_snap_publisher_cron_dir": f"{prefix}/etc/cron.d",
            "cvmfs_snap_publisher_backend": "cvmfs-ingest",
            "cvmfs_snap_publisher_repo": fake.repo,
            "cvmfs_snap_publisher_root": str(fake.root),
            "cvmfs_snap_publisher_cvmfs_server": fake.exe,
            "cvmfs_snap_publisher_state_dir": f"{prefix}/var/spool/cvmfs-snap",
            "cvmfs_snap_publisher_insecure_registries": [registry.host],
            "cvmfs_snap_publisher_listen": f"127.0.0.1:{port}",
            "cvmfs_snap_publisher_poll_interval": 3600,
            "cvmfs_snap_publisher_debounce": 0.2,
            "cvmfs_snap_publisher_skip_flat": True,
            "cvmfs_snap_publisher_recipe_images": [f"http://{image_ref}"],
            "cvmfs_snap_publisher_webhook_secret": SECRET,
            "cvmfs_snap_publisher_environment": {k: v for k, v in fake.env().items() if v},
            "cvmfs_snap_publisher_settings_extra": {"daemon": {"miss_cooldown": 61}},
            # snapshotter: the fake repository stands in for /cvmfs/<repo>
            "cvmfs_snap_snapshotter_manage_service": False,
            "cvmfs_snap_snapshotter_config_dir": f"{prefix}/etc/containerd-cvmfs-grpc",
            "cvmfs_snap_snapshotter_unit_dir": f"{prefix}/etc/systemd/system",
            "cvmfs_snap_snapshotter_containerd_config": f"{prefix}/etc/containerd/config.toml",
            "cvmfs_snap_snapshotter_address": f"{prefix}/run/s.sock",
            "cvmfs_snap_snapshotter_root": f"{prefix}/var/lib/snap",
            "cvmfs_snap_snapshotter_repository": fake.repo,
            "cvmfs_snap_snapshotter_absolute_mountpoint": str(fake.root),
            "cvmfs_snap_snapshotter_kubernetes": True,
            "cvmfs_snap_snapshotter_publish_on_miss_url": f"http://127.0.0.1:{port}/publish-on-miss",
            "cvmfs_snap_snapshotter_publish_on_miss_secret": SECRET,
            "cvmfs_snap_snapshotter_check_mounted": False,
            "cvmfs_snap_snapshotter_source_options": {"cvmfs": {"timeout": 5.0, "max-hanging-calls": 4}},
            "cvmfs_snap_snapshotter_registry_mirrors": {"quay.io": ["https://quay-mirror.site.example.org"]},
        }
        inventory = localhost_inventory(tmp / "inventory.yml", ["publishers", "nodes"], variables)
        runs = {"first": run_playbook("site.yml", inventory)}
        assert runs["first"].rc == 0, runs["first"].output[-6000:]
        runs["second"] = run_playbook("site.yml", inventory)
        before = listing(prefix, mtimes=TYPES, skip_names=["__pycache__"])
        changes = {"cvmfs_snap_publisher_workers": 3, "cvmfs_snap_snapshotter_grpc_workers": 8}
        runs["check"] = run_playbook("site.yml", inventory, "--check", "--diff", "-e", json.dumps(changes))
        after = listing(prefix, mtimes=TYPES, skip_names=["__pycache__"])
        yield Site(tmp, prefix, inventory, fake, registry, image_ref, img, port, ctd, runs, before, after)
    finally:
        unmount_below(tmp)
        fsutil.remove_tree_quietly(tmp)


# -- the three runs ------------------------------------------------------------------------------------------------
def test_first_run_installs_the_wheel_and_writes_every_file(site: Site) -> None:
    run = site.runs["first"]
    assert run.recap()["changed"] > 0 and run.recap()["failed"] == 0
    # the programs come from the virtualenv, installed from the wheel (not from this checkout)
    r = subprocess.run([str(site.venv / "bin" / "python"), "-c", "import cvmfs_snap, publisher; "
                        "print(cvmfs_snap.__file__); print(publisher.__file__)"],
                       capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, cwd=site.tmp, check=True)
    assert all(line.startswith(str(site.venv)) for line in r.stdout.split()), r.stdout
    assert list((site.prefix / "opt" / "wheels").glob("cvmfs_snap-*.whl"))
    modes = {
        "etc/cvmfs-snap/publisher.yaml": 0o640,
        "etc/cvmfs-snap/publisher.env": 0o600,
        "etc/cvmfs-snap/recipe.yaml": 0o644,
        "etc/containerd-cvmfs-grpc/config.toml": 0o644,
        "etc/containerd-cvmfs-grpc/publish-on-miss.secret": 0o600,
        "etc/systemd/system/cvmfs-snap-publisher.service": 0o644,
        "etc/systemd/system/cvmfs-snap-publisher-gc.service": 0o644,
        "etc/systemd/system/cvmfs-snap-publisher-gc.timer": 0o644,
        "etc/systemd/system/cvmfs-snap-snapshotter.service": 0o644,
    }
    for rel, mode in modes.items():
        assert (site.prefix / rel).stat().st_mode & 0o7777 == mode, rel
    # no cron file with the systemd scheduler; the site's containerd config before the merge is kept as a backup
    assert not (site.etc / "cron.d" / "cvmfs-snap-publisher-gc").exists()
    assert list((site.etc / "containerd").glob("config.toml.*~")), "the site's original config is kept as a backup"
    settings = yaml.safe_load((site.etc / "cvmfs-snap" / "publisher.yaml").read_text())
    assert "webhook_secret" not in settings.get("daemon", {})
    assert settings["backend"] == "cvmfs-ingest" and settings["repo"] == site.fake.repo
    assert settings["grace_period_days"] == 7
    assert settings["daemon"]["miss_cooldown"] == 61 and settings["daemon"]["workers"] == 2  # merged, not replaced
    snap = tomllib.loads((site.etc / "containerd-cvmfs-grpc" / "config.toml").read_text())
    assert snap["repository"] == site.fake.repo
    assert snap["cvmfs-snap"]["source-options"] == {"cvmfs": {"timeout": 5.0, "max-hanging-calls": 4}}


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)")
def test_rendered_units_pass_systemd_analyze_verify(site: Site) -> None:
    units = sorted(str(p) for p in (site.etc / "systemd" / "system").iterdir())
    assert len(units) == 4
    r = subprocess.run([str(SYSTEMD_ANALYZE), "verify", *units], capture_output=True, text=True, timeout=120)
    # it exits 0 on unknown keys and unparsable values, but says so: any line about our units is a failure
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "cvmfs-snap" in line]
    assert r.returncode == 0 and problems == [], r.stdout + r.stderr


def test_second_run_changes_nothing(site: Site) -> None:
    run = site.runs["second"]
    assert run.rc == 0, run.output[-4000:]
    assert run.changed() == []
    assert run.recap()["changed"] == 0
    assert run.handlers() == [], "nothing changed, so nothing is restarted"


def test_handlers_restart_only_what_changed(site: Site) -> None:
    """The first run notifies every restart; the check run (publisher and snapshotter settings changed) only those
    two, not containerd and no systemd reload. (Without systemd the handlers are notified and then skipped.)"""
    assert set(site.runs["first"].handlers()) == {
        "cvmfs_snap_publisher : Reload systemd for the cvmfs-snap publisher",
        "cvmfs_snap_publisher : Restart the cvmfs-snap publisher",
        "cvmfs_snap_snapshotter : Reload systemd for the cvmfs-snap snapshotter",
        "cvmfs_snap_snapshotter : Restart the cvmfs-snap snapshotter",
        "cvmfs_snap_snapshotter : Restart containerd for the cvmfs-snap snapshotter",
    }
    assert sorted(site.runs["check"].handlers()) == [
        "cvmfs_snap_publisher : Restart the cvmfs-snap publisher",
        "cvmfs_snap_snapshotter : Restart the cvmfs-snap snapshotter",
    ]


def test_check_mode_reports_exactly_the_change_and_writes_nothing(site: Site) -> None:
    run = site.runs["check"]
    assert run.rc == 0, run.output[-4000:]
    assert sorted(run.changed()) == [
        "cvmfs_snap_publisher : Write the publisher settings",
        "cvmfs_snap_snapshotter : Write the snapshotter configuration",
    ]
    assert run.recap()["changed"] == 2
    diffs = {f"{r['role']} : {r['task']}": json.dumps(r["diff"]) for r in run.results if r["changed"]}
    assert "workers: 3" in diffs["cvmfs_snap_publisher : Write the publisher settings"]
    assert "grpc-workers = 8" in diffs["cvmfs_snap_snapshotter : Write the snapshotter configuration"]
    assert site.tree_after_check == site.tree_before_check
    assert "workers: 2" in (site.etc / "cvmfs-snap" / "publisher.yaml").read_text()


def test_secrets_are_written_only_to_their_files(site: Site) -> None:
    for name, run in site.runs.items():
        assert SECRET not in run.output, name
        assert SECRET not in json.dumps(run.results), name
    assert f"CVMFS_SNAP_WEBHOOK_SECRET={SECRET}" in (site.etc / "cvmfs-snap" / "publisher.env").read_text()
    assert (site.etc / "containerd-cvmfs-grpc" / "publish-on-miss.secret").read_text().strip() == SECRET
    for rel in ("cvmfs-snap/publisher.yaml", "systemd/system/cvmfs-snap-publisher.service",
                "containerd-cvmfs-grpc/config.toml", "containerd/config.toml"):
        assert SECRET not in (site.etc / rel).read_text(), rel


def test_containerd_config_is_merged_not_overwritten(site: Site) -> None:
    before = tomllib.loads(site_containerd_config(site.containerd_dir, site.registry))
    after = tomllib.loads(site.containerd_config.read_text())
    assert after["proxy_plugins"][PLUGIN] == {"type": "snapshot", "address": str(site.snapshotter_address)}
    cri = after["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"] == {"default_runtime_name": "runc", "snapshotter": PLUGIN,
                                 "disable_snapshot_annotations": False}
    assert cri["registry"]["mirrors"].pop("quay.io") == {"endpoint": ["https://quay-mirror.site.example.org"]}
    # everything else exactly as the site had it
    del after["proxy_plugins"]
    del cri["containerd"]["snapshotter"], cri["containerd"]["disable_snapshot_annotations"]
    assert after == before


def test_check_mode_shows_an_upgrade_restart_and_a_switch_to_cron(site: Site, tmp_path: Path) -> None:
    """A new wheel (same version, other content) would be reinstalled and restart both programs (not containerd);
    GC moved from the systemd timer to cron would write the cron file and remove the GC units. Nothing written."""
    variables = yaml.safe_load(site.inventory.read_text())["all"]["vars"]
    upgraded = tmp_path / Path(variables["cvmfs_snap_install_wheel"]).name
    shutil.copyfile(variables["cvmfs_snap_install_wheel"], upgraded)
    with zipfile.ZipFile(upgraded, "a") as z:
        z.writestr("cvmfs_snap/_rebuilt.txt", "another build of the same version\n")
    before = listing(site.prefix, mtimes=TYPES, skip_names=["__pycache__"])
    run = run_playbook("site.yml", site.inventory, "--check", "--diff", "-e", json.dumps({
        "cvmfs_snap_install_wheel": str(upgraded), "cvmfs_snap_publisher_gc_scheduler": "cron"}))
    assert run.rc == 0, run.output[-4000:]
    changed = set(run.changed())
    assert {
        "cvmfs_snap_install : Copy the wheel to the target",
        "cvmfs_snap_install : Reinstall cvmfs-snap from the wheel file",
        "cvmfs_snap_publisher : Restart the publisher for the new cvmfs-snap package",
        "cvmfs_snap_snapshotter : Restart the snapshotter for the new cvmfs-snap package",
        "cvmfs_snap_publisher : Write the garbage collection cron file",
        "cvmfs_snap_publisher : Remove the garbage collection units when systemd does not run GC",
    } <= changed, changed
    assert not any("containerd" in c or "configuration" in c or "settings" in c for c in changed), changed
    cron = next(r for r in run.results if r["task"] == "Write the garbage collection cron file")
    assert f"15 3 * * * root {site.venv}/bin/cvmfs-snap-publisher gc --config" in json.dumps(cron["diff"])
    assert "Restart containerd for the cvmfs-snap snapshotter" not in " ".join(run.handlers())
    assert {"cvmfs_snap_publisher : Restart the cvmfs-snap publisher",
            "cvmfs_snap_snapshotter : Restart the cvmfs-snap snapshotter"} <= set(run.handlers())
    assert listing(site.prefix, mtimes=TYPES, skip_names=["__pycache__"]) == before


def test_install_from_the_package_index_sees_the_installed_package(site: Site) -> None:
    """Switched to the package index (no wheel), the installed cvmfs-snap satisfies the requirement: nothing
    would change and nothing restarts (check mode: the index is not reached)."""
    run = run_playbook("site.yml", site.inventory, "--check", "-e", json.dumps({
        "cvmfs_snap_install_wheel": "", "cvmfs_snap_install_package": "cvmfs-snap"}))
    assert run.rc == 0, run.output[-4000:]
    statuses = {r["status"] for r in run.results if r["task"] == "Install cvmfs-snap from the package index"}
    assert statuses == {"ok"}
    assert run.changed() == [] and run.handlers() == []


@pytest.mark.parametrize(("tag", "change", "task", "message", "path"), [
    ("publisher", {"cvmfs_snap_publisher_workers": 0}, "Write the publisher settings",
     "daemon.workers: expected an integer >= 1, got 0", "cvmfs-snap/publisher.yaml"),
    ("nodes", {"cvmfs_snap_snapshotter_publish_on_miss_url": "http://user:pw@stratum0.example.org/publish-on-miss"},
     "Write the snapshotter configuration", "expected a URL without credentials", "containerd-cvmfs-grpc/config.toml"),
    ("publisher", {"cvmfs_snap_publisher_backend": "ftp"}, "ansible.builtin.validate_argument_spec",
     "cvmfs_snap_publisher_backend must be one of", "cvmfs-snap/publisher.yaml"),
])
def test_unusable_settings_are_refused_and_nothing_is_replaced(site: Site, tag: str, change: dict[str, Any],
                                                               task: str, message: str, path: str) -> None:
    """The programs' own loaders check each settings file before it replaces the old one (argument_specs check
    types and choices even before that); the message is the one the daemon would give."""
    before = listing(site.prefix, mtimes=TYPES, skip_names=["__pycache__"])
    run = run_playbook("site.yml", site.inventory, "--tags", tag, "-e", json.dumps(change))
    assert run.rc != 0
    (failure,) = run.failed()
    assert task in (failure["task"], failure["action"]), failure
    assert message in json.dumps(failure), failure
    assert listing(site.prefix, mtimes=TYPES, skip_names=["__pycache__"]) == before
    assert "pw@" not in (site.etc / path).read_text()


def test_check_mode_on_a_new_host_writes_nothing(site: Site, tmp_path: Path) -> None:
    """--check --diff before anything is installed: every file is reported, nothing is created."""
    prefix = tmp_path / "new"
    variables = yaml.safe_load(site.inventory.read_text())["all"]["vars"]
    fresh = {k: (v.replace(str(site.prefix), str(prefix)) if isinstance(v, str) else v) for k, v in variables.items()}
    inventory = localhost_inventory(tmp_path / "inventory.yml", ["publishers", "nodes"], fresh)
    run = run_playbook("site.yml", inventory, "--check", "--diff")
    assert run.rc == 0, run.output[-4000:]
    changed = set(run.changed())
    assert {"cvmfs_snap_install : Copy the wheel to the target",
            "cvmfs_snap_publisher : Write the publisher settings",
            "cvmfs_snap_publisher : Write the daemon's systemd unit",
            "cvmfs_snap_snapshotter : Write the snapshotter configuration",
            "cvmfs_snap_snapshotter : Merge the proxy plugin and CRI settings into containerd's config"} <= changed
    merge = next(r for r in run.results if r["task"].startswith("Merge the proxy plugin"))
    assert "cvmfs-snapshotter" in json.dumps(merge["diff"])
    assert not prefix.exists()
    assert SECRET not in run.output


# -- the programs, started from the rendered units -------------------------------------------------------------------
@dataclass
class Services:
    publisher: subprocess.Popen[bytes]
    publisher_url: str
    snapshotter: subprocess.Popen[bytes]
    containerd: Containerd
    logs: Path


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, check: Any, procs: list[subprocess.Popen[bytes]], logs: Path, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}: "
                                     + "".join(f.read_text()[-2000:] for f in logs.glob("*.log")))
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: "
                                 + "".join(f.read_text()[-2000:] for f in logs.glob("*.log")))
        time.sleep(0.2)


def _socket_answers(address: Path) -> bool:
    if not address.exists():
        return False
    ch = grpc.insecure_channel(f"unix:{address}")
    try:
        grpc.channel_ready_future(ch).result(timeout=2)
        list(snapshots_pb2_grpc.SnapshotsStub(ch).List(snapshots_pb2.ListSnapshotsRequest(), timeout=5))
        return True
    except (grpc.FutureTimeoutError, grpc.RpcError):
        return False
    finally:
        ch.close()


def _healthz(url: str) -> dict[str, Any] | None:
    try:
        r = httpx.get(f"{url}/healthz", timeout=2)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
def services(site: Site) -> Iterator[Services]:
    logs = site.tmp / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    cd: Containerd | None = None
    try:
        pub_unit = read_unit(site.unit("cvmfs-snap-publisher.service"))
        publisher = _start(pub_unit.exec_start, pub_unit.env(), logs / "publisher.log")
        procs.append(publisher)
        snap_unit = read_unit(site.unit("cvmfs-snap-snapshotter.service"))
        snapshotter = _start(snap_unit.exec_start, snap_unit.env(), logs / "snapshotter.log")
        procs.append(snapshotter)
        url = f"http://127.0.0.1:{site.listen_port}"
        _wait("the publisher's /healthz", lambda: _healthz(url), procs, logs)
        _wait("the snapshotter's socket", lambda: _socket_answers(site.snapshotter_address), procs, logs)
        ctd_proc = _start([CONTAINERD_BIN, "--config", str(site.containerd_config)], dict(os.environ),
                          logs / "containerd.log")
        procs.append(ctd_proc)
        cd = Containerd(root=site.containerd_dir, address=str(site.containerd_dir / "c.sock"), proc=ctd_proc,
                        log=logs / "containerd.log")
        _wait("containerd", lambda: cd is not None and os.path.exists(cd.address)
              and cd.ctr("version", check=False, timeout=10).returncode == 0, procs, logs)
        yield Services(publisher, url, snapshotter, cd, logs)
    finally:
        for p in reversed(procs):
            stop_process(p, timeout=20)
        unmount_below(site.tmp)


def test_publisher_from_its_unit_answers_healthz_and_requires_the_secret(site: Site, services: Services) -> None:
    health = _healthz(services.publisher_url)
    assert health == {"status": "ok", "recipe_error": None}
    body = {"events": []}
    assert httpx.post(f"{services.publisher_url}/webhooks/registry", json=body, timeout=5).status_code == 401
    ok = httpx.post(f"{services.publisher_url}/webhooks/registry", json=body, timeout=5,
                    headers={"Authorization": f"Bearer {SECRET}"})
    assert ok.status_code == 200, ok.text


def _wait_published(site: Site, services: Services) -> None:
    host, rest = site.image_ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    image_json = site.fake.root / ".metadata" / host / f"{repo}:{tag}" / "image.json"
    _wait("the recipe's image to be published", image_json.exists, [services.publisher], services.logs, 120)


def test_publisher_from_its_unit_publishes_the_recipe_through_cvmfs_server(site: Site, services: Services) -> None:
    _wait_published(site, services)
    ingests = [c for c in site.fake.commands() if c[0] == "ingest"]
    assert len(ingests) == len(site.image.layers), site.fake.commands()
    assert site.fake.violations() == ""


def test_snapshotter_from_its_unit_answers_on_its_socket(site: Site, services: Services) -> None:
    assert _socket_answers(site.snapshotter_address)
    assert site.snapshotter_address.stat().st_mode & 0o777 == 0o600


def test_containerd_runs_with_the_merged_config_and_keeps_the_site_mirror(site: Site, services: Services) -> None:
    cd = services.containerd
    plugins = cd.ctr("plugins", "ls").stdout
    line = next(x for x in plugins.splitlines() if PLUGIN in x)
    assert "io.containerd.snapshotter.v1" in line and line.split()[-1] == "ok", plugins
    cri = next(x for x in plugins.splitlines() if "io.containerd.grpc.v1" in x and " cri " in f" {x} ")
    assert cri.split()[-1] == "ok", plugins
    # containerd's effective configuration has the site's mirror and our CRI settings
    dump = subprocess.run([CONTAINERD_BIN, "--config", str(site.containerd_config), "config", "dump"],
                          capture_output=True, text=True, check=True).stdout
    effective = tomllib.loads(dump)["plugins"]["io.containerd.grpc.v1.cri"]
    assert effective["registry"]["mirrors"]["docker.io"]["endpoint"] == [MIRROR]
    assert effective["containerd"]["snapshotter"] == PLUGIN
    assert effective["containerd"]["disable_snapshot_annotations"] is False
    # containerd reaches our snapshotter through the proxy plugin
    assert cd.ctr("snapshots", "--snapshotter", PLUGIN, "ls").returncode == 0


def test_pull_through_the_rendered_setup_serves_the_layer_from_cvmfs(site: Site, services: Services) -> None:
    _wait_published(site, services)
    cvmfs_snap = str(site.venv / "bin" / "cvmfs-snap")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([cvmfs_snap, "pull", "--address", services.containerd.address, "--snapshotter", PLUGIN,
                        "--plain-http", "--json", site.image_ref], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    status = subprocess.run([cvmfs_snap, "status", "--root", str(site.snapshotter_root), "--json"],
                            capture_output=True, text=True, env=env, check=True)
    counts = json.loads(status.stdout)["counts"]
    assert counts["committed_by_source"] == {"cvmfs": len(site.image.layers)}, status.stdout


def test_verify_playbook_checks_the_running_services(site: Site, services: Services) -> None:
    run = run_playbook("verify.yml", site.inventory)
    assert run.rc == 0, run.output[-4000:]
    assert run.changed() == []
    checked = {r["task"] for r in run.results if r["status"] == "ok"}
    assert {"Wait for the publisher's /healthz", "Check that the recipe was read",
            "Check that the snapshotter answers and the repository is mounted"} <= checked
    # and it fails when the node is not healthy: a socket nobody answers on, a repository that is not mounted
    bad = run_playbook("verify.yml", site.inventory, "--tags", "nodes", "-e", json.dumps({
        "cvmfs_snap_snapshotter_address": str(site.tmp / "nobody.sock"), "cvmfs_snap_snapshotter_check_timeout": 2}))
    assert bad.rc != 0
    assert any("does not answer" in (r["msg"] or "") for r in bad.failed()), bad.output[-3000:]
    unmounted = run_playbook("verify.yml", site.inventory, "--tags", "nodes", "-e", json.dumps({
        "cvmfs_snap_snapshotter_check_mounted": True}))
    assert unmounted.rc != 0
    assert any("is not a mount point" in (r["msg"] or "") for r in unmounted.failed()), unmounted.output[-3000:]


def test_gc_unit_runs_with_the_rendered_settings(site: Site, services: Services) -> None:
    unit = read_unit(site.unit("cvmfs-snap-publisher-gc.service"))
    assert unit.settings["Type"] == ["oneshot"]
    assert "--recipe" in unit.exec_start
    r = subprocess.run([*unit.exec_start, "--dry-run"], env=unit.env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "gc:" in r.stdout + r.stderr


def test_rolling_update_stops_at_the_first_unhealthy_batch(site: Site, services: Services, tmp_path: Path) -> None:
    """site.yml's node play in batches of one host with no failure allowed: the healthy first node is updated and
    checked, the second fails its health check (its socket does not answer), the third is never touched."""
    variables = yaml.safe_load(site.inventory.read_text())["all"]["vars"]
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
             "cvmfs_snap_snapshotter_health_check": "always"}
    node = {k: v for k, v in variables.items() if k.startswith(("cvmfs_snap_install_", "cvmfs_snap_snapshotter_"))}

    def elsewhere(prefix: Path) -> dict[str, Any]:
        moved = {k: (v.replace(str(site.prefix), str(prefix)) if isinstance(v, str) and k.startswith(
            "cvmfs_snap_snapshotter_") else v) for k, v in node.items()}
        return {**moved, **local}

    bad = {**elsewhere(tmp_path / "b"), "cvmfs_snap_snapshotter_address": str(tmp_path / "b" / "nobody.sock"),
           "cvmfs_snap_snapshotter_check_timeout": 2}
    hosts = {"node-good": {**node, **local}, "node-bad": bad, "node-third": elsewhere(tmp_path / "c")}
    inventory = tmp_path / "rolling.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"publishers": {"hosts": {}},
                                                              "nodes": {"hosts": hosts}}}}, sort_keys=False))
    run = run_playbook("site.yml", inventory, "-e", json.dumps({
        "cvmfs_snap_rollout_batch": 1, "cvmfs_snap_rollout_max_fail_percentage": 0}))
    assert run.rc != 0
    by_host: dict[str, list[dict[str, Any]]] = {}
    for r in run.results:
        by_host.setdefault(r["host"], []).append(r)
    assert list(by_host) == ["node-good", "node-bad"], list(by_host)
    checks = {h: [r["status"] for r in rs if r["task"] == "Check that the snapshotter answers and the repository "
                  "is mounted"] for h, rs in by_host.items()}
    assert checks == {"node-good": ["ok"], "node-bad": ["failed"]}
    assert [r for r in by_host["node-good"] if r["changed"]] == []
    assert not (tmp_path / "c").exists()
