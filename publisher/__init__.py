"""cvmfs-snap publisher: publishes container image layers into a CVMFS repository (runs on the stratum-0).

Modules: ``recipe`` (DUCC recipe v1), ``config`` (settings), ``backends`` (how the tree gets written), ``pipeline``
(what gets written, in which order, concurrently), ``cli`` (the ``cvmfs-snap-publisher`` command), ``metrics``;
``daemon``, ``webhooks`` and ``gc`` build on those.
"""

from __future__ import annotations

from cvmfs_snap import __version__

__all__ = ["__version__"]
