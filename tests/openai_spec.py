"""OpenAI's OpenAPI document (../shared/data/openai-openapi.json) for the tests that
check our shapes and field tables against it.

The document is OpenAPI 3.1 with OpenAPI 3.0's `nullable: true` mixed in: `nullable`
widens such a schema to also accept null. Tests skip cleanly when ../shared is absent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

SPEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "openai-openapi.json"


def load() -> dict[str, Any]:
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is not there (../shared beside the checkout)")
    return json.loads(SPEC.read_text())


def nullable(s: Any) -> Any:
    if isinstance(s, list):
        return [nullable(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = {k: nullable(v) for k, v in s.items()}
    if s.pop("nullable", False):
        return {"anyOf": [s, {"type": "null"}]}
    return s


def properties(name: str) -> set[str]:
    """Every property of a component schema, through $ref, allOf, anyOf and oneOf."""
    schemas = load()["components"]["schemas"]
    out: set[str] = set()

    def walk(s: dict[str, Any]) -> None:
        if "$ref" in s:
            walk(schemas[s["$ref"].rsplit("/", 1)[-1]])
            return
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key, []):
                walk(sub)
        out.update(s.get("properties", {}))
    walk(schemas[name])
    return out
