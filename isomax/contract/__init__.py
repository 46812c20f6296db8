"""The contract between training and serving, in one torch-free place both sides import.

- `manifest`: the bundle manifest schema (what `isomax export` writes, what the service reads);
- `decode`: image bytes -> the graph's input, for serving and for training's image folders;
- `verdict`: the thresholds in force at an operating point, and `is_ood`.

Users' documentation of the same: docs/bundle-format.md.
"""
