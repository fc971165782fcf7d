"""Make tests/data/index-before-schema-versions, an index as simsearch made them before
schema versions. Run it with simsearch checked out at fb510ab (the last such commit):

    git worktree add /tmp/old fb510ab
    PYTHONPATH=/tmp/old python tests/data/make_index_before_schema_versions.py OUTPUT
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from simsearch import Index

out = Path(sys.argv[1])
work = Path("/tmp/oldidx")
shutil.rmtree(work, ignore_errors=True)
model, photos = work / "model", work / "photos"
photos.mkdir(parents=True)
torch.manual_seed(0)
config = ViTConfig(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
ViTModel(config, add_pooling_layer=False).save_pretrained(model)
ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model)
rng = np.random.default_rng(0)
for i in range(6):
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(photos / f"img{i}.png")
(photos / "broken.jpg").write_bytes(b"not a jpeg")
with Index.create(work / "index", model=str(model)) as index:
    index.add([photos])
    index.cluster(2)
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
for name in ("manifest.json", "meta.sqlite", "vectors.faiss"):
    shutil.copy2(work / "index" / name, out / name)
