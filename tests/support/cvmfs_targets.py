"""Where the cvmfs backend tests publish: the recording stand-in, or a real stratum-0 when this machine has one.

The real one is what /work/shared/tools/real-cvmfs/setup.sh builds: ``/usr/bin/cvmfs_server``, repositories
``test.local`` (for the cvmfs-ingest backend) and ``tx.local`` (cvmfs-transaction), each mounted at
``/cvmfs/<repo>`` on the stratum-0 and, as on a worker node, at ``/mnt/cvmfs-client/<repo>``. Tests on the real
server publish images with unique content, so runs never collide with what earlier runs left there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_snap.layout import CVMFS_MOUNT_ROOT
from publisher.backends.cvmfs import CvmfsBackend, CvmfsIngestBackend, CvmfsTransactionBackend
from publisher.backends.cvmfs_server import SERVER_CONF
from tests.support.publisher_env import FakeCvmfs, make_fake_cvmfs

REAL_CVMFS_SERVER = Path("/usr/bin/cvmfs_server")
REAL_REPOS = {"cvmfs-ingest": "test.local", "cvmfs-transaction": "tx.local"}
CLIENT_MOUNTS = Path("/mnt/cvmfs-client")


def real_unavailable(repo: str) -> str | None:
    """Why the real stratum-0 cannot be used for ``repo`` here, or None."""
    if not REAL_CVMFS_SERVER.is_file():
        return f"no real CernVM-FS server here ({REAL_CVMFS_SERVER} missing; see /work/shared/tools/real-cvmfs)"
    if os.geteuid() != 0:
        return "the real cvmfs_server needs root"
    if not Path(SERVER_CONF.format(repo=repo)).is_file():
        return f"repository {repo} does not exist on this stratum-0 (cvmfs_server mkfs {repo})"
    if not (CVMFS_MOUNT_ROOT / repo / "new_repository").exists():
        return f"/cvmfs/{repo} is not mounted (cvmfs_server mount {repo})"
    return None


@dataclass
class Target:
    """One repository to publish into, with the backend class to drive it."""

    kind: str  # "fake" or "real"
    backend_name: str
    repo: str
    root: Path
    exe: str
    state_dir: Path
    fake: FakeCvmfs | None = None

    @property
    def real(self) -> bool:
        return self.kind == "real"

    def backend(self, **kwargs: object) -> CvmfsBackend:
        cls = CvmfsIngestBackend if self.backend_name == "cvmfs-ingest" else CvmfsTransactionBackend
        server_conf = self.fake.server_conf if self.fake is not None else None
        return cls(self.root, self.repo, cvmfs_server=self.exe, state_dir=self.state_dir,
                   server_conf=server_conf, **kwargs)  # type: ignore[arg-type]

    def client_path(self) -> Path:
        """The repository as a node sees it: the client mount (real, after a remount) or the tree itself."""
        if not self.real:
            return self.root
        if shutil.which("cvmfs_talk"):
            subprocess.run(["cvmfs_talk", "-i", self.repo, "remount", "sync"], capture_output=True, timeout=120,
                           check=False)
        return CLIENT_MOUNTS / self.repo


def make_target(kind: str, backend_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    if kind == "fake":
        fake = make_fake_cvmfs(tmp_path)
        fake.apply_env(monkeypatch)
        return Target("fake", backend_name, fake.repo, fake.root, fake.exe, tmp_path / "publisher-state", fake)
    repo = REAL_REPOS[backend_name]
    why = real_unavailable(repo)
    if why:
        pytest.skip(why)
    return Target("real", backend_name, repo, CVMFS_MOUNT_ROOT / repo, str(REAL_CVMFS_SERVER),
                  tmp_path / "publisher-state")
