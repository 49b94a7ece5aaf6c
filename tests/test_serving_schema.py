"""B5 #18: API conformance under generated inputs (schemathesis on /docs.json, in-process ASGI).

The whole service (GuardMiddleware + ClipHeads + an in-process Encoder on the micro test head) runs
in this process; schemathesis generates requests from the served OpenAPI document and checks that
no response is a 5xx, that every status code is documented and that each body matches its schema.
`CLIPHEADS_SCHEMA_EXAMPLES` (default 20) caps the examples per operation.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("bentoml")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

REPO = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = int(os.environ.get("CLIPHEADS_SCHEMA_EXAMPLES", "20"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = ["POST /classify", "POST /zero_shot", "POST /tasks", "POST /tasks/list", "POST /tasks/delete",
              "GET /tasks", "DELETE /tasks/{name}", "GET /livez"]  # /metrics needs the server's Prometheus dir


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("CLIPHEADS_MODEL_CONFIGS", "CLIPHEADS_ORT_SPIN")}
    os.environ["CLIPHEADS_MODEL_CONFIGS"] = str(REPO / "tests" / "model_configs")
    import clipheads.serving.service as svc
    from starlette.testclient import TestClient
    from test_serving import make_micro_head

    head = make_micro_head(tmp_path_factory.mktemp("schema"))
    old = svc.CONFIG
    svc.CONFIG = svc.ServeConfig(source=str(head), max_body_bytes=2 * 1024 * 1024, timeout_s=20)
    try:
        app = svc.ClipHeads.to_asgi()
        with TestClient(app) as c:  # the documented paths must include the REST aliases
            paths = c.get("/docs.json").json()["paths"]
        assert {"/classify", "/zero_shot", "/tasks", "/tasks/{name}", "/tasks/list", "/tasks/delete"} <= set(paths)
        schema = schemathesis.openapi.from_asgi("/docs.json", app)
        yield schema, {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    finally:
        svc.CONFIG = old
        for k, v in saved.items():  # the in-process Encoder sets defaults; keep other tests clean
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_conform(api, label):
    schema, ops = api
    op = ops[label]
    ready_deadline = time.time() + 30

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=op.as_strategy())
    def check(case):
        response = case.call()
        while response.status_code == 503 and time.time() < ready_deadline:  # still warming up
            time.sleep(0.1)
            response = case.call()
        case.validate_response(response, checks=CHECKS)

    check()
