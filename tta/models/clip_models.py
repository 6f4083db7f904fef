"""The ``clip:`` model family: open_clip models as zero-shot classifiers,
``load_model("clip:<open_clip model>/<pretrained tag or checkpoint path>")``.

open_clip is imported on first use only (``pip install tta[clip]``). Weights that are
neither cached nor downloadable are refused at once, with the local-checkpoint advice.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

from .._registry import unknown_name_message
from .checkpoint import checkpoint_file, checkpoint_format, not_a_checkpoint, pickled_code
from .clip import CLIPClassifier, from_open_clip, import_open_clip
from .hub import file_cached, hub_endpoint, hub_file_cached, refuse_if_unreachable
from .registry import register_model_family

__all__ = ["clip_classifier", "split_spec", "VALID_CLIP_CHECKPOINT"]

#: What open_clip loads from a local file, for error messages.
VALID_CLIP_CHECKPOINT = (
    "a valid open_clip checkpoint is a file written by torch.save holding the model's state dict "
    "(.pt, .bin), a .safetensors file, or big_vision .npz/.npy weights"
)


def split_spec(spec: str, known: Sequence[str]) -> tuple[str, str | None]:
    """``"ViT-B-16/openai"`` -> ``("ViT-B-16", "openai")``; the model name may also be
    written with slashes (``"ViT-B/16/openai"``) and the rest may be a path."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    parts = spec.split("/")
    for i in range(len(parts), 0, -1):
        name = "-".join(parts[:i])
        if name in known:
            rest = "/".join(parts[i:])
            return name, rest or None
    name, _, rest = spec.partition("/")
    return name, rest or None


