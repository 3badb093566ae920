"""Lazy eStargz layers: fetched from the registry chunk by chunk as containers read them (issue 9, docs/lazy.md).

- :mod:`cvmfs_snap.lazyfs.remote`: compressed ranges of one blob (merging, single-flight, retries, fallbacks);
- :mod:`cvmfs_snap.lazyfs.cache`: the node-local chunk cache (size bound, LRU, crash-safe, per-layer references);
- :mod:`cvmfs_snap.lazyfs.reader`: verified file reads of one layer, prefetch and background fetch;
- :mod:`cvmfs_snap.lazyfs.metrics`: their Prometheus metrics.
"""
