"""A small MCP server over stdio for tests/test_agents.py: today's temperature of a few
cities, from a table. Every call is appended as a JSON line to $MCP_CALLS_LOG, so a test
sees what the agent's node really asked."""

from __future__ import annotations

import json
import os

from mcp.server.mcpserver import MCPServer

TEMPERATURES = {"oslo": "23.5", "lima": "18.25", "cairo": "31.75"}

app = MCPServer("weather")


@app.tool()
def temperature(city: str) -> str:
    """Today's temperature in a city, in degrees Celsius."""
    log = os.environ.get("MCP_CALLS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"tool": "temperature", "arguments": {"city": city}}) + "\n")
    found = TEMPERATURES.get(city.strip().lower())
    if found is None:
        return f"No station reports from {city}."
    return f"It is {found} degrees Celsius in {city} today."


@app.tool()
def wipe_station(city: str) -> str:
    """Delete a weather station's records (no agent in the tests is allowed this tool)."""
    raise RuntimeError("wipe_station must never be called by the tests")


if __name__ == "__main__":
    app.run("stdio")
