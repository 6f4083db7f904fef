"""A tiny random open_clip model (2-layer ViT and text tower, 32-px images) that the
CLIP tests register under a name of their own, and its five class names."""

from __future__ import annotations

import json

import torch

import tta

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ["cat", "dog", "great white shark", "fire_truck", "tree frog"]


def registered_on_one_thread(name: str, tmp_path_factory):
    """Register the tiny config as open_clip model ``name`` and run the module's
    tests on one thread (a generator for a module-scoped fixture): these tiny
    matrices gain nothing from two threads, and lose a lot (50x) when the other core
    is busy."""
    import open_clip

    path = tmp_path_factory.mktemp("open_clip") / f"{name}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_tiny_clip(name: str, seed: int = 0, **kw):
    """The tiny CLIP classifier over :data:`CLASSES`, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    kw.setdefault("classnames", CLASSES)
    return tta.load_model(f"clip:{name}", **kw)


def smooth_images(n: int) -> torch.Tensor:
    """``n`` smooth random 32-px images (seed 0): crops of them differ from each
    other and from the image."""
    g = torch.Generator().manual_seed(0)
    small = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear").clamp(0, 1)


def with_agreeing_texts(reward, images: torch.Tensor, seed: int = 0):
    """``reward`` (a tiny CLIP) with class texts that agree with ``images`` to
    different degrees, as a trained CLIP's would: a random CLIP's image and text
    features point apart (cos < 0: CLIPScore 0, nothing to learn). Seeded by ``seed``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        center = reward.encode_image(images).mean(dim=0)
        texts = torch.nn.functional.normalize(center + 0.6 * torch.randn(reward.num_classes, center.numel()), dim=-1)
    reward.text_features = lambda: texts
    return reward
