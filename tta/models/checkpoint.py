"""Reading state dicts from disk, safely: ``weights_only=True`` (no pickled code is
ever run), a few container layouts accepted, and errors that name the file and say
what a valid checkpoint is."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

__all__ = ["VALID_CHECKPOINT", "checkpoint_format", "checkpoint_file", "not_a_checkpoint", "pickled_code",
           "load_checkpoint", "load_state_into"]

#: What :func:`load_checkpoint` reads, for error messages.
VALID_CHECKPOINT = (
    "a valid checkpoint is a file written by torch.save holding a state dict of tensors "
    "(bare, or under 'state_dict', 'model' or 'state'), or a .safetensors file"
)


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """What the first bytes of ``path`` say it is: ``"zip"`` (torch.save's format, also
    .npz), ``"pickle"`` (torch.save's legacy format), ``"safetensors"``, ``"numpy"``
    (.npy), or ``None`` for none of these (a text file, an image, a truncated file)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:6] == b"\x93NUMPY":
        return "numpy"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return None


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` when it is an existing file; a ``FileNotFoundError`` or
    ``IsADirectoryError`` naming it otherwise."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a file; {VALID_CHECKPOINT}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def not_a_checkpoint(path: Path, detail: str | None = None, valid: str = VALID_CHECKPOINT) -> ValueError:
    """The ``ValueError`` for a file that is no checkpoint: ``detail`` says why (by
    default, what its size and first bytes show), ``valid`` what would be one."""
    if detail is None:
        detail = ("it is empty" if path.stat().st_size == 0
                  else "its first bytes are neither torch.save's zip or pickle format nor safetensors'")
    return ValueError(f"{path} is not a checkpoint ({detail}); {valid}")


def pickled_code(path: str | os.PathLike, err: pickle.UnpicklingError) -> ValueError:
    """The ``ValueError`` for a file ``weights_only`` loading refused (``err``)."""
    return ValueError(
        f"refusing to load {path}: it is not a plain tensor checkpoint (it holds "
        f"pickled objects or code, which tta never executes). Re-save it as a "
        f"state_dict of tensors. Detail: {(str(err).splitlines() or [''])[0]}"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise not_a_checkpoint(path, f"not a readable safetensors file: {err}") from None


def _torch_load(path: Path, kind: str | None) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails in many ways on a file it cannot read
        if kind is None:
            raise not_a_checkpoint(path) from None
        if isinstance(err, pickle.UnpicklingError):
            raise pickled_code(path, err) from None
        detail = (str(err).splitlines() or [""])[0]
        raise not_a_checkpoint(path, f"unreadable, truncated or corrupted: torch.load failed with "
                                     f"{type(err).__name__}: {detail}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict safely: ``weights_only=True`` refuses pickled code.

    Accepts a bare state dict or a dict with ``state_dict``/``model``/``state``
    inside; strips a ``module.`` (DataParallel) prefix. Any other file (not written
    by ``torch.save`` or safetensors) is a ``ValueError`` naming it.
    """
    path = checkpoint_file(path)
    kind = checkpoint_format(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        return _load_safetensors(path)
    obj = _torch_load(path, kind)
    for key in ("state_dict", "model", "state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; {VALID_CHECKPOINT}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that says which file (``source``) and which
    keys, checked before anything is copied (torch raises its own error on a size
    mismatch, naming neither)."""
    own = model.state_dict()
    # the state_dict() of a model tta loaded: its network is the classifier's backbone
    if state and all(k.startswith("backbone.") for k in state) and not any(k.startswith("backbone.") for k in own):
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    shapes = [f"{k} {tuple(v.shape)} (the model's {tuple(own[k].shape)})"
              for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing: list[str] = []
    unexpected: list[str] = []
    if not shapes:
        # strict=False: BatchNorm's own hook fills in what older checkpoints lack
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match {type(model).__name__} (is it for another architecture or class "
            f"count?): missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {shapes[:5]}"
        )
