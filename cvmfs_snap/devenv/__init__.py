"""A local stand-in for the real world, for the demo (`cvmfs-snap demo`) and the tests: a loopback
`docker-registry`, a private containerd, and an image builder that needs no download.

Nothing here is used by the production daemons.
"""
