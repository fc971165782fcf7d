"""What one hostile image may cost: peak memory measured, not assumed.

Each case is indexed by `simsearch index --workers 2` in a process of its own, whose peak
RSS (getrusage of a fresh parent) is compared with the same command on one small PNG. The
files are tiny on disk and huge once decoded: a 329 KB PNG of 13000x13000 16-bit pixels
took 5.4 GB on its way to RGB (two of them at 2 workers 10.1 GB), 13000x13000 RGBA 2.6 GB,
a 1x10000 PNG 6.9 GB through a shortest-edge resize, and a link to /proc/self/pagemap was
read up to 1 GiB before being refused.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import _save_vit, subprocess_env

from simsearch import Index

pytestmark = pytest.mark.e2e

# Above the same command on one small image, at 2 workers.
BOUND = 800 << 20


def png_of_zeros(path: Path, width: int, height: int, bit_depth: int = 8, colour: int = 2):
    """Write a PNG of `width` x `height` zero pixels, streamed through zlib (colour 0: grey,
    2: RGB, 6: RGBA), so the test itself never holds the decoded image."""
    channels = {0: 1, 2: 3, 6: 4}[colour]
    row = b"\0" * (1 + width * channels * bit_depth // 8)  # filter byte + the row
    per = max(1, (4 << 20) // len(row))
    comp, parts, left = zlib.compressobj(9), [], height
    while left:
        n = min(per, left)
        parts.append(comp.compress(row * n))
        left -= n
    parts.append(comp.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def shortest_edge_vit(tmp_path_factory) -> Path:
    """A tiny ViT whose processor resizes the shortest edge, then centre-crops (as CLIP's,
    ConvNeXt's and most ImageNet checkpoints' do)."""
    from transformers import CLIPImageProcessor

    folder = _save_vit(tmp_path_factory.mktemp("se-vit"), seed=0)
    (folder / "preprocessor_config.json").unlink()
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def peak_rss(folder: Path, index: Path, model: Path) -> int:
    """Peak RSS in bytes of `simsearch index folder --workers 2`, in a fresh process."""
    measure = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    command = [sys.executable, "-c", measure, sys.executable, "-m", "simsearch", "-q"]
    command += ["index", str(folder), "--index", str(index), "--model", str(model)]
    out = subprocess.run(
        [*command, "--workers", "2"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(out.stdout.split()[-1]) * 1024


def grey16(d: Path):
    for name in ("a.png", "b.png"):  # one per worker
        png_of_zeros(d / name, 13000, 13000, bit_depth=16, colour=0)


def rgba(d: Path):
    for name in ("a.png", "b.png"):
        png_of_zeros(d / name, 13000, 13000, colour=6)


def thin(d: Path):
    png_of_zeros(d / "thin.png", 1, 10000)


def thinner(d: Path):
    png_of_zeros(d / "thinner.png", 1, 100000)


def pagemap(d: Path):
    os.symlink("/proc/self/pagemap", d / "pagemap.png")


# case -> (files, whether they are indexed, what the failure says)
CASES = {
    "16-bit grey 13000x13000, twice": (grey16, True, None),
    "RGBA 13000x13000, twice": (rgba, False, "MiB, above the limit"),
    "1x10000": (thin, False, "too thin"),
    "1x100000": (thinner, False, "too thin"),
    "link to /proc/self/pagemap": (pagemap, False, "/proc"),
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, shortest_edge_vit) -> int:
    folder = tmp_path_factory.mktemp("small")
    png_of_zeros(folder / "small.png", 64, 48)
    return peak_rss(folder, folder.parent / "small-index", shortest_edge_vit)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs and ru_maxrss in KiB")
@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_image_costs_bounded_memory(case, tmp_path, shortest_edge_vit, baseline):
    make, indexed, reason = CASES[case]
    folder = tmp_path / "files"
    folder.mkdir()
    make(folder)
    peak = peak_rss(folder, tmp_path / "idx", shortest_edge_vit)
    above = peak - baseline
    print(json.dumps({"case": case, "peak_mib": peak >> 20, "above_baseline_mib": above >> 20}))
    assert above < BOUND, f"{case}: {above >> 20} MiB above the baseline"
    with Index.open(tmp_path / "idx") as index:
        failed = index.failed()
        assert len(index) == (len(list(folder.iterdir())) if indexed else 0), failed
        if reason is not None:
            assert failed and all(reason in f.error for f in failed), failed
