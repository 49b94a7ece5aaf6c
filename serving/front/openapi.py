"""BentoML's OpenAPI document, made true to what the service answers: our `{"error", "detail"}`
body and status codes on every API route, 201 for POST /tasks, the REST aliases, and admin routes
only when they are enabled."""
from __future__ import annotations

import json

from .config import ADMIN_ROUTES, API_ROUTES
from .errors import ERROR_CODES


def patch_openapi(doc: dict, admin: bool = False) -> dict:
    """Document our `{"error", "detail"}` bodies and status codes on every API route; admin routes
    only when they are enabled."""
    doc.setdefault("components", {}).setdefault("schemas", {})["ClipheadsError"] = {
        "type": "object", "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    }
    err = {"application/json": {"schema": {"$ref": "#/components/schemas/ClipheadsError"}}}
    if not admin:
        for route in ADMIN_ROUTES:
            doc.get("paths", {}).pop(route, None)
    for route in API_ROUTES | (ADMIN_ROUTES if admin else set()):
        op = doc.get("paths", {}).get(route, {}).get("post")
        if op is None:
            continue
        responses = op.setdefault("responses", {})
        for code, what in ERROR_CODES.items():
            responses[code] = {"description": what, "content": err}
        if route == "/tasks":
            responses["201"] = {"description": "task registered", "content": responses.pop("200")["content"]}
    paths = doc.get("paths", {})
    if "/tasks/list" in paths:
        listing = json.loads(json.dumps(paths["/tasks/list"]["post"]))
        listing.pop("requestBody", None)
        listing["operationId"] = "rest_list_tasks"
        paths["/tasks"] = dict(paths.get("/tasks", {}), get=listing)
    if "/tasks/delete" in paths:
        deleting = json.loads(json.dumps(paths["/tasks/delete"]["post"]))
        deleting.pop("requestBody", None)
        deleting["operationId"] = "rest_delete_task"
        deleting["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
        paths["/tasks/{name}"] = {"delete": deleting}
    return doc
