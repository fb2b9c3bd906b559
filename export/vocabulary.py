"""Token vocabularies given by the user: a list, a JSON file (a list of strings) or a text file (one piece a line)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lstmserve.export.errors import ExportError


def read_vocabulary(source: Sequence[str] | str | Path) -> tuple[str, ...]:
    """The vocabulary (token id -> text piece) from a list, or from a `.json` or text file; ExportError if bad."""
    if isinstance(source, (str, Path)):
        return _read_file(Path(source))
    pieces = tuple(source)
    bad = [i for i, p in enumerate(pieces) if not isinstance(p, str)]
    if bad:
        raise ExportError(f"vocabulary entry {bad[0]} is {pieces[bad[0]]!r}, not a string")
    if not pieces:
        raise ExportError("the vocabulary is empty")
    return pieces


def _read_file(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise ExportError(f"--vocab {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--vocab {str(path)!r} is not readable UTF-8 text: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"--vocab {str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise ExportError(f"--vocab {str(path)!r} must hold a JSON list of strings")
        return read_vocabulary(data)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last piece
    return read_vocabulary([line.removesuffix("\r") for line in lines])
