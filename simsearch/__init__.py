"""simsearch: index folders of images with a vision transformer and search them by example.

The names below load on first use (PEP 562), so `import simsearch` and the CLI's `--help`
do not pay for SQLAlchemy, PIL, torch or FAISS, and `simsearch.models.onnx` runs with numpy
and onnxruntime alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from simsearch._version import __version__

_HOMES = {
    "Index": "simsearch.api",
    "Client": "simsearch.client",
    "SimsearchError": "simsearch.errors",
    "AddSummary": "simsearch.records",
    "Cluster": "simsearch.records",
    "ClusterRun": "simsearch.records",
    "Duplicate": "simsearch.records",
    "DuplicateGroup": "simsearch.records",
    "FailedFile": "simsearch.records",
    "Hit": "simsearch.records",
    "IndexInfo": "simsearch.records",
    "RaySettings": "simsearch.ops.ray_ingest",
}

__all__ = [
    "AddSummary",
    "Client",
    "Cluster",
    "ClusterRun",
    "Duplicate",
    "DuplicateGroup",
    "FailedFile",
    "Hit",
    "Index",
    "IndexInfo",
    "RaySettings",
    "SimsearchError",
    "__version__",
]

if TYPE_CHECKING:
    from simsearch.api import Index
    from simsearch.client import Client
    from simsearch.errors import SimsearchError
    from simsearch.ops.ray_ingest import RaySettings
    from simsearch.records import (
        AddSummary,
        Cluster,
        ClusterRun,
        Duplicate,
        DuplicateGroup,
        FailedFile,
        Hit,
        IndexInfo,
    )


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'simsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
