"""clipheads.serving: run heads and bundles over HTTP and in batch jobs.

    front/       the HTTP front: config, errors, guard, OpenAPI, field checks, the endpoints
    encoder/     the process that holds the Runtime: continuous batching, atomic head swap
    runtimes/    one Runtime interface over ONNX Runtime, TensorRT, PyTorch (eager and folded)
    scoring/     batch scoring (`clipheads score`): one job model, local and Ray engines
    service.py   the BentoML services binding front/ and encoder/ (`clipheads.serving.service:ClipHeads`)
    cli.py       `clipheads serve`
    images.py    safe decoding of untrusted image bytes (front and scoring)
    tasks/       few-shot tasks registered at run time and their stores (directory, PostgreSQL)
    model_store.py  heads and bundles in BentoML's model store (`clipheads models`)
    model_entry.py  the layout of one stored entry (read by runtimes: a stored head's backbone weights)
    metrics.py   Prometheus metrics; bounded labels for BentoML's own
    drain.py     ordered shutdown of the two serving processes

Imports run one way: service -> {front, encoder} -> runtimes; scoring -> runtimes; everything may
use images, tasks, metrics.
"""
