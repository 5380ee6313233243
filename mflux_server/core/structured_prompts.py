"""FIBO's structured prompts: families whose text encoder reads a JSON object, and how plain text becomes one."""

from __future__ import annotations

import json
from typing import Any

# The key a plain-text prompt is put under, per family; mflux's FIBO encoder json.loads every prompt it gets.
JSON_PROMPT_KEYS = {"fibo": "prompt", "fibo-edit": "edit_instruction"}


def _as_object(prompt: str) -> dict[str, Any] | None:
    try:
        value = json.loads(prompt)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def problem(family: str, prompt: str) -> str | None:
    """Why this prompt cannot run on the family (a JSON object missing the key it needs); None when it can."""
    key = JSON_PROMPT_KEYS.get(family)
    value = _as_object(prompt) if key == "edit_instruction" else None
    if key is not None and value is not None and not str(value.get(key) or "").strip():
        return f"a JSON prompt for this model must have a non-empty \"{key}\" (or send plain text, which becomes it)"
    return None


def for_family(family: str, prompt: str) -> str:
    """The prompt mflux gets: a JSON object passes as it is, plain text is wrapped under the family's key."""
    key = JSON_PROMPT_KEYS.get(family)
    if key is None or _as_object(prompt) is not None:
        return prompt
    return json.dumps({key: prompt}, ensure_ascii=False)
