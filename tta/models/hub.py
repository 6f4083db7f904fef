"""Failing fast offline: weights that neither sit in a local cache nor can be
downloaded are refused at once, with the local-checkpoint advice, instead of
after the Hugging Face client's minute of retries."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

__all__ = ["offline_reason", "hub_file_cached", "hub_endpoint", "file_cached", "refuse_if_unreachable"]

_TRUE = ("1", "true", "yes", "on")


def offline_reason(url: str) -> str | None:
    """Why ``url``'s host cannot be reached (``HF_HUB_OFFLINE`` set, or no answer
    within 3 s), or None when it answers. Any HTTP status counts as an answer."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    parts = urlsplit(url)
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{parts.scheme}://{parts.netloc}/", method="HEAD"),
                                    timeout=3):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:
        return f"{parts.netloc} does not answer: {getattr(err, 'reason', err)}"


def hub_file_cached(repo_id: str, filenames: Iterable[str], cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether any of ``filenames`` of hub repo ``repo_id`` is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir), str) for f in filenames if f)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def refuse_if_unreachable(what: str, url: str, source: str, advice: str) -> None:
    """Raise ``RuntimeError`` naming ``what``, ``source`` and ``advice`` when
    ``url`` cannot be reached (the caller has checked the caches)."""
    reason = offline_reason(url)
    if reason is not None:
        raise RuntimeError(
            f"{what}: the weights are not in the local cache and cannot be downloaded from {source} "
            f"({reason}). {advice}"
        )


def file_cached(directory: str | os.PathLike, url: str) -> bool:
    """Whether ``url``'s file is in a URL-download cache folder."""
    return (Path(directory).expanduser() / os.path.basename(urlsplit(url).path)).is_file()
