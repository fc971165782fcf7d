"""Fixtures: tiny random transformers models saved to disk, and images drawn with Pillow.

Nothing here touches the network: every model is built from a config and loaded back through
the same `from_pretrained` path that real checkpoints take.
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

# Under pytest-xdist (`make test-fast`) each worker is its own process: left alone, torch,
# FAISS and BLAS each start one thread per core in every worker, and on a 2-core machine the
# two workers' threads spin-wait on each other (a third of the CPU time went there). Give
# each worker its share of the cores. Set before numpy and torch are imported, which read
# it then; simsearch subprocesses that tests start inherit it. A plain `pytest` run keeps
# the libraries' own default.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_share))

import numpy as np
import pytest
from PIL import Image, ImageDraw


def _torch_unless_export(model, device, precision) -> str:
    from simsearch.models.onnx_cache import is_export

    return "onnx" if is_export(model) else "torch"


@pytest.fixture(scope="session", autouse=True)
def _session_env(tmp_path_factory):
    """For the whole session, module and session fixtures included: a simsearch cache of the
    tests' own (each tiny model is exported to ONNX once, never into the user's cache), and
    a new index's "auto" backend torch unless a test asks for ONNX Runtime (or gives an
    export): the tests of everything else compare vectors with torch's exactly.
    tests/test_onnx_auto.py tests "auto" itself; subprocesses: subprocess_env."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIMSEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("simsearch-cache")))
        patch.setattr("simsearch.models.provider.auto_backend", _torch_unless_export)
        yield


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Keep tests away from the user's settings and the model hub."""
    for var in ("SIMSEARCH_INDEX", "SIMSEARCH_MODEL", "SIMSEARCH_LABEL_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("simsearch.models.hub._hub_reachable", lambda *a, **k: False)
    # fp32 everywhere unless a test asks for a precision: exact comparisons stay exact, and
    # results do not depend on whether this CPU has native bf16 (tests/test_precision.py).
    # The CLI (in this process and in subprocesses) reads the variable; the library's
    # "auto" asks the hardware probe.
    monkeypatch.setenv("SIMSEARCH_PRECISION", "fp32")
    monkeypatch.setattr("simsearch.models.embed.cpu_has_native_bf16", lambda: False)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures logging when it runs; put it back for the next test (caplog)."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("simsearch")
    handlers, root_level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)


def _save_vit(folder: Path, seed: int, **overrides) -> Path:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    settings.update(overrides)
    config = ViTConfig(**settings)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    size = config.image_size
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A 3-layer, 32-dim ViT on 32x32 input, saved as a local model folder."""
    return _save_vit(tmp_path_factory.mktemp("tiny-vit"), seed=0)


@pytest.fixture(scope="session")
def other_vit(tmp_path_factory) -> Path:
    """Same architecture as tiny_vit, different weights: a different model."""
    return _save_vit(tmp_path_factory.mktemp("other-vit"), seed=1)


PALETTE = [
    (220, 40, 40),
    (40, 160, 60),
    (40, 70, 210),
    (240, 200, 30),
    (150, 50, 180),
    (20, 20, 20),
    (250, 250, 250),
    (30, 190, 200),
]


def edited_checkpoint(output: Path, edit) -> Path:
    """Apply `edit` (a function of the loaded dict) to output/checkpoints/last.pt, as an
    attacker or a damaged disk would; return its path."""
    import torch

    last = output / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, last)
    return last


def draw_image(i: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """Draw the i-th test picture: a distinct background gradient, shape and colour each.
    Each is drawn once per process; callers get their own copy to change."""
    return _drawn(i, tuple(size)).copy()


@functools.lru_cache(maxsize=1024)
def _drawn(i: int, size: tuple[int, int]) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(i)
    base = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
    other = np.array(PALETTE[(i * 3 + 1) % len(PALETTE)], dtype=np.float32)
    t = np.linspace(0, 1, w if i % 2 else h, dtype=np.float32)
    grad = base[None, :] * (1 - t[:, None]) + other[None, :] * t[:, None]
    arr = np.broadcast_to(grad[None] if i % 2 else grad[:, None], (h, w, 3)).copy()
    arr += rng.normal(0, 6, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    colour = PALETTE[(i + 4) % len(PALETTE)]
    box = (w * (0.15 + 0.05 * (i % 3)), h * 0.2, w * (0.6 + 0.1 * (i % 4)), h * 0.85)
    if i % 3 == 0:
        draw.ellipse(box, fill=colour)
    elif i % 3 == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], colour)
    return img


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """A folder of 8 distinct drawn images, JPEG and PNG, one in a subfolder."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(8):
        target = folder / "sub" if i == 7 else folder
        ext = "png" if i % 2 else "jpg"
        draw_image(i).save(target / f"img{i}.{ext}", quality=95)
    return folder


