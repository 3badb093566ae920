"""Lazy eStargz layers: fetched from the registry chunk by chunk as containers read them (issue 9, docs/lazy.md).

- :mod:`cvmfs_snap.lazyfs.remote`: compressed ranges of one blob (merging, single-flight, retries, fallbacks);
- :mod:`cvmfs_snap.lazyfs.cache`: the node-local chunk cache (size bound, LRU, crash-safe, per-layer references);
- :mod:`cvmfs_snap.lazyfs.reader`: verified file reads of one layer, prefetch and background fetch;
- :mod:`cvmfs_snap.lazyfs.metrics`: their Prometheus metrics;
- :mod:`cvmfs_snap.lazyfs.tree`: a layer's TOC as an immutable inode tree, as overlayfs expects a layer directory;
- :mod:`cvmfs_snap.lazyfs.fs`: the ONE FUSE mount's file system, a directory per layer;
- :mod:`cvmfs_snap.lazyfs.fuse`: the FUSE kernel protocol (our own loop: no-open mode, cached listings);
- :mod:`cvmfs_snap.lazyfs.unpack`: the node-local unpacked copy of a completely fetched layer;
- :mod:`cvmfs_snap.lazyfs.control`: the control protocol and its blocking client (no trio: the daemon imports it);
- :mod:`cvmfs_snap.lazyfs.controlserver`: its server half, on trio;
- :mod:`cvmfs_snap.lazyfs.process` and :mod:`~cvmfs_snap.lazyfs.command`: the ``cvmfs-snap lazyfs`` process.
"""
