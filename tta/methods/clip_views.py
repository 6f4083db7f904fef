"""What TPT and RLCF share: what they need of a CLIP classifier (checked by what it
can do, not by its class), augmented views, the confident-view selection and TPT's
marginal entropy, and a fresh start from the source parameters for every image."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from ..augment.views import Views, gather_views
from ..models.clip import is_saved_context
from .base import TTAMethod
from .params import select_norm_params
from .entropy import marginal_entropy, softmax_entropy  # noqa: F401  (marginal_entropy: TPT's loss, re-exported)

__all__ = ["CLIP_INTERFACE", "check_clip_classifier", "marginal_entropy", "select_confident", "CLIPViewsMethod",
           "clip_adapted_params", "refuse_compile_of_encoders"]

#: Views encoded per forward pass when selecting (bounds memory for big batches).
VIEW_CHUNK = 256

#: What the CLIP methods use of a classifier (``tta.models.clip.CLIPClassifier`` has
#: it all): its class names, a learnable prompt context (``ctx``, set by
#: ``use_prompt``), the text features of the classes, the image encoder, and
#: ``logits(image_features, text_features)`` with its ``logit_scale``.
CLIP_INTERFACE = ("classnames", "num_classes", "ctx", "use_prompt", "text_features", "encode_image",
                  "logits", "logit_scale")


def check_clip_classifier(model: nn.Module, method: str) -> None:
    """Raise a helpful error unless ``model`` has what a CLIP method uses
    (:data:`CLIP_INTERFACE`)."""
    missing = [name for name in CLIP_INTERFACE if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"{method} adapts a CLIP classifier (its prompt or image encoder), got "
            f"{type(model).__name__}, which has no {', '.join(missing)}; load one with "
            "tta.load_model('clip:ViT-B-16/openai', classnames=...)"
        )


def clip_adapted_params(model: nn.Module, adapt: str, method: str) -> list[tuple[str, nn.Parameter]]:
    """What a CLIP method adapts, by its ``adapt=`` choice: ``"prompt"`` the learned
    context (``model.ctx``), ``"image"`` every weight of the image encoder
    (``model.clip.visual``), ``"image_norm"`` its norm affines (RLCF's and TTRV's
    choices)."""
    if adapt == "prompt":
        return [("ctx", model.ctx)]
    visual = getattr(getattr(model, "clip", None), "visual", None)
    if not isinstance(visual, nn.Module):
        raise TypeError(f"{method} adapt={adapt!r} adapts the image encoder at model.clip.visual, which "
                        f"{type(model).__name__} does not have; use adapt='prompt'")
    chosen = select_norm_params(visual) if adapt == "image_norm" else list(visual.named_parameters())
    return [(f"clip.visual.{n}", p) for n, p in chosen]


def select_confident(logits: Tensor, fraction: float = 0.1) -> Tensor:
    """Indices (B, k) of the ``k = max(1, int(N * fraction))`` views with the lowest
    prediction entropy per image, given view logits (B, N, classes), most confident
    first (TPT's confidence selection, ``selection_p``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the selected fraction must be in (0, 1], got {fraction!r}")
    k = max(1, int(logits.shape[1] * fraction))
    return softmax_entropy(logits).topk(k, dim=1, largest=False).indices



def refuse_compile_of_encoders(name: str) -> None:
    raise TypeError(f"{name} runs the CLIP classifier's encoders, never its forward, which is what compile "
                    "compiles: 'compile' would change nothing; drop it")


class CLIPViewsMethod(TTAMethod):
    """Base of the per-image CLIP methods. Each test image is seen through
    ``num_views`` views (itself plus random resized crops), the ``selection_p``
    fraction with the lowest entropy is kept, ``steps`` optimisation steps run on
    those, and the prediction is made on the image itself. Every image starts from
    the source parameters and a fresh optimizer (the papers' protocol), so the
    method is always episodic, per image.

    The crops are cut from the image as given (the reference code cuts them from the
    full-resolution image, before its resize and centre crop); the classifier then
    resizes every view to its input size.

    The views of the whole batch are drawn and scored in one go; the optimisation
    loops over the images of a batch, since each image needs its own copy of the
    adapted parameters (a prompt's text pass over all classes, or the image encoder).

    Args:
        num_views: views per test image, the image itself included (the papers: 64).
        selection_p: fraction of the views kept, the most confident (the papers: 0.1).
        augmix: AugMix the crops. The reference code does so for fine-grained
            datasets only, not for ImageNet and its variants (crops and flips only).
        transform: the crop of each view but the first, a module on (N, 3, H, W)
            batches of one's own (e.g. a ``kornia.augmentation`` pipeline; default:
            random resized crops and flips, :func:`~tta.augment.views.random_resized_crops`).
        steps: optimisation steps per test image, on the same selected views.
        ctx_init: text whose token embeddings start the learnable context (CoOp),
            when the classifier has no learnable prompt yet; or a saved context (a
            path to a tensor file or a CoOp checkpoint, or the tensor), which the
            classifier takes whatever it had (``CLIPClassifier.use_prompt``).
        episodic: no further effect: every test image starts from the source anyway.
    """

    #: the kind of model the method needs (the generic method tests skip these)
    requires = "clip"
    batch_stats = False  # CLIP is used as trained (ResNet towers keep their statistics)
    adapts_norm_params = False  # the prompt, or the image encoder as ``adapt`` says
    #: whether the learnable prompt context is what adapts
    adapts_prompt = True
    #: whether a step runs the classifier's forward (else only its encoders, which
    #: ``compile``, compiling the forward, does not reach)
    calls_forward = False

    def __init__(
        self,
        model: nn.Module,
        *,
        num_views: int = 64,
        selection_p: float = 0.1,
        augmix: bool = False,
        transform: nn.Module | None = None,
        steps: int = 1,
        ctx_init: "str | os.PathLike | Tensor" = "a photo of a",
        **kwargs,
    ) -> None:
        check_clip_classifier(model, self.method_name or type(self).__name__)
        check_positive_int(steps, "steps")
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer (the image itself included), got {num_views!r}")
        if isinstance(selection_p, bool) or not isinstance(selection_p, (int, float)):
            raise ValueError(f"selection_p must be a number in (0, 1], got {selection_p!r}")
        if not 0 < selection_p <= 1:
            raise ValueError(f"selection_p must be in (0, 1], got {selection_p!r}")
        if not isinstance(augmix, bool):
            raise ValueError(f"augmix must be True or False, got {augmix!r}")
        if transform is not None and not isinstance(transform, nn.Module):
            raise TypeError(f"transform must be an nn.Module on (N, 3, H, W) batches, got {type(transform).__name__}")
        if kwargs.get("compile") and not self.calls_forward:
            refuse_compile_of_encoders(self.method_name or type(self).__name__)
        if is_saved_context(ctx_init) or (self.adapts_prompt and model.ctx is None):
            model.use_prompt(ctx_init)
        # The base loop runs forward_and_adapt once per batch; the steps run inside.
        super().__init__(model, steps=1, **kwargs)
        self.tta_steps = steps
        self.selection_p = selection_p
        self.views = Views(num_views, use_augmix=augmix, transform=transform)

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        return [("ctx", self.model.ctx)]

    @torch.no_grad()
    def select_views(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Views of each image, scored with the source parameters. Returns the
        image features of all views (B, N, dim; view 0 is the image itself), the
        indices of the selected views (B, k), and their pixels (B, k, C, H, W)."""
        self.restart()
        per_chunk = max(1, VIEW_CHUNK // self.views.num_views)
        features, index, pixels = [], [], []
        text = self.model.text_features()
        for images in x.split(per_chunk):
            views = self.views(images)
            feats = self.model.encode_image(views.flatten(0, 1)).view(*views.shape[:2], -1)
            chosen = select_confident(self.model.logits(feats, text), self.selection_p)
            features.append(feats)
            index.append(chosen)
            pixels.append(gather_views(views, chosen))
        return torch.cat(features), torch.cat(index), torch.cat(pixels)

    def adapt_each_image(self, num_images: int, loss: Callable[[int], Tensor],
                         predict: Callable[[int], Tensor]) -> tuple[Tensor, Tensor]:
        """For each image ``i`` of the batch: back to the source parameters, then
        ``steps`` optimisation steps on ``loss(i)``, then ``predict(i)`` (its
        (1, classes) logits, without gradients). Returns the logits of the batch and
        the mean of the images' last losses."""
        logits, losses = [], []
        for i in range(num_images):
            self.restart()
            for _ in range(self.tta_steps):
                value = loss(i)
                self.backward(value)
                self.step()
            losses.append(value.detach())
            with torch.no_grad():
                logits.append(predict(i))
        return torch.cat(logits), torch.stack(losses).mean()

    def restart(self) -> None:
        """Where each test image starts: the source parameters and a fresh optimizer
        (as :meth:`reset`, but the stream's update count goes on). A method that
        carries something from image to image (RLCF's momentum buffer) starts
        elsewhere."""
        self.restore_adapted()

    def snapshot(self) -> None:
        """Record the adapted parameters as the state every test image starts from
        (only those change, so only those are kept)."""
        self._source_state = {"params": [p.detach().clone() for _, p in self.adapted]}

    def source_params(self) -> list[Tensor]:
        if self._source_state is None:
            self.snapshot()
        return self._source_state["params"]

    def reset(self) -> None:
        """Back to the source parameters, a fresh optimizer and no updates counted
        (what ``reset_every`` compares with), bit-exact."""
        if self._source_state is None:
            self.snapshot()
            return
        self.restore_adapted()
        self.num_updates = 0