@pytest.fixture
def index_path(tmp_path, tiny_vit, photo_dir) -> Path:
    """An index of photo_dir made with tiny_vit, closed: the path a command would be given."""
    from simsearch import Index

    path = tmp_path / "index"
    with Index.create(path, model=tiny_vit) as idx:
        idx.add(photo_dir)
    return path


def index_command(photos, index, *options) -> list[str]:
    """The argv of `simsearch -q index PHOTOS --index INDEX [options]`, for a subprocess."""
    return [
        sys.executable,
        "-m",
        "simsearch",
        "-q",
        "index",
        str(photos),
        "--index",
        str(index),
        *(str(o) for o in options),
    ]


def subprocess_env(**extra) -> dict[str, str]:
    """The environment for a simsearch subprocess: offline, unbuffered, no crash point,
    torch for a new index (as _isolated_env makes "auto" in this process)."""
    env = dict(os.environ)
    env.pop("SIMSEARCH_CRASH_AT", None)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", SIMSEARCH_BACKEND="torch", **extra)
    return env


# `python -c NO_TORCH ARGS...` runs the simsearch command in a process where importing
# torch or transformers fails (the ONNX Runtime paths need neither).
NO_TORCH = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.argv = ["simsearch", *sys.argv[1:]]
runpy.run_module("simsearch", run_name="__main__")
"""


def run_simsearch(*args, **options) -> subprocess.CompletedProcess:
    """Run `simsearch ARGS` in a subprocess (offline), capturing its text output."""
    return subprocess.run(
        [sys.executable, "-m", "simsearch", *(str(a) for a in args)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        **options,
    )


DIM = 32  # the tiny ViT's hidden size


def clustered(n: int, dim: int = DIM, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors like a photo collection's embeddings: groups, each spread along a few
    directions of its own (low intrinsic dimension), plus a little noise. Nearest
    neighbours score ~0.85, the 10th ~0.7, as with real models."""
    fixed = np.random.default_rng(12345)  # the same groups for every seed
    centres = fixed.standard_normal((clusters, dim)) / np.sqrt(dim)
    bases = fixed.standard_normal((clusters, 8, dim)) / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    group = rng.integers(0, clusters, n)
    spread = np.einsum("nr,nrd->nd", 0.7 * rng.standard_normal((n, 8)), bases[group])
    x = centres[group] + spread + 0.15 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fill(index, vectors: np.ndarray, start: int = 0, images=None) -> np.ndarray:
    """Store `vectors` as indexing images would (commit, then mirror); returns their ids.
    `images`: the GoodImage rows to store them under (default: made-up paths and hashes)."""
    from simsearch.storage.store import GoodImage

    good = images or [
        GoodImage(f"/synthetic/{start + i}.jpg", 1, 1, f"{start + i:064x}", 8, 8)
        for i in range(len(vectors))
    ]
    with index.parts.writing():
        ids, _ = index.store.write_batch(good, vectors, [], [])
        ids = np.asarray(ids, dtype=np.int64)
        index.parts.cache.add(ids, vectors)
    return ids


@pytest.fixture
def run():
    """`run("search", "id:1", "--index", path)`: the simsearch command in this process
    (click's CliRunner), arguments made str, exceptions not caught (a traceback fails)."""
    from click.testing import CliRunner

    from simsearch.cli import cli

    runner = CliRunner()

    def invoke(*args, env=None):
        return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header says width x height (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto's, in a thread) for the object-storage tests, and the AWS
    variables that point the AWS SDK (pyarrow's S3) at it; never a real cloud. Yields a
    function that uploads {key: bytes} into a new bucket and returns its URL."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (dev extra)")
    pafs = pytest.importorskip("pyarrow.fs", reason="the S3 tests need pyarrow")
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    settings = dict(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    made = iter(range(10_000))

    def bucket(objects: dict[str, bytes]) -> str:
        name = f"photos-{next(made)}"
        s3.create_dir(name)
        for key, data in objects.items():
            with s3.open_output_stream(f"{name}/{key}") as out:
                out.write(data)
        return f"s3://{name}"

    bucket.s3 = s3  # type: ignore[attr-defined]
    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
