"""Speech synthesis, /v1/audio/speech, and llama-server's /tokenize and /detokenize (in progress, issue 12)."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("speech", __name__)
