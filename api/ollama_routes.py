"""Ollama's API: /api/... (in progress, issue 12)."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("ollama", __name__)
