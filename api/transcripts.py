"""Render a transcription result in OpenAI's response formats."""

from __future__ import annotations

import json
from typing import Any


def _ts(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render(result: dict[str, Any], fmt: str) -> tuple[str, str]:
    """(body, mimetype) for response_format json | text | verbose_json | srt | vtt."""
    segs = result.get("segments") or []
    if fmt == "text":
        return result["text"] + "\n", "text/plain"
    if fmt == "srt":
        blocks = [f"{i}\n{_ts(s['start'], ',')} --> {_ts(s['end'], ',')}\n{s['text'].strip()}\n"
                  for i, s in enumerate(segs, 1)]
        return "\n".join(blocks), "text/plain"
    if fmt == "vtt":
        blocks = [f"{_ts(s['start'], '.')} --> {_ts(s['end'], '.')}\n{s['text'].strip()}\n"
                  for s in segs]
        return "WEBVTT\n\n" + "\n".join(blocks), "text/vtt"
    if fmt == "verbose_json":
        return json.dumps({"task": "transcribe", "language": result.get("language"),
                           "duration": result.get("duration"), "text": result["text"],
                           "segments": segs}), "application/json"
    return json.dumps({"text": result["text"]}), "application/json"
