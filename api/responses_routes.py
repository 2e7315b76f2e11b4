"""The OpenAI Responses dialect: /v1/responses (in progress, issue 12)."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("responses", __name__)
