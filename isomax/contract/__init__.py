"""The contract between training and serving, in one torch-free place both sides import.

What callers use (each module's `__all__` names its public part; the rest is internal):

- `manifest`: the bundle manifest schema (what `isomax export` writes, what the service reads);
- `decode`: image bytes -> the graph's input, for serving and for training's image folders;
- `verdict`: the thresholds in force at an operating point (`Thresholds`), the one OOD rule;
- `drift`: the level buckets of the drift metrics, anchored to the manifest's calibration.

`structure` (bounds on a file's pieces) and `plain_png` (libspng's fast path for plain PNGs)
are `decode`'s parts; the service and the batch scorer call the fast path directly.

Users' documentation of the same: docs/bundle-format.md.
"""
