"""The encoder: the process that holds the Runtime.

    heads.py     the serving head and its atomic swap (load + warm beside, swap between passes)
    batching.py  continuous batching over the serving head, failure isolation per image

The BentoML service class (`Encoder`) that exposes them to the front lives in serving/service.py.
"""
