"""The package's shape: documented import paths, what `import simsearch` costs, the layers."""

import subprocess
import sys

import pytest


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_import_simsearch_loads_no_heavy_library():
    loaded = _loaded_after("import simsearch")
    assert not loaded & {"torch", "transformers", "faiss", "sqlalchemy", "PIL", "numpy"}


def test_the_onnx_embedder_imports_without_torch_or_sqlalchemy():
    loaded = _loaded_after("import simsearch.models.onnx")
    assert not loaded & {"torch", "transformers", "sqlalchemy", "faiss"}


def test_the_top_level_names_resolve_to_their_homes():
    import simsearch
    from simsearch.api import Index
    from simsearch.records import Hit

    assert simsearch.Index is Index and simsearch.Hit is Hit
    assert set(simsearch.__all__) <= set(dir(simsearch))
    with pytest.raises(AttributeError):
        simsearch.NoSuchThing  # noqa: B018


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("simsearch.embed", "simsearch.models.embed", ["Embedder"]),
        ("simsearch.onnx_backend", "simsearch.models.onnx", ["OnnxEmbedder"]),
        ("simsearch.onnx_export", "simsearch.models.onnx_export", ["export_model", "recall_at_k"]),
        ("simsearch.finetune", "simsearch.train.finetune", ["FinetuneConfig", "finetune"]),
        ("simsearch.distill", "simsearch.train.distill", ["DistillConfig", "distill"]),
        ("simsearch.label", "simsearch.ops.label", ["Labeller"]),
    ],
)
def test_the_import_paths_the_readme_documents_still_work(old, new, names):
    import importlib

    before, after = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(before, name) is getattr(after, name)
