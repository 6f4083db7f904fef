"""Writing a trained zoo model: fp16 weights and its manifest entry, which
``tta.load_model("zoo:<name>")`` reads and checks."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch
from torch import nn

from tta.models.zoo import bundled_dir
from tta.paths import atomic_write_bytes

from benchmarks.zoo.entries import ZooEntry

#: Where the zoo's checkpoints and manifest live: the package's own zoo folder, the
#: last place ``tta.load_model("zoo:<name>")`` looks (``$TTA_HOME/models/zoo`` first).
CHECKPOINT_DIR = bundled_dir()
MANIFEST = CHECKPOINT_DIR / "manifest.json"


def export(name: str, entry: ZooEntry, model: nn.Module, record: dict) -> Path:
    """fp16 state_dict of the backbone (plain tensors) + a manifest entry."""
    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    backbone = getattr(model, "backbone", None) or getattr(model, "clip", model)
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).clone().contiguous()
        for k, v in backbone.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = CHECKPOINT_DIR / f"{name}.pt"
    atomic_write_bytes(path, data)
    path.chmod(0o644)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    manifest.setdefault("format", 1)
    manifest.setdefault("models", {})
    manifest["models"][name] = dict(
        file=path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        architecture=entry.architecture,
        description=entry.description,
        **record,
    )
    manifest["models"] = dict(sorted(manifest["models"].items()))
    atomic_write_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    MANIFEST.chmod(0o644)
    return path
