"""``memo``: test-time robustness via adaptation and augmentation (Zhang, Levine and
Finn, "MEMO: Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022).

Per test image, episodically: the model sees ``num_views`` AugMix views of the image
(a random crop and flip, then AugMix at severity 1; the image itself is not among
them), takes one SGD step on *all* its weights to minimise the entropy of the
views' average prediction (the marginal entropy), and then predicts the image itself
with the updated weights. Every image starts from the source weights again.

BatchNorm layers normalise with ``(1 - bn_alpha) * source + bn_alpha * (statistics
of this image's inputs)``: the views' statistics during the step, the image's own
(its spatial statistics) at the prediction. The statistics are the unbiased ones and
are constants in the backward, as in the official code's ``_modified_bn_forward``
and the port's ``AlphaBatchNorm`` (a momentum-1 running-statistics update).

Batched without a loop over images: one gradient per image on all weights is
``torch.func.vmap`` of ``torch.func.grad`` of the per-image loss (a
``functional_call`` of the model on that image's views), the per-image optimizer
step is computed functionally (each image gets its own updated copy of the weights,
the model's own parameters never change), and the prediction is a ``vmap`` of a
``functional_call`` of each image with its own weights. Inside ``vmap`` a BatchNorm
layer sees one image's inputs, so its statistics are that image's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .._checks import check_positive_int
from ..augment.kornia_views import augmix_views_transform, check_transform, check_view_options
from ..augment.views import augmented_copies
from .base import TTAMethod
from .entropy import marginal_entropy
from .norm_layers import MIXES_SOURCE_STATISTICS, batchnorm_layers, swap_forward
from .records import StepRecord
from .registry import register_method

__all__ = ["MEMO", "use_memo_batch_norm"]

#: Images per batched step on the CPU when ``images_per_forward`` is None. Measured
#: (ResNet-20, 32 AugMix views of 32 x 32, 1 thread, CPU time per image, two runs on
#: a loaded 2-core machine): 1 image: 178 / 163 ms, 2: 163 / 169, 4: 189 / 191,
#: 8: 205, 16: 313; a plain per-image loop 159 / 164. On the CPU the per-image weights
#: run as grouped convolutions, which oneDNN runs no faster than separate ones, and
#: bigger chunks fall out of the caches: batching gains nothing there, 2 is as good as
#: any. (On a GPU the whole batch in one step replaces B small launch-bound steps.)
CPU_IMAGES_PER_FORWARD = 2

#: View pixels per batched step elsewhere when ``images_per_forward`` is None: the
#: whole batch of CIFAR images at 32 views (512 images), 5 ImageNet images at 64
#: views of 224 px. Memory of one image's episode, measured: ResNet-20 at 32 views
#: of 32 x 32, about 110 MB (CPU peak RSS from 4 to 16 images per step: +1.36 GB):
#: the views' activations kept for the backward, and the image's own weights,
#: gradients and optimizer state (1.1 MB each here); a batch of 200 in one step is
#: ~22 GB. A ResNet-50 keeps roughly 90 MB of activations per 224 px view for its
#: backward (not measured here), so 5 images of 64 views are ~30 GB.
VIEW_PIXELS_PER_FORWARD = 2 ** 24


def _memo_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm on ``(1 - a) * source + a * (statistics of x)``, the statistics
    per channel over every dimension but the channels, with the unbiased variance
    (``n / (n - 1)``, ``n`` the values per channel),
    detached (constants in the backward). Under ``vmap`` over images ``x`` is one
    image's views (or the image alone), so the statistics are that image's."""
    a = self.memo_alpha
    if a == 0.0:
        out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    else:
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        # Two passes of sums: 7x faster than var_mean over these dimensions on the
        # CPU (ResNet-20 1st stage, 128 views: 2.4 ms against 16 ms), as accurate.
        # One value per channel (a single image on a 1 x 1 map) has no unbiased
        # variance; the biased one (0) keeps it finite (the official code raises).
        n = math.prod(x.shape[d] for d in dims)
        z = x.detach().float()
        mean = z.sum(dims) / n
        var = (z - mean.view(shape)).square().sum(dims) / max(n - 1, 1)
        if a != 1.0:
            mean = a * mean + (1 - a) * self.running_mean.float()
            var = a * var + (1 - a) * self.running_var.float()
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        out = x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)
    return out


def use_memo_batch_norm(model: nn.Module, alpha: float) -> int:
    """Make every BatchNorm2d/3d layer of ``model`` normalise as MEMO's (see
    :func:`_memo_bn_forward`) with test-statistics weight ``alpha``. BatchNorm1d
    layers (on pooled features or tokens) keep the source statistics, as in the
    official code and the port. The class of each layer is swapped for a subclass in
    place (state-dict keys unchanged). Returns the number of layers changed."""
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"bn_alpha must be a number in [0, 1], got {alpha!r}")
    layers = batchnorm_layers(model, (nn.BatchNorm2d, nn.BatchNorm3d),
                              needing_running_stats=MIXES_SOURCE_STATISTICS if alpha < 1.0 else None)
    for _, module in layers:
        swap_forward(module, _memo_bn_forward, "MEMO")
        module.memo_alpha = float(alpha)
    return len(layers)


