"""cvmfs-snap: container image layers served through CVMFS.

The shared core (OCI registry client, layer codecs, repository layout contract) and the node snapshotter.
"""

__version__ = "0.1.0"
