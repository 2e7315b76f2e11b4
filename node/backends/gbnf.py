"""JSON schema -> GBNF for llama.cpp's grammar sampler, with llama-cpp-python's converter.

The converter that llama-cpp-python 0.3.36 ships (`llama_cpp.llama_grammar`) writes its
string character rule as `[^"\\\\]`: a raw newline, tab or other control character
inside a string passes the grammar, and the output is not JSON (RFC 8259 wants them
escaped; `json.loads` refuses them). llama.cpp's own converter excludes them
(`[^"\\\\\\x7F\\x00-\\x1F]`); `from_schema` applies that rule (seen here: seeded SmolLM2
requests wrote "\\n\\t" inside a name).
"""

from __future__ import annotations

import re

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

__all__ = ["JSON_GBNF", "from_schema"]

_LOOSE_CHAR = re.compile(r'^char ::= \[\^"\\\\\]', re.M)
_STRICT_CHAR = r'char ::= [^"\\\\\\x7F\\x00-\\x1F]'


def from_schema(schema_json: str) -> str:
    gbnf = json_schema_to_gbnf(schema_json)
    fixed, n = _LOOSE_CHAR.subn(_STRICT_CHAR, gbnf)
    if n == 0 and "char ::=" in gbnf:
        raise RuntimeError("llama_cpp.llama_grammar's char rule changed; check gbnf.py")
    return fixed
