"""``openapi.yaml``: served at ``GET /openapi.yaml`` and in step with the route table.

The schemathesis run (test_schemathesis.py) checks the server against the
document; this checks that the document covers exactly the routes the server
has, with bearer security exactly where API.md asks for it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from handlers import ops, routes

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


def _route_table() -> dict[tuple[str, str], str]:
    """(METHOD, path) -> route name, from the real route setup."""
    app = web.Application()
    routes.setup(app)
    out = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        out[(route.method, path)] = route.name
    return out


def _spec_operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def test_spec_covers_exactly_the_routes(spec: dict[str, Any]) -> None:
    assert set(_spec_operations(spec)) == set(_route_table())


def test_bearer_security_except_public_routes(spec: dict[str, Any]) -> None:
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    table = _route_table()
    for key, op in _spec_operations(spec).items():
        public = table[key] in routes.PUBLIC_ROUTES
        assert (op.get("security") == []) == public, key


def test_every_response_documents_request_id(spec: dict[str, Any]) -> None:
    components = spec["components"]["responses"]
    for key, op in _spec_operations(spec).items():
        for status, resp in op["responses"].items():
            if "$ref" in resp:
                resp = components[resp["$ref"].rsplit("/", 1)[1]]
            assert "X-Request-ID" in resp.get("headers", {}), (key, status)
            if status in ("429", "503") and key[1] != "/readyz":
                codes = _codes(spec, resp)
                if codes & {"too_many_attempts", "audit_unavailable"} and "sink_unavailable" \
                        not in codes:
                    assert "Retry-After" in resp["headers"], (key, status)


def _codes(spec: dict[str, Any], resp: dict[str, Any]) -> set[str]:
    schema = resp["content"]["application/json"]["schema"]
    name = schema["$ref"].rsplit("/", 1)[1]
    narrowed = spec["components"]["schemas"][name]["allOf"][1]
    return set(narrowed["properties"]["error"]["properties"]["code"]["enum"])


def test_error_codes_are_api_md_codes(spec: dict[str, Any]) -> None:
    """Every code the spec names is in ErrorCode, and ErrorCode is what API.md lists."""
    api_md = Path("/work/shared/API.md")
    codes = set(spec["components"]["schemas"]["ErrorCode"]["enum"])
    for name, schema in spec["components"]["schemas"].items():
        if name.startswith("Error") and "allOf" in schema:
            assert set(schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]) \
                <= codes, name
    if api_md.exists():  # the shared contract, when this checkout sits beside it
        text = api_md.read_text(encoding="utf-8")
        # sink_unavailable is the server's own addition for an unreachable sink.
        for code in codes - {"sink_unavailable"}:
            assert re.search(rf"`{code}`", text), code


async def test_served_at_get_openapi_yaml(make_config: Any) -> None:
    import server

    config = make_config(auth={"bcrypt_rounds": 4})
    app = server.create_app(config)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.yaml", headers={"X-Request-ID": "spec-1"})
        assert resp.status == 200
        assert resp.content_type == "application/yaml"
        assert resp.headers["X-Request-ID"] == "spec-1"
        body = await resp.read()
        assert body == SPEC_PATH.read_bytes()
        doc = yaml.safe_load(body)
        assert doc["openapi"].startswith("3.")
        assert "/openapi.yaml" in doc["paths"]
        # public: no token needed, and HEAD/POST are not allowed
        resp = await client.post("/openapi.yaml")
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


def test_openapi_path_is_the_repo_root_file() -> None:
    assert ops.OPENAPI_PATH == SPEC_PATH


async def test_missing_document_is_a_normal_404(make_config: Any,
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """Without the file: 404 not_found in API.md's error format, with the request id."""
    import server

    monkeypatch.setattr(ops, "OPENAPI_PATH", tmp_path / "absent.yaml")
    app = server.create_app(make_config(auth={"bcrypt_rounds": 4}))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.yaml", headers={"X-Request-ID": "spec-2"})
        assert resp.status == 404
        assert await resp.json() == {"error": {"code": "not_found",
                                               "message": "no OpenAPI document",
                                               "request_id": "spec-2"}}
