"""Speech synthesis: /v1/audio/speech (in progress, issue 12)."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("speech", __name__)
