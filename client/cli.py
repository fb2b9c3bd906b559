"""Subcommands of the client part (placeholder until implemented)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(subparsers: "argparse._SubParsersAction[Any]") -> None:
    """Registers this part's subcommands."""
