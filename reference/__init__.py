"""PyTorch oracles that follow upstream's code; used by the parity tests and by the benchmarks' torch side.

- :mod:`reference.pipeline`: the GeometryCrafter pipeline (spec 4) on diffusers/transformers networks;
- :mod:`reference.point_map_vae`: the point-map VAE (spec 2.2) from diffusers building blocks, and
  :func:`reference.point_map_vae.load_torch_point_map_vae` (strict load from a model folder);
- :mod:`reference.glue`: the literal 0.1.0 host glue (whole-array formulas, dense-matrix resizes).

Not shipped (pyproject's package find includes ``daemon*`` and ``moge_sidecar*`` only); imports torch and
diffusers, which only the test requirements pin.
"""
