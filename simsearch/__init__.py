"""simsearch: index folders of images with a vision transformer and search them by example."""

from simsearch.api import Index
from simsearch.errors import SimsearchError
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

__version__ = "0.1.0"

__all__ = [
    "AddSummary",
    "Cluster",
    "ClusterRun",
    "Duplicate",
    "DuplicateGroup",
    "FailedFile",
    "Hit",
    "Index",
    "IndexInfo",
    "SimsearchError",
    "__version__",
]
