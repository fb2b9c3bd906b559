"""The two ways `lstmserve export` fails: bad input, or an export that does not match PyTorch."""

from __future__ import annotations


class ExportError(ValueError):
    """A bad option or input for `lstmserve export`; the message names the bad value."""


class ParityError(RuntimeError):
    """The exported ONNX model does not compute what the PyTorch module computes."""
