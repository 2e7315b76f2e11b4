"""Agents and scheduled jobs that run on the mesh, with no leader (docs/agents.md).

    spec        what an agent is (AgentSpec), its replicated record, schedule instants
    placement   who runs a scheduled tick: rendezvous hashing, takeover, the guarantee
    tools       the tools of one run: MCP servers over stdio and the built-ins, allow-lists
    loop        one run's tool loop through the router
    store       <home>/agents.db: definitions, runs, steps
    service     Agents: the API's operations, replication, schedules, runs
"""

from node.agents.service import KIND_DEFS, KIND_RUN, KIND_RUNS, Agents
from node.agents.store import AgentStore
from node.agents.tools import NodeTools

__all__ = ["Agents", "AgentStore", "NodeTools", "KIND_DEFS", "KIND_RUNS", "KIND_RUN"]
