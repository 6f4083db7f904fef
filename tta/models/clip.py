"""open_clip models as zero-shot classifiers in pixel space: :class:`CLIPClassifier`
and :func:`from_open_clip` (the ``clip:`` names are :mod:`tta.models.clip_models`).

A :class:`CLIPClassifier` maps float RGB in [0, 1] to ``exp(logit_scale) *
cos(image, class text)`` logits. Its preprocessing (resize, centre crop and the
model's mean/std) runs inside, batched, on the images' device. The class texts come
from fixed templates (the zero-shot head, an average over templates as in the CLIP
paper) or from a learnable context in front of each class name (CoOp prompts, which
TPT and RLCF adapt), which may start from a saved one (a CoOp checkpoint,
:func:`load_context`). Text features are computed on first use and cached until the
prompt or the text tower changes.

This module is over 350 lines because a learnable prompt is a classifier's text side
run from token embeddings (open_clip has no such entry point), and reading a saved
context is part of setting one up; the two towers of one model stay in one class.

open_clip is imported on first use only (``pip install tta[clip]``).
"""

from __future__ import annotations

import os
import re
import string
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classifier import as_pixels

__all__ = ["CLIPClassifier", "from_open_clip", "class_names", "prompt_templates", "import_open_clip", "TEMPLATE_SETS",
           "is_saved_context", "load_context"]

CIFAR10_CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: Template sets by name: ``photo`` is the single "a photo of a {}."; ``clip7`` the
#: 7-template ImageNet ensemble the CLIP authors selected; ``clip80`` the CLIP paper's
#: 80 ImageNet templates (both read from open_clip); ``cifar10`` the CLIP authors' 18
#: CIFAR-10 templates (their prompts.md; the ensemble VTE's official code uses there).
TEMPLATE_SETS = ("photo", "clip7", "clip80", "cifar10")

# The CLIP authors' CIFAR-10 ensemble: "a photo of a {}." and its variants, each
# once with "a" and once with "the" before the class.
_CIFAR10_TEMPLATES = tuple(
    template.format(article=article)
    for article in ("a", "the")
    for template in ("a photo of {article} {{}}.", "a blurry photo of {article} {{}}.",
                     "a black and white photo of {article} {{}}.", "a low contrast photo of {article} {{}}.",
                     "a high contrast photo of {article} {{}}.", "a bad photo of {article} {{}}.",
                     "a good photo of {article} {{}}.", "a photo of {article} small {{}}.",
                     "a photo of {article} big {{}}.")
)


