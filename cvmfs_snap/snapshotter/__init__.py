"""The node snapshotter: a containerd remote snapshotter (gRPC proxy plugin) serving layers from CVMFS."""
