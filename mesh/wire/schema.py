"""The JSON Schema subset that constrained decoding enforces (`response_format`).

A schema is turned into a GBNF grammar in the worker by llama-cpp-python's converter
(`llama_cpp.llama_grammar.json_schema_to_gbnf`), which enforces the keywords below and
would silently skip any other. So a schema is checked against this list at the API edge
(and again in the worker): a keyword outside it is a 400 naming it, never a constraint
quietly dropped.

Enforced:   type (object, array, string, number, integer, boolean, null, or a list),
            properties, required, additionalProperties (bool or schema), items,
            prefixItems, minItems, maxItems, enum, const, anyOf, oneOf, allOf,
            $ref (to #/$defs/... or #/definitions/...), minLength, maxLength, pattern,
            format (date, time, date-time, uuid)
Annotations (no effect on output): title, description, $schema, $id, $comment,
            examples, default, deprecated, readOnly, writeOnly
Refused:    everything else: minimum, maximum, exclusiveMinimum, exclusiveMaximum,
            multipleOf, not, if/then/else, dependentRequired, patternProperties,
            propertyNames, uniqueItems, contains, minProperties, maxProperties, ...
"""

from __future__ import annotations

from typing import Any

from mesh.errors import BadRequest

__all__ = ["ENFORCED", "ANNOTATIONS", "FORMATS", "check_schema"]

ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
    "minLength", "maxLength", "pattern", "format", "$defs", "definitions"})
ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "examples",
                         "default", "deprecated", "readOnly", "writeOnly"})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def check_schema(schema: Any, *, param: str = "response_format.json_schema.schema",
                 path: str = "") -> None:
    """Raise BadRequest naming the first keyword or value this node cannot enforce."""
    where = path or "the schema root"
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise BadRequest(f"a JSON schema must be an object (at {where})", param=param,
                         code="invalid_schema")
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise BadRequest(f"JSON schema keyword '{key}' (at {where}) is not supported for "
                             "constrained decoding; supported: "
                             f"{', '.join(sorted(ENFORCED - {'$defs', 'definitions'}))}",
                             param=param, code="unsupported_schema_keyword")
        if key == "type":
            types = value if isinstance(value, list) else [value]
            bad = [t for t in types if t not in TYPES]
            if bad:
                raise BadRequest(f"unknown JSON schema type {bad[0]!r} (at {where})",
                                 param=param, code="invalid_schema")
        elif key == "format" and value not in FORMATS:
            raise BadRequest(f"JSON schema format {value!r} (at {where}) is not supported; "
                             f"supported: {', '.join(sorted(FORMATS))}", param=param,
                             code="unsupported_schema_keyword")
        elif key == "$ref" and not (isinstance(value, str) and
                                    value.startswith(("#/$defs/", "#/definitions/"))):
            raise BadRequest(f"only local $ref to #/$defs/... are supported (at {where})",
                             param=param, code="unsupported_schema_keyword")
        elif key in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                raise BadRequest(f"'{key}' must be an object (at {where})", param=param,
                                 code="invalid_schema")
            for name, sub in value.items():
                check_schema(sub, param=param, path=f"{path}/{key}/{name}")
        elif key in _SUBSCHEMA_LISTS:
            if not isinstance(value, list):
                raise BadRequest(f"'{key}' must be a list (at {where})", param=param,
                                 code="invalid_schema")
            for i, sub in enumerate(value):
                check_schema(sub, param=param, path=f"{path}/{key}/{i}")
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            check_schema(value, param=param, path=f"{path}/{key}")
