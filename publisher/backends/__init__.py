"""Publisher backends: ``local`` (a plain directory), ``cvmfs-ingest`` and ``cvmfs-transaction`` (``cvmfs_server``).

See :mod:`publisher.backends.base` for the interface every backend implements; :func:`publisher.factory.make_backend`
builds the configured one.
"""

from __future__ import annotations

from .base import Backend, LayerInfo, Txn

__all__ = ["Backend", "LayerInfo", "Txn"]
