"""`isomax score`: a whole corpus through the service's decode, graph and verdict, offline.

- `inputs`: folders, file lists and globs -> one sorted list of paths;
- `decoding`: one file -> the graph's uint8 input, with the service's allow-list and limits
  (runs in the decode processes: imports the contract only);
- `scoring`: the bundle, loaded as the service loads it, and rows from the service's own
  result code (`service.classify.result_rows`, `Thresholds.judge`);
- `output`: parts written atomically, resumed by path;
- `local` and `ray_engine`: the two engines; `report`: the summary (text, JSON, PNG).

Users' documentation: docs/batch-scoring.md. Nothing here imports torch; the service never
imports this package (pyarrow and the rest come with the `[batch]` extra).
"""
