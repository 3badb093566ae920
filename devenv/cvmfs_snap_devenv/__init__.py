"""cvmfs-snap's development harness (distribution ``cvmfs-snap-devenv``, in ``devenv/`` of the repository): a local
stand-in for the real world, for the demo (``cvmfs-snap demo``, :mod:`cvmfs_snap_devenv.demo`), the tests and the
benchmarks: a loopback ``docker-registry``, a private containerd, and an image builder that needs no download.

Nothing here is used by the production daemons, and no production install carries it (``pip install
cvmfs-snap[...]`` does not; ``scripts/install-deps`` installs it with ``pip install -e ./devenv``).
"""
