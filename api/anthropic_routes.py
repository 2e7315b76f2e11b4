"""The Anthropic Messages dialect: /v1/messages (in progress, issue 12)."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("anthropic", __name__)