def clip_classifier(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    classnames: str | Sequence[str] | None = None,
    templates: str | Sequence[str] = "photo",
    ctx_init: str | None = None,
    precision: str = "fp32",
    cache_dir: str | None = None,
    pretrained: bool = True,
) -> CLIPClassifier:
    """Build ``load_model("clip:<spec>")``: an open_clip model and its tokenizer as
    a :class:`~tta.models.clip.CLIPClassifier`.

    Args:
        spec: ``"<model>/<pretrained>"``: an open_clip model (``open_clip.list_models()``,
            or a config registered with ``open_clip.add_model_config``) and a pretrained
            tag (``open_clip.list_pretrained()``, weights from open_clip's cache or
            downloaded) or a local checkpoint path (.pt/.bin/.safetensors); ``"<model>"``
            alone is randomly initialised; ``"hf-hub:..."``/``"local-dir:..."`` work too.
            The zoo's CLIP models are ``"zoo:<name>"`` (:mod:`tta.models.zoo`).
        weights: a local checkpoint, instead of a tag in ``spec``.
        classnames: ``None``/``"imagenet"`` (1000 ImageNet classes), ``"cifar10"`` or a list.
        templates: ``"photo"``, ``"clip7"``, ``"clip80"``, ``"cifar10"`` (see
            :data:`~tta.models.clip.TEMPLATE_SETS`) or a list.
        ctx_init: make the text before the class name learnable (see
            :meth:`CLIPClassifier.use_prompt`); TPT and RLCF set it up themselves.
        precision: open_clip's ``precision`` (``"fp32"``, ``"bf16"``, ...).
        cache_dir: open_clip's download cache.
        pretrained: ``False`` ignores the weights named in ``spec`` and builds the
            model with random weights (smoke tests; ``tta-bench model.pretrained=false``);
            ``weights=`` still loads.
    """
    if spec.startswith("zoo/"):
        name = spec[len("zoo/"):]
        raise KeyError(f"'clip:zoo/{name}' is no longer a model name: the zoo's CLIP models are "
                       f"'zoo:{name}' (same options, same model)")
    oc = import_open_clip()
    name, tag = split_spec(spec, oc.list_models())
    tag = _weights_tag(tag if pretrained else None, weights)  # not pretrained: random unless weights=
    local = tag is not None and os.path.isfile(tag)
    if local:
        _check_clip_checkpoint(tag)
    elif tag is not None and (os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise FileNotFoundError(f"clip:{spec}: no checkpoint file at {tag} (a pretrained tag has no '/'; "
                                f"the tags of {name}: tta.list_models('clip:{name}/*'))")
    elif tag is not None:
        _check_weights_reachable(oc, name, tag, cache_dir)
    try:
        model = oc.create_model(name, pretrained=tag, precision=precision, cache_dir=cache_dir,
                                weights_only=True)
    except pickle.UnpicklingError as err:
        if not local:
            raise
        raise pickled_code(tag, err) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
        if isinstance(err, RuntimeError) and "not found" in str(err) and name not in oc.list_models():
            raise KeyError(unknown_name_message("open_clip model", name, oc.list_models(),
                                                list_with="tta.list_models('clip:*')")) from None
        if not local:
            raise
        raise ValueError(f"{tag} does not load into open_clip model {name!r} ({str(err).splitlines()[0][:300]}): "
                         f"is it a checkpoint of {name}, whole?") from err
    return from_open_clip(model, oc.get_tokenizer(name, cache_dir=cache_dir), classnames=classnames,
                          templates=templates, ctx_init=ctx_init)


def _weights_tag(tag: str | None, weights: str | os.PathLike | None) -> str | None:
    """open_clip's ``pretrained``: the tag or path of the name, or ``weights=`` (one of them)."""
    if weights is None:
        return tag
    if tag is not None:
        raise ValueError(f"give the weights either in the name ({tag!r}) or as weights=, not both")
    checkpoint_file(weights)  # a clear error for a missing file or a directory
    return os.fspath(weights)


def _check_weights_reachable(oc: Any, name: str, tag: str, cache_dir: str | None) -> None:
    """Fail at once, with the local-checkpoint advice, when the weights of an
    open_clip pretrained tag are neither cached nor downloadable."""
    cfg = oc.get_pretrained_cfg(name, tag) if hasattr(oc, "get_pretrained_cfg") else None
    if not cfg or cfg.get("file"):
        return  # an unknown tag: open_clip's own error names the known ones
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        model_id, filename = os.path.split(hub)  # "org/model/" names the repo's default file
        filename = filename or "open_clip_pytorch_model.bin"
        # open_clip prefers a .safetensors twin of the file when the repo has one
        names = (filename, "open_clip_model.safetensors", Path(filename).with_suffix(".safetensors").name)
        if hub_file_cached(model_id, names, cache_dir):
            return
        url, source = hub_endpoint(), f"the Hugging Face hub ({model_id})"
    elif url:
        if file_cached(cache_dir or "~/.cache/clip", url):
            return
        source = url
    else:
        return
    refuse_if_unreachable(
        f"clip:{name}/{tag}", url, source,
        f"Offline, give a local open_clip checkpoint: tta.load_model('clip:{name}//path/to/"
        "open_clip_pytorch_model.bin') or weights='path' (tta-bench: model.weights=path); or load it "
        "once where the network allows, and it is cached",
    )


def _check_clip_checkpoint(path: str) -> None:
    """A ``ValueError`` naming ``path`` unless its first bytes are a format open_clip
    loads (it fails on other files with errors that name neither the file nor the
    cause, e.g. an ``IndexError`` for a text file)."""
    if checkpoint_format(path) is None:
        raise not_a_checkpoint(Path(path), valid=VALID_CLIP_CHECKPOINT)


def list_clip(pattern: str = "*") -> list[str]:
    """``<model>/<pretrained tag>`` of open_clip's published weights matching
    ``pattern`` (``open_clip.list_pretrained()``)."""
    import fnmatch

    open_clip = import_open_clip()
    return [n for n in (f"{m}/{t}" for m, t in open_clip.list_pretrained()) if fnmatch.fnmatch(n, pattern or "*")]


register_model_family("clip", clip_classifier, list_clip)
