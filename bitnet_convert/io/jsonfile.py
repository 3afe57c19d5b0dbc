"""Reading the JSON files a user hands us (a checkpoint's ``config.json``, an eval report) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bitnet_convert.errors import BitNetConvertError


def read_json(file: Path, error: type[BitNetConvertError], missing: str, where: str | None = None) -> Any:
    """The JSON value in ``file``. Raises ``error(missing)`` when there is no such file, and ``error`` naming
    ``where`` (default: the file) for text that is not JSON (with the first line of the parser's explanation)."""
    where = str(file) if where is None else where
    if not file.is_file():
        raise error(missing)
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{where}: not valid JSON ({str(exc).splitlines()[0]})") from None
