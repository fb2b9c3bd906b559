"""lstmserve.export: train a recurrent model, or take an already-trained one or an ONNX file made elsewhere,
and export it to ONNX with explicit recurrent state.

The public names are imported lazily (PEP 562), so importing the package, or its
command line `lstmserve.export.cli`, does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AnnotateResult",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "LSTMModel",
    "ModelConfig",
    "ModuleExportResult",
    "ParityError",
    "RecurrentModel",
    "annotate",
    "export_model",
    "export_module",
    "fingerprint",
    "load_checkpoint",
    "read_spec",
]

_WHERE = {
    "ExportConfig": "config",
    "ExportError": "errors",
    "ParityError": "errors",
    "ExportResult": "pipeline",
    "export_model": "pipeline",
    "LSTMModel": "model",
    "RecurrentModel": "model",
    "AnnotateResult": "annotate",
    "annotate": "annotate",
    "ModuleExportResult": "module_export",
    "export_module": "module_export",
    "ModelConfig": "model",
    "fingerprint": "model",
    "load_checkpoint": "checkpoint",
    "read_spec": "onnx_export",
}

if TYPE_CHECKING:
    from lstmserve.export.annotate import AnnotateResult, annotate
    from lstmserve.export.checkpoint import load_checkpoint
    from lstmserve.export.config import ExportConfig
    from lstmserve.export.errors import ExportError, ParityError
    from lstmserve.export.model import LSTMModel, ModelConfig, RecurrentModel, fingerprint
    from lstmserve.export.module_export import ModuleExportResult, export_module
    from lstmserve.export.onnx_export import read_spec
    from lstmserve.export.pipeline import ExportResult, export_model


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
