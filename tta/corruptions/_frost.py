"""Frost textures of ImageNet-C: located, downloaded once, decoded and cached."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..paths import download, tta_home

__all__ = ["FROST_FILES", "FROST_SHA256", "FROST_URL", "default_frost_dir", "set_frost_dir", "load_frost_textures"]

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
#: sha256 of the textures in hendrycks/robustness (ImageNet-C/create_c/).
FROST_SHA256 = {
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
    "frost6.jpg": "1f92b2f48408748085b68dd81d816ef239f42cef3029c25d041fcb6760fb4f25",
}
FROST_URL = "https://raw.githubusercontent.com/hendrycks/robustness/master/ImageNet-C/create_c/{name}"

# (folder, rescale factor, device) -> uint8 textures (3, h, w); decoding and resizing
# six images per batch would cost more than the corruption itself
_CACHE: dict[tuple[str, float, str], list[Tensor]] = {}
_LOCK = threading.Lock()


_FROST_DIR: Path | None = None


def set_frost_dir(frost_dir: str | os.PathLike | None) -> None:
    """Set the process-wide folder of frost textures (``None`` restores the default).
    A ``frost_dir=`` argument to :func:`tta.corruptions.corrupt` still wins."""
    global _FROST_DIR
    _FROST_DIR = Path(frost_dir).expanduser() if frost_dir is not None else None


def default_frost_dir() -> Path:
    """The folder set by :func:`set_frost_dir`, else ``$TTA_FROST_DIR`` if set, else
    ``tta_home()/data/imagenet-c-frost``."""
    if _FROST_DIR is not None:
        return _FROST_DIR
    env = os.environ.get("TTA_FROST_DIR")
    return Path(env).expanduser() if env else tta_home() / "data" / "imagenet-c-frost"


def _ensure_files(folder: Path, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    for name in missing:
        try:
            download(FROST_URL.format(name=name), folder / name, FROST_SHA256[name])
        except (RuntimeError, OSError) as err:
            raise FileNotFoundError(
                f"frost texture {name} is missing from {folder} and could not be downloaded ({err}). "
                f"Put frost1.png, frost2.png, frost3.png, frost4.jpg, frost5.jpg, frost6.jpg from "
                f"hendrycks/robustness (ImageNet-C/create_c/) into {folder}, or pass frost_dir=... "
                f"(or set TTA_FROST_DIR)."
            ) from err


def _cv2_linear_resize(img: Tensor, scale: float) -> Tensor:
    """``cv2.resize(img, (0, 0), fx=scale, fy=scale)`` (bilinear, half-pixel centres,
    no antialiasing, source step exactly 1/scale), rounded to uint8."""
    _, h, w = img.shape
    out_h, out_w = int(round(h * scale)), int(round(w * scale))

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) / scale - 0.5
        i0 = torch.floor(src)
        frac = src - i0
        frac = torch.where(i0 < 0, torch.zeros_like(frac), frac)
        i0 = i0.clamp(min=0).long()
        at_end = i0 + 1 >= n_in
        frac = torch.where(at_end, torch.zeros_like(frac), frac)
        i0 = torch.where(at_end, torch.full_like(i0, n_in - 1), i0)
        return i0, (i0 + 1).clamp(max=n_in - 1), frac

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    v = img.double()
    rows = v[:, y0] * (1 - fy)[:, None] + v[:, y1] * fy[:, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return torch.floor(out + 0.5).clamp(0, 255).to(torch.uint8)


def load_frost_textures(
    frost_dir: str | os.PathLike | None = None, rescale: float = 1.0, device: torch.device | str = "cpu"
) -> list[Tensor]:
    """The six frost textures as uint8 ``(3, h, w)`` tensors on ``device``, resized
    by ``rescale`` like the original (``cv2.resize``, bilinear). Downloads missing
    files (sha256-checked) into ``frost_dir``; cached in memory per device."""
    folder = Path(frost_dir).expanduser() if frost_dir is not None else default_frost_dir()
    key = (str(folder.resolve()), float(rescale), str(torch.device(device)))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        _ensure_files(folder, FROST_FILES)
        textures = []
        for name in FROST_FILES:
            # RGBA PNGs: OpenCV's imread drops alpha without compositing, as does convert("RGB")
            with Image.open(folder / name) as im:
                arr = np.asarray(im.convert("RGB")).copy()
            t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
            if rescale != 1.0:
                t = _cv2_linear_resize(t, rescale)
            textures.append(t.to(device))
        _CACHE[key] = textures
        return textures
