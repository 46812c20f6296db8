"""The Open Inference Protocol (KServe v2 REST, with Triton's binary tensor extension).

The same models, batcher, limits, verdict and metrics as POST /classify, spoken in the protocol
that KServe's and Triton's clients (`tritonclient.http`, ...) use:

- `tensors.py`: v2 tensors on the wire (JSON data, binary data, datatypes) <-> numpy;
- `infer.py`: one inference request -> model input -> batcher -> output tensors;
- `routes.py`: the HTTP routes (health, metadata, infer) and their error answers.
"""
