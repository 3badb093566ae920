"""The stratum-0 side of cvmfs-snap: wishlist -> CVMFS repository tree."""
