"""Client side of containerd's own API, for ``cvmfs-snap pull`` (and the CRI tests).

- :mod:`.client`: typed wrapper of containerd's gRPC services (content, images, leases, snapshots, diff), with the
  namespace/lease metadata and gRPC codes mapped to :mod:`cvmfs_snap.errors`
- :mod:`.registry`: the one place the pull talks to registries (on :mod:`cvmfs_snap.oci`)
- :mod:`.labels`: containerd's label conventions (GC references, CRI snapshot labels) and chain IDs
- :mod:`.unpack`: the pull itself, in the order containerd's unpacker uses, so remote snapshotters can skip layers
- :mod:`.progress`: terminal / log reporting; :mod:`.pull`: the ``cvmfs-snap pull`` command
"""
