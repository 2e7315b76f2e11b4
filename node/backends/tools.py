"""Function calling for the llama backend: the prompt, the grammar, the parse.

- Prompt: the model's own chat template renders `tools` (GGUF metadata, Jinja, as
  transformers does), and the history's assistant `tool_calls` and `tool` results. A
  template that never mentions `tools` gets FALLBACK_PROMPT as a system message instead,
  listing the functions and the `<tool_call>` format (Hermes/Qwen style).
- Grammar: `tool_choice` "required" or a function's name forces the output into
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (one, or several
  with parallel_tool_calls), whose JSON is constrained by the function's parameters
  schema (the subset of mesh/wire/schema.py, turned into GBNF like response_format).
- Parse: the blocks are read back into ToolCall(id, name, arguments as JSON text).
Left out: tool_choice "auto" (the model choosing between text and a call, which needs a
lazy grammar triggered by `<tool_call>` and fenced-JSON recovery) is refused with a 400.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

from mesh.wire.inference import Generate, Tool, ToolCall
from mesh.wire.schema import check_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_PROMPT = (
    "You may call functions. The functions, as JSON signatures:\n{tools}\n"
    "To call one, answer with a JSON object of the function's name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}}\n</tool_call>")
_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def template_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def template_messages(req: Generate, template_has_tools: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in req.messages or ():
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": _loads(c.arguments)}} for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    if req.tools and not template_has_tools:
        sigs = "\n".join(json.dumps(t) for t in template_tools(req.tools))
        out.insert(0, {"role": "system", "content": FALLBACK_PROMPT.format(tools=sigs)})
    return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def forced(req: Generate) -> bool:
    return bool(req.tools) and req.tool_choice not in ("none", "auto")


def grammar(req: Generate) -> str:
    """GBNF forcing tool-call blocks for the chosen function(s)."""
    tools = [t for t in req.tools if req.tool_choice in ("required", t.name)]
    alternatives = []
    for t in tools:
        check_schema(t.parameters, param="tools.function.parameters")
        alternatives.append({"type": "object", "properties": {
            "name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    gbnf = json_schema_to_gbnf(json.dumps(schema))
    gbnf = re.sub(r"^root ::=", "call ::=", gbnf, flags=re.M)
    block = r'"<tool_call>\n" call "\n</tool_call>"'
    more = rf' ("\n" {block})*' if req.parallel_tool_calls else ""
    return f"root ::= {block}{more}\n{gbnf}"


def parse(text: str) -> list[ToolCall]:
    calls = []
    for m in _BLOCK.finditer(text):
        obj = json.loads(m.group(1))
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=str(obj["name"]),
                              arguments=json.dumps(obj.get("arguments", {}), ensure_ascii=False)))
    return calls
