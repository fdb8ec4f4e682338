"""MoGe prior sidecar of geometryd: a PyTorch process that reads frames from the daemon's shared-memory rings
and writes MoGe priors (points, mask) back into them. Run as `python -m moge_sidecar --socket PATH ...`."""