@register_method("memo")
class MEMO(TTAMethod):
    """MEMO: per image, one step on all weights minimising the marginal entropy of
    ``num_views`` AugMix views, then the prediction of the image itself.

    Defaults are the official code's CIFAR-10-C setting (zhangmarvin/memo,
    cifar-10-exps): 32 views, plain SGD (``optim.SGD(net.parameters(), lr)``: momentum
    0, no Nesterov) with lr 0.005, one step; and ``bn_alpha`` 0.1 from the port
    (mariodoebler/test-time-adaptation ``BN.ALPHA``; the official CIFAR model is a
    GroupNorm ResNet-26, so it has no BatchNorm prior; its ImageNet code uses
    ``1 / (16 + 1) = 0.0588``). The tta default is the official plain SGD because it
    is MEMO's update: ``lr * g``. The port runs SGD with momentum 0.9 and Nesterov,
    which on each image's fresh optimizer moves ``lr * (g + 0.9 g) = 1.9 * lr * g``
    in its single step; the presets reproduce the port's configs, 1.9x included.

    Passes per image: ``steps`` x (forward and backward of the ``num_views`` views) +
    one forward of the image. The model's weights never change (each image's
    updated weights live only inside the step), so ``reset()`` has nothing to undo.

    Args:
        num_views: augmented views per image in the loss (the image itself is not
            one of them; official ``--batch_size`` 32 CIFAR / 64 ImageNet).
        crop: the crop before AugMix: ``"pad"`` (CIFAR: random crop with 4-pixel zero
            padding) or ``"resized"`` (ImageNet: random resized crop); see
            :class:`~tta.augment.kornia_views.CropFlip`.
        transform: the view pipeline instead of crop + AugMix, a module on (N, 3, H,
            W) batches in [0, 1] with per-image randomness (e.g. a
            ``kornia.augmentation`` pipeline); each image is repeated ``num_views``
            times, its copies contiguous.
        images_per_forward: how many images' episodes run in one batched step (their
            views, gradients and updated weights at once). ``None``: 2 images on the
            CPU (:data:`CPU_IMAGES_PER_FORWARD`, measured), elsewhere as many as make
            ``2**24`` view pixels (:data:`VIEW_PIXELS_PER_FORWARD`: a whole CIFAR
            batch, 5 ImageNet images at 64 views). Memory grows with it (measured:
            ResNet-20 at 32 views, about 110 MB per image).
        bn_alpha: weight of the image's statistics in BatchNorm layers (the port's
            ``BN.ALPHA``; 1/17 for the official ImageNet prior strength 16).
        steps: optimizer steps per image before its prediction (fresh views each
            step, as the official loop draws them; official ``--niter`` 1).
        lr: learning rate (official 0.005 CIFAR, 0.00025 ImageNet).
        momentum: SGD momentum of each image's fresh optimizer (official 0; the
            port 0.9, which with ``nesterov`` makes one step 1.9x as long).
        nesterov: Nesterov momentum (the port's ``OPTIM.NESTEROV``; needs momentum > 0).
        episodic: no further effect: every image starts from the source weights anyway.

    The optimizer options (``optimizer``: sgd, adam, adamw; ``weight_decay``,
    ``betas``) keep their base-class meaning; each image's update is computed
    functionally with the optimizer's update rule, from a fresh state.

    Differences from the official code: geometric AugMix ops fill black (the port's
    PIL default; official: grey 128); with ``steps > 1`` fresh views are drawn per
    step (official; the port reuses its loader's views); a BatchNorm input with one
    value per channel (one image on a 1 x 1 map) gets the biased variance 0 instead of
    the official error. BatchNorm1d layers keep the source statistics (as official
    and port). ``torch.func`` has no batching rule for CPU scaled-dot-product
    attention: ViTs run, with a per-image fallback inside ``vmap`` (and a warning).

    Presets reproduce the port's cfgs/cifar10_c/memo.yaml (32 views, SGD lr 0.005,
    momentum 0.9, Nesterov) and cfgs/imagenet_c/memo.yaml (64 views, SGD lr 0.00025,
    momentum 0.9, Nesterov, random resized crops), both ``BN.ALPHA`` 0.1 and one step.
    The port's ImageNet clean view is resized to 256 and centre-cropped back to 224
    (a 1.14x zoom of ImageNet-C's images); here the image is predicted as given.
    """

    batch_stats = False  # BatchNorm layers are configured here (use_memo_batch_norm)
    adapts_norm_params = False  # all weights adapt
    presets = {
        "cifar10": {"num_views": 32, "lr": 0.005, "momentum": 0.9, "nesterov": True},
        "imagenet": {"num_views": 64, "crop": "resized", "lr": 0.00025, "momentum": 0.9, "nesterov": True},
    }

    @classmethod
    def unused_options(cls) -> dict[str, str]:
        unused = super().unused_options()
        unused.pop("bn_alpha", None)  # MEMO's own BatchNorm layers take it
        # torch.compile cannot trace a compiled forward inside vmap (it failed with an
        # internal assertion), and there is no other forward to compile
        unused["compile"] = ("runs each image's episode through torch.func (vmap and grad), which torch.compile "
                             "does not trace")
        return unused

    def __init__(
        self,
        model: nn.Module,
        *,
        num_views: int = 32,
        crop: str = "pad",
        transform: nn.Module | None = None,
        images_per_forward: int | None = None,
        bn_alpha: float = 0.1,
        steps: int = 1,
        lr: float = 0.005,
        momentum: float = 0.0,
        nesterov: bool = False,
        **kwargs,
    ) -> None:
        check_view_options(num_views, crop, images_per_forward)
        check_transform(transform)
        check_positive_int(steps, "steps")
        if not (isinstance(bn_alpha, (int, float)) and 0.0 <= bn_alpha <= 1.0):
            raise ValueError(f"bn_alpha must be a number in [0, 1], got {bn_alpha!r}")
        if kwargs.get("amp") == "fp16":
            raise ValueError("memo computes its per-image gradients functionally, without a gradient scaler: "
                             "amp='fp16' would underflow them; use amp='bf16' or None")
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov=True needs momentum > 0 (got momentum={momentum!r}); the port's "
                             "setting is momentum=0.9, nesterov=True")
        # The base loop runs forward_and_adapt once per batch; the steps run inside,
        # per image.
        super().__init__(model, steps=1, lr=lr, momentum=momentum, nesterov=nesterov, bn_alpha=bn_alpha, **kwargs)
        self.tta_steps = steps
        self.num_views, self.crop, self.images_per_forward = num_views, crop, images_per_forward
        self.transform = transform if transform is not None else augmix_views_transform(crop)
        use_memo_batch_norm(model, bn_alpha)

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter of the model (the official code optimises ``net.parameters()``)."""
        return list(self.model.named_parameters())

    # -- the step ------------------------------------------------------------------
    def views(self, x: Tensor) -> Tensor:
        """``num_views`` augmented views of each image of ``x`` (B, C, H, W):
        (B, num_views, C, H, W)."""
        return augmented_copies(x, self.num_views, transform=self.transform)

    def _view_loss(self, params: dict[str, Tensor], views: Tensor) -> Tensor:
        """The marginal entropy of one image's views (V, C, H, W) under ``params``."""
        return marginal_entropy(functional_call(self.model, params, (views,)))

    def _predict(self, params: dict[str, Tensor], image: Tensor) -> Tensor:
        return functional_call(self.model, params, (image,))

    def _update(self, params: dict[str, Tensor], grads: dict[str, Tensor], state: dict[str, Any],
                t: int) -> dict[str, Tensor]:
        """Step ``t`` (from 1) of each image's fresh optimizer, functionally:
        torch's SGD / Adam / AdamW update rule on the per-image weights and
        gradients (B, ...)."""
        group = self.optimizer.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        new = {}
        if isinstance(self.optimizer, torch.optim.SGD):
            mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
            for name, g in grads.items():
                p = params[name]
                if wd:
                    g = g + wd * p
                if mu:
                    buf = g if t == 1 else mu * state[name] + (1 - damp) * g
                    state[name] = buf
                    g = g + mu * buf if nesterov else buf
                new[name] = p - lr * g
            return new
        (b1, b2), eps = group["betas"], group["eps"]
        decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        for name, g in grads.items():
            p = params[name]
            if decoupled:
                p = p * (1 - lr * wd)
            elif wd:
                g = g + wd * p
            m, v = state.get(name, (0.0, 0.0))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            state[name] = (m, v)
            denom = v.sqrt() / math.sqrt(1 - b2 ** t) + eps
            new[name] = p - (lr / (1 - b1 ** t)) * m / denom
        return new

    def adapt_and_predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """MEMO's episode for each image of ``x`` (B, C, H, W) at once: its logits
        after the adaptation (B, classes) and its last loss (B,)."""
        # Each image's own copy of the weights (an expanded view until its first
        # update): vmap then runs batched-weight (grouped) convolutions, 5-10% faster
        # on the CPU than sharing the weights and batching only their gradients.
        b = x.shape[0]
        params = {name: p.detach().expand(b, *p.shape) for name, p in self.adapted}
        state: dict[str, Any] = {}
        per_image_grad = vmap(grad_and_value(self._view_loss))
        for t in range(1, self.tta_steps + 1):
            grads, loss = per_image_grad(params, self.views(x))
            params = self._update(params, grads, state, t)
        logits = vmap(self._predict)(params, x.unsqueeze(1))
        return logits.squeeze(1), loss

    @torch.no_grad()  # torch.func.grad differentiates anyway; no graph is kept outside it
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        per_forward = self.images_per_forward or (
            CPU_IMAGES_PER_FORWARD if x.device.type == "cpu"
            else max(1, VIEW_PIXELS_PER_FORWARD // (self.num_views * x.shape[-2] * x.shape[-1])))
        logits, losses = zip(*(self.adapt_and_predict(chunk) for chunk in x.split(per_forward)))
        loss = torch.cat(losses).mean()
        return torch.cat(logits), StepRecord(num_samples=x.shape[0], num_selected=x.shape[0], loss=loss)
