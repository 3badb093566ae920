"""cvmfs-snap publisher: publishes container image layers into a CVMFS repository (runs on the stratum-0).

Modules: ``recipe`` (DUCC recipe v1), ``config`` (settings), ``backends`` (how the tree gets written), ``pipeline``
(what gets written, in which order, concurrently), ``cli`` (the ``cvmfs-snap-publisher`` command), ``metrics``;
``gc`` builds on those, and the daemon (``loop``) on all of them: ``daemon`` (recipe watching, passes, workers),
``workqueue``, ``policy`` (what the recipe and the allow-list admit, in one spelling), ``intake`` (what a webhook or
publish-on-miss report queues), ``webhooks`` (payload parsing), ``httpapp`` (the ASGI endpoint) and ``httpserver``
(hypercorn, connection limits).
"""

from __future__ import annotations

from cvmfs_snap import __version__

__all__ = ["__version__"]