def import_open_clip() -> Any:
    """The ``open_clip`` module, or an ``ImportError`` saying how to install it."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("CLIP models need open_clip: pip install 'tta[clip]' (open_clip_torch)") from err
    return open_clip


def class_names(names: str | Sequence[str] | None) -> list[str]:
    """``None`` or ``"imagenet"``: the 1000 ImageNet class names of the CLIP paper
    (open_clip's ``IMAGENET_CLASSNAMES``); ``"cifar10"``; or a list as given."""
    if names is None or names == "imagenet":
        return list(import_open_clip().IMAGENET_CLASSNAMES)
    if names == "cifar10":
        return list(CIFAR10_CLASSNAMES)
    if isinstance(names, str):
        raise ValueError(f"classnames must be 'imagenet', 'cifar10' or a list of names, got {names!r}")
    names = [str(n) for n in names]
    if not names:
        raise ValueError("classnames is empty")
    return names


def prompt_templates(templates: str | Sequence[str]) -> list[str]:
    """A template set by name (:data:`TEMPLATE_SETS`) or a list of ``"...{}..."``."""
    if templates == "photo":
        return ["a photo of a {}."]
    if templates == "cifar10":
        return list(_CIFAR10_TEMPLATES)
    if templates in ("clip7", "clip80"):
        oc = import_open_clip()
        found = oc.SIMPLE_IMAGENET_TEMPLATES if templates == "clip7" else oc.OPENAI_IMAGENET_TEMPLATES
        return [t("{}") for t in found]
    if isinstance(templates, str):
        raise ValueError(f"templates must be one of {TEMPLATE_SETS} or a list, got {templates!r}")
    templates = list(templates)
    if not templates:
        raise ValueError("templates must be strings with a '{}' where the class name goes, got none")
    for t in templates:
        if not isinstance(t, str):
            raise ValueError(f"templates must be strings with a '{{}}' where the class name goes, got {t!r}")
        try:  # str.format fills them: exactly one anonymous field, literal braces doubled
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError as err:
            fields = [str(err)]
        if fields != [""]:
            raise ValueError(f"template {t!r} must hold exactly one '{{}}' where the class name goes (as "
                             "str.format fills it; write literal braces as '{{' and '}}')")
    return templates


#: How a checkpoint's name ends (CoOp's: ``model.pth.tar-50``): such a ``ctx_init`` is a file.
_CHECKPOINT_NAME = re.compile(r"\.(pt|pth|tar|bin|ckpt)(-\d+)?$")


def is_saved_context(ctx_init: Any) -> bool:
    """Whether ``ctx_init`` is a saved context rather than prompt text: a tensor, a
    path, or a string that names a file, has a ``/`` or ends like a checkpoint."""
    if isinstance(ctx_init, (Tensor, os.PathLike)):
        return True
    return isinstance(ctx_init, str) and (
        "/" in ctx_init or os.sep in ctx_init or bool(_CHECKPOINT_NAME.search(ctx_init)) or os.path.isfile(ctx_init))


def load_context(ctx_init: "str | os.PathLike | Tensor", width: int) -> Tensor:
    """A saved prompt context as a float32 (n_ctx, ``width``) CPU tensor: ``ctx_init``
    is the tensor, or a file (read offline, ``torch.load(weights_only=True)``) of one
    or of a state dict with it under ``["ctx"]``, ``["state_dict"]["ctx"]`` (CoOp's
    checkpoints) or one ``"<module>.ctx"``. A ``width`` other than the text tower's
    token width is refused, the message naming both shapes."""
    where, obj = "the given context", ctx_init
    if not isinstance(ctx_init, Tensor):
        path = os.fspath(ctx_init)
        where = f"context file {path!r}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ctx_init={path!r} reads as a saved prompt context (a path), but there is no such "
                                    "file; prompt text has no '/' and does not end like a checkpoint (.pt, .pth, .tar)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling fails in many ways
            raise ValueError(f"could not read {where} with torch.load(weights_only=True) ({type(err).__name__}: "
                             f"{err}). A training checkpoint may hold objects that safe loading refuses: save the "
                             "context alone, e.g. torch.save(torch.load(path, weights_only=False)['state_dict']"
                             "['ctx'], 'ctx.pt'), from a file you trust") from err
    if isinstance(obj, Mapping):
        obj = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
        found = [k for k, v in obj.items() if (k == "ctx" or str(k).endswith(".ctx")) and isinstance(v, Tensor)]
        if len(found) != 1:
            keys = ", ".join(map(repr, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
            raise ValueError(f"{where} holds no single prompt context: expected a tensor, or a state dict with a "
                             f"'ctx' entry (a CoOp checkpoint's state_dict['ctx']); its keys: {keys or 'none'}")
        obj = obj[found[0]]
    if not isinstance(obj, Tensor) or not obj.is_floating_point():
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a float prompt context (n_ctx, {width})")
    if obj.dim() != 2 or obj.shape[1] != width or obj.shape[0] < 1 or not torch.isfinite(obj).all():
        raise ValueError(f"the prompt context in {where} has shape {tuple(obj.shape)}, but this classifier's text "
                         f"tower takes finite (n_ctx, {width}) contexts (token width {width}); was it learned for "
                         "another CLIP model, or is it class-specific (CoOp's CSC, (n_cls, n_ctx, width))?")
    return obj.detach().to("cpu", torch.float32).clone()


class CLIPClassifier(nn.Module):
    """An open_clip model as a classifier over ``classnames``.

    Args:
        clip_model: an open_clip ``CLIP`` or ``CustomTextCLIP``.
        tokenizer: its tokenizer (``open_clip.get_tokenizer``).
        classnames: the class names (``_`` reads as a space).
        templates: texts per class, ``"{}"`` standing for the name; their normalised
            features are averaged (the CLIP paper's prompt ensemble).
        ctx_init: if given, the text before each class name becomes learnable
            context vectors (CoOp), initialised from the token embeddings of this
            text, e.g. ``"a photo of a"``, or from a saved context (a path to a
            tensor file or CoOp checkpoint; see :meth:`use_prompt`); ``templates``
            are then unused.
        mean, std, image_size, interpolation, resize_mode: the preprocessing
            (open_clip's ``preprocess_cfg``).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[..., Tensor],
        classnames: Sequence[str],
        templates: Sequence[str] = ("a photo of a {}.",),
        *,
        ctx_init: str | None = None,
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        image_size: int | tuple[int, int] = 224,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ) -> None:
        super().__init__()
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.templates = prompt_templates(templates)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.input_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic") else "bicubic"
        self.resize_mode = resize_mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.ctx: nn.Parameter | None = None
        self.ctx_init: str | None = None  # the prompt text the context stands in (placeholders for a saved one)
        self.ctx_source: str | None = None  # where a saved context came from
        self.text_encode_count = 0  # text-tower passes run so far (the cache's misses)
        self._cache: tuple[Any, Tensor] | None = None
        self.set_classnames(classnames)
        if ctx_init is not None:
            self.use_prompt(ctx_init)

    # -- classes and prompts -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify over ``classnames`` from now on (a learnable context is kept)."""
        self.classnames = class_names(classnames)
        if self.ctx is not None:
            self._build_prompt_tokens()
        self._cache = None

    def use_prompt(self, ctx_init: "str | os.PathLike | Tensor" = "a photo of a") -> None:
        """Switch to a learnable context (CoOp): ``ctx``, shared by all classes, in
        front of each class name. From prompt text, ``ctx`` holds its token
        embeddings (before any update the logits equal those of the template
        ``f"{ctx_init} {{}}."``). From a saved context (:func:`is_saved_context`: a
        (n_ctx, width) tensor, a file of one, or a CoOp checkpoint; read by
        :func:`load_context`), ``ctx`` is exactly that (as float32), in place of the
        placeholder tokens "X X ... X" CoOp learned it behind; so RLCF's reference
        code starts from a 16-shot ImageNet CoOp context (mzhaoshuai/RLCF,
        ``TPT/tpt_cls_rl.py`` lines 94-101; ``TPT/scripts/rlcf-prompt.sh`` lines 14, 61).
        """
        saved = None
        if is_saved_context(ctx_init):
            saved = load_context(ctx_init, self._text_tower().token_embedding.weight.shape[1])
            source = "<tensor>" if isinstance(ctx_init, Tensor) else os.fspath(ctx_init)
            text = " ".join(["X"] * saved.shape[0])
        else:
            source, text = None, ctx_init
        ids = self.tokenizer([text])[0]
        start = 1 if getattr(self.tokenizer, "sot_token_id", None) == int(ids[0]) else 0
        tokens = self.tokenizer([f"{text} {n.replace('_', ' ')}." for n in self.classnames])
        # The context is the run of tokens every prompt shares with the text alone.
        n_ctx = int((tokens == ids).cumprod(dim=1).sum(dim=1).min()) - start
        if n_ctx < 1:
            raise ValueError(f"ctx_init {ctx_init!r} gives no context tokens")
        if saved is not None and n_ctx != saved.shape[0]:
            raise ValueError(f"the saved context has {saved.shape[0]} tokens, but the prompts only fit {n_ctx} "
                             "before the class names")
        self.ctx_init, self.ctx_source, self._ctx_span = text, source, (start, n_ctx)
        self._build_prompt_tokens()
        if saved is None:
            with torch.no_grad():
                saved = self._text_tower().token_embedding(ids[start : start + n_ctx].to(self.mean.device))
        self.ctx = nn.Parameter(saved.detach().to(self.mean.device, torch.float32).clone())
        self._cache = None

    def _build_prompt_tokens(self) -> None:
        """Token ids of ``"<ctx_init> <class name>."``, whose embeddings around the
        context (start-of-text before it; class name, period, end after it) are
        looked up at each encoding: kept as tensors, they would miss the token
        embedding a loaded state dict or an update brings."""
        texts = [f"{self.ctx_init} {name.replace('_', ' ')}." for name in self.classnames]
        self.register_buffer("prompt_tokens", self.tokenizer(texts).to(self.mean.device), persistent=False)

    # -- text side ------------------------------------------------------------------------
    def _text_tower(self) -> SimpleNamespace:
        """The text tower's pieces, wherever this open_clip class keeps them."""
        m = self.clip
        if hasattr(m, "text"):  # CustomTextCLIP
            t = m.text
            if not hasattr(t, "token_embedding"):
                raise NotImplementedError(f"text tower {type(t).__name__} is not an open_clip TextTransformer")
            if getattr(t, "cls_emb", None) is not None or getattr(t, "use_pad_mask", False):
                raise NotImplementedError("learnable prompts need a text tower without class token or pad mask")
            return SimpleNamespace(token_embedding=t.token_embedding, positional_embedding=t.positional_embedding,
                                   transformer=t.transformer, ln_final=t.ln_final, text_projection=t.text_projection,
                                   attn_mask=t.attn_mask, pool_type=t.pool_type, eos_id=getattr(t, "eos_id", None))
        return SimpleNamespace(token_embedding=m.token_embedding, positional_embedding=m.positional_embedding,
                               transformer=m.transformer, ln_final=m.ln_final, text_projection=m.text_projection,
                               attn_mask=m.attn_mask, pool_type=m.text_pool_type,
                               eos_id=getattr(m, "text_eos_id", None))

    def _text_params(self) -> list[nn.Parameter]:
        t = self.clip.text if hasattr(self.clip, "text") else self.clip
        if t is self.clip:
            mods = [t.token_embedding, t.transformer, t.ln_final]
            params = [p for mod in mods for p in mod.parameters()] + [t.positional_embedding]
            if isinstance(t.text_projection, nn.Module):
                params += list(t.text_projection.parameters())
            elif t.text_projection is not None:  # a Parameter, or a tensor torch.func substituted
                params.append(t.text_projection)
        else:
            params = list(t.parameters())
        return params + ([self.ctx] if self.ctx is not None else [])

    def _encode_embedded(self, emb: Tensor, tokens: Tensor) -> Tensor:
        """open_clip's ``encode_text`` from token embeddings instead of token ids (the
        ids still locate the end-of-text token that is pooled)."""
        from open_clip.transformer import text_global_pool

        t = self._text_tower()
        cast = t.transformer.get_cast_dtype()
        x = emb.to(cast) + t.positional_embedding[: emb.shape[1]].to(cast)
        x = t.transformer(x, attn_mask=t.attn_mask)
        x = t.ln_final(x)
        x = text_global_pool(x, tokens, t.pool_type, eos_token_id=t.eos_id)
        if isinstance(t.text_projection, nn.Linear):
            x = t.text_projection(x)
        elif t.text_projection is not None:
            x = x @ t.text_projection
        return x

    def _compute_text_features(self) -> Tensor:
        self.text_encode_count += 1
        if self.ctx is not None:
            emb = self._text_tower().token_embedding(self.prompt_tokens)
            start, n_ctx = self._ctx_span
            ctx = self.ctx.unsqueeze(0).expand(self.num_classes, -1, -1).to(emb.dtype)
            emb = torch.cat([emb[:, :start], ctx, emb[:, start + n_ctx:]], dim=1)
            return F.normalize(self._encode_embedded(emb, self.prompt_tokens).float(), dim=-1)
        texts = [t.format(name.replace("_", " ")) for name in self.classnames for t in self.templates]
        device = self.mean.device
        chunks = [self.clip.encode_text(self.tokenizer(texts[i : i + 1000]).to(device)).float()
                  for i in range(0, len(texts), 1000)]
        per_template = F.normalize(torch.cat(chunks), dim=-1).view(self.num_classes, len(self.templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1)

    def text_features(self) -> Tensor:
        """L2-normalised class text features (classes, dim), float32.

        Cached, and recomputed only when the prompt context or a text-tower weight
        changed (or the device, or the autocast precision, did). With a learnable context, inside a
        grad-enabled region where text parameters require grad, they are computed
        afresh with a graph so gradients reach the context. With fixed templates the
        text side is a constant zero-shot head: gradients never reach it."""
        params = self._text_params()
        # Weights that torch.func.functional_call put in place of the parameters (MEMO
        # adapts every weight, text tower included, per image under vmap) are new
        # tensors at every call: compute with them, never cache what they give.
        substituted = not all(isinstance(p, nn.Parameter) for p in params)
        if substituted or (self.ctx is not None and torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return self._compute_text_features()
        device = self.mean.device
        # features computed under autocast are of its precision: not for full-precision calls
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (device, autocast, tuple(p._version for p in params), tuple(id(p) for p in params))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._compute_text_features())
        return self._cache[1]

    # -- image side -----------------------------------------------------------------------
    def preprocess(self, x: Tensor) -> Tensor:
        """Resize (shorter side, then centre crop; or squash) to :attr:`input_size`
        and normalise with the model's mean and std. Float RGB in [0, 1] in."""
        x = as_pixels(x, self.mean)
        h, w = x.shape[-2:]
        th, tw = self.input_size
        if (h, w) != (th, tw):
            if self.resize_mode == "squash":
                x = F.interpolate(x, size=(th, tw), mode=self.interpolation, antialias=True, align_corners=False)
            else:
                scale = max(th / h, tw / w)
                nh, nw = max(th, int(h * scale + 0.5)), max(tw, int(w * scale + 0.5))
                x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False)
                top, left = int(round((nh - th) / 2)), int(round((nw - tw) / 2))
                x = x[..., top : top + th, left : left + tw]
            if self.interpolation == "bicubic":
                x = x.clamp(0, 1)  # bicubic overshoots; PIL's uint8 output is clipped
        return (x - self.mean) / self.std

    def encode_image(self, x: Tensor, preprocessed: bool = False) -> Tensor:
        """L2-normalised image features (B, dim), float32, of pixels in [0, 1] (or of
        :meth:`preprocess` output with ``preprocessed=True``)."""
        features = self.clip.encode_image(x if preprocessed else self.preprocess(x))
        return F.normalize(features.float(), dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        """The multiplier of the cosine similarities: ``exp(clip.logit_scale)``."""
        return self.clip.logit_scale.exp().float()

    def logits(self, image_features: Tensor, text_features: Tensor | None = None) -> Tensor:
        """``logit_scale * image_features @ text_features.T`` (+ the model's logit
        bias, SigLIP); ``text_features`` default to :meth:`text_features`."""
        text_features = self.text_features() if text_features is None else text_features
        out = self.logit_scale * image_features.float() @ text_features.float().t()
        bias = getattr(self.clip, "logit_bias", None)
        return out + bias.float() if bias is not None else out

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.encode_image(x))

    def extra_repr(self) -> str:
        text = f"templates={len(self.templates)}" if self.ctx is None else \
            f"ctx_init={self.ctx_source if self.ctx_source is not None else self.ctx_init!r}"
        return f"num_classes={self.num_classes}, input_size={self.input_size}, {text}"


def from_open_clip(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    *,
    classnames: str | Sequence[str] | None = None,
    templates: str | Sequence[str] = "photo",
    ctx_init: str | None = None,
) -> CLIPClassifier:
    """An open_clip model (in eval mode) as a :class:`CLIPClassifier`, preprocessing
    as its ``model.visual.preprocess_cfg`` says (open_clip's defaults where unset)."""
    cfg = getattr(model.visual, "preprocess_cfg", {})
    return CLIPClassifier(
        model.eval(),
        tokenizer,
        class_names(classnames),
        prompt_templates(templates),
        ctx_init=ctx_init,
        mean=cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
        std=cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
        image_size=cfg.get("size", getattr(model.visual, "image_size", 224)),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )
