"""JSON helpers shared by schedules and calibrations: readable files, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import StepCacheError


def dump(data: Any) -> str:
    """JSON with each list of numbers on one line, so files stay readable and diffable."""
    text = json.dumps(data, indent=2, allow_nan=False)
    return (
        re.sub(r"\[\s+([-\d.eE+,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        + "\n"
    )


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as readable JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(data))
    return path


def read_json(path: str | Path, what: str, error: type[StepCacheError]) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            f"the {what} file is corrupt or truncated: regenerate it."
        ) from None
