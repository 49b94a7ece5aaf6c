"""The HTTP front: everything between a client's request and the encoder.

    config.py    ServeConfig (every CLIPHEADS_* knob) and the route sets
    errors.py    the {"error", "detail"} contract: ApiError, ERROR_CODES
    guard.py     GuardMiddleware: auth, caps, backpressure, timeout, before BentoML parses anything
    body.py      reading a body: its deadline (408), byte caps, the JSON shape and depth
    reshape.py   the libraries' own error answers rewritten into {"error", "detail"}
    http_layer.py  uvicorn's 400 for unparseable HTTP with our body
    openapi.py   the served OpenAPI document, made true to our answers
    validate.py  request-field checks (images, labels, templates, top_k, reload source)
    labels.py, templates.py  the label and template rules (Predictor applies them too)
    store_calls.py  the task store's calls off the event loop, each bounded in time (503 after)
    core.py      Front: readiness, the encoder client, decoding, the answer wrapper
    routes.py    the endpoints' bodies (classify, zero_shot, tasks, reload)

The BentoML service class (`ClipHeads`) that binds routes.py to HTTP lives in serving/service.py.
Imports run one way: routes -> core, validate -> labels, templates, errors, config; core -> store_calls; guard -> body, reshape, openapi -> errors, config.
"""
