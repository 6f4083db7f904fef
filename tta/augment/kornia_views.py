"""The augmentation of the continual methods, from Kornia: CoTTA's view transform
(Wang et al., CVPR 2022), which RMT, SANTA and RoTTA use too, ROID's lighter
variant without blur and noise, and AdaContrast's weak and strong views.

The original (torchvision, on the padded image) is colour jitter with gamma in a
random order, padding by half the image size, a random affine (±15°, translation
1/16 of the padded side, scale 0.9-1.1), Gaussian blur (kernel 5), centre crop, a
horizontal flip and pixel noise (std 0.005). Here the same ops come from
``kornia.augmentation``, batched on the images' device with per-image parameters;
the affine samples beyond the border by replicating it (``border``, the original's
edge padding) or mirroring it (``reflection``, ROID's), which is what padding,
transforming and cropping back does, without the 4x larger canvas. The translation
is therefore 1/8 of the unpadded side (the same pixels).

Draws come from torch's global generator (Kornia's), so ``torch.manual_seed`` and
a restored RNG state reproduce them.
"""

from __future__ import annotations

import torch
from kornia import augmentation as K
from torch import Tensor, nn

from .._checks import check_positive_int
from .views import augmix

__all__ = ["cotta_augmentation", "colour_jitter_pro", "shares_draws_over_batch", "adacontrast_weak_augmentation", "adacontrast_strong_augmentation",
           "stack_views", "Clamp", "CropFlip", "AugMix", "augmix_views_transform", "CROPS",
           "check_view_options", "check_transform"]


class Clamp(nn.Module):
    """Clip pixels to [0, 1] (the original's ``Clip``: jitter and noise overshoot)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(0.0, 1.0)


def colour_jitter_pro(
    *, brightness: tuple[float, float], contrast: tuple[float, float], saturation: tuple[float, float],
    hue: tuple[float, float], gamma: tuple[float, float], same_on_batch: bool = False,
) -> K.ImageSequential:
    """CoTTA's ``ColorJitterPro``: brightness, contrast, saturation, hue and gamma,
    each factor drawn uniformly from its range, applied in a random order drawn per
    call (the original's ``randperm(5)``, gamma among the five).

    Each colour step is a one-step ``K.ColorJitter`` (``order=(i,)``), not
    ``K.ColorJiggle`` nor ``K.RandomBrightness``/``RandomContrast``: those add the
    brightness factor minus 1 and scale contrast and saturation without blending
    with the grey image, where the original calls torchvision's functional ops
    (ColorJitter's; up to 0.27 apart on a pixel at brightness 1.3)."""
    steps = [K.ColorJitter(**{name: value}, order=(i,), p=1.0, same_on_batch=same_on_batch)
             for i, (name, value) in enumerate((("brightness", brightness), ("contrast", contrast),
                                                ("saturation", saturation), ("hue", hue)))]
    gamma_step = K.RandomGamma(gamma=gamma, p=1.0, same_on_batch=same_on_batch)
    return K.ImageSequential(*steps, gamma_step, random_apply=True)


def cotta_augmentation(
    *, soft: bool = False, blur_and_noise: bool = True, noise_std: float = 0.005,
    padding_mode: str = "border", same_on_batch: bool = False,
) -> nn.Sequential:
    """CoTTA's view transform as Kornia modules, for float RGB (N, 3, H, W) in [0, 1].

    Args:
        soft: the original's milder ranges (``soft=True``).
        blur_and_noise: CoTTA's Gaussian blur and pixel noise (``cotta_augs``); ROID
            leaves both out.
        noise_std: standard deviation of the pixel noise.
        padding_mode: ``"border"`` (the original's edge padding; CoTTA, RMT, SANTA,
            RoTTA) or ``"reflection"`` (ROID).
        same_on_batch: one draw of every random parameter for the whole batch
            (but the pixel noise), as the original's torchvision transforms do on a
            batch tensor; by default each image draws its own. This is the one
            deliberate difference of the default from the official code of CoTTA,
            RMT, ROID, CMF, SANTA and RoTTA (which call these transforms on the batch
            tensor): per-image draws scored lower errors on the shared ResNet-20
            (benchmarks/RESULTS.md, "The continual-shift family"); ``True``
            reproduces the official draws (:func:`stack_views` then draws per view).
    """
    ops: list[nn.Module] = [
        colour_jitter_pro(
            brightness=(0.8, 1.2) if soft else (0.6, 1.4),
            contrast=(0.85, 1.15) if soft else (0.7, 1.3),
            saturation=(0.75, 1.25) if soft else (0.5, 1.5),
            hue=(-0.03, 0.03) if soft else (-0.06, 0.06),
            gamma=(0.85, 1.15) if soft else (0.7, 1.3),
            same_on_batch=same_on_batch,
        ),
        K.RandomAffine(
            degrees=8.0 if soft else 15.0,
            translate=(1 / 8, 1 / 8),
            scale=(0.95, 1.05) if soft else (0.9, 1.1),
            padding_mode=padding_mode,
            p=1.0, same_on_batch=same_on_batch,
        ),
    ]
    if blur_and_noise:
        ops.append(K.RandomGaussianBlur(kernel_size=5, sigma=(0.001, 0.25) if soft else (0.001, 0.5),
                                        border_type="replicate", p=1.0, same_on_batch=same_on_batch))
    ops.append(K.RandomHorizontalFlip(p=0.5, same_on_batch=same_on_batch))
    if blur_and_noise:
        ops.append(K.RandomGaussianNoise(std=noise_std, p=1.0))
    return nn.Sequential(Clamp(), *ops, Clamp())


def adacontrast_weak_augmentation() -> nn.Module:
    """The weak view ("plain": resize, random crop to the same size, flip): at the
    model's input size only a horizontal flip, per image."""
    return K.RandomHorizontalFlip(p=0.5)


def adacontrast_strong_augmentation(blur_kernel_size: int = 13) -> nn.Sequential:
    """The strong view, MoCo v2 without its crop ("moco-v2-light", the official
    online code's view for CIFAR-10-C and ImageNet-C), per image: colour jitter
    (brightness, contrast, saturation 0.4, hue 0.1) with probability 0.8, grayscale
    with 0.2, Gaussian blur (sigma in [0.1, 2] pixels, PIL's ``radius``; edges
    replicated as PIL does) with 0.5, a horizontal flip. ``blur_kernel_size`` 13 holds
    three standard deviations of the widest blur. The jitter's order of operations
    is drawn per batch (Kornia's), not per image (torchvision's)."""
    return nn.Sequential(
        K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur(blur_kernel_size, sigma=(0.1, 2.0), border_type="replicate", p=0.5),
        K.RandomHorizontalFlip(p=0.5),
    )


def stack_views(x: Tensor, num_views: int, transform: nn.Module) -> Tensor:
    """``num_views`` augmented copies of the batch ``x`` (B, C, H, W), stacked view
    after view as one (num_views * B, C, H, W) batch: the views come out of one call
    of ``transform`` (each image its own parameters) and go through the model as one
    forward. A transform that draws once per batch (``same_on_batch=True`` on a
    Kornia module of it, as ``cotta_augmentation(same_on_batch=True)``, the official
    code's draws) is called once per view instead: in one call every view would be
    the same."""
    if shares_draws_over_batch(transform):
        return torch.cat([transform(x) for _ in range(num_views)])
    return transform(x.repeat(num_views, 1, 1, 1))


def shares_draws_over_batch(transform: nn.Module) -> bool:
    """Whether a Kornia module of ``transform`` draws one set of parameters for a
    whole batch (``same_on_batch=True``)."""
    return isinstance(transform, nn.Module) and any(getattr(m, "same_on_batch", None) is True
                                                    for m in transform.modules())


# ----------------------------------------------------------------------------------
# MEMO's and TTAug's views: a crop and flip, then AugMix
# ----------------------------------------------------------------------------------

CROPS = ("pad", "resized")


class CropFlip(nn.Module):
    """The pre-augmentation of an AugMix view, at the input's size, per image, from
    Kornia: ``"pad"`` a random crop of the image padded by ``padding`` zero pixels
    (CIFAR's ``RandomCrop(32, padding=4)``); ``"resized"`` a random resized crop
    (ImageNet's ``RandomResizedCrop``, area ``scale``, aspect 3/4-4/3); then a
    horizontal flip with probability 0.5."""

    def __init__(self, crop: str = "pad", padding: int = 4, scale: tuple[float, float] = (0.08, 1.0)) -> None:
        super().__init__()
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.crop, self.padding, self.scale = crop, padding, tuple(scale)
        self.flip = K.RandomHorizontalFlip(p=0.5)

    def forward(self, x: Tensor) -> Tensor:
        size = tuple(x.shape[-2:])
        # Kornia's crops take the output size when built: build one for this size.
        crop = (K.RandomCrop(size, padding=self.padding, fill=0.0) if self.crop == "pad"
                else K.RandomResizedCrop(size, scale=self.scale))
        return self.flip(crop(x))

    def extra_repr(self) -> str:
        return f"crop={self.crop!r}, " + (f"padding={self.padding}" if self.crop == "pad" else f"scale={self.scale}")


class AugMix(nn.Module):
    """:func:`~tta.augment.views.augmix` as a module (severity 1, width 3, depth 1-3:
    MEMO's and the port's AugMix)."""

    def __init__(self, severity: float = 1.0, width: int = 3, max_depth: int = 3) -> None:
        super().__init__()
        self.severity, self.width, self.max_depth = severity, width, max_depth

    def forward(self, x: Tensor) -> Tensor:
        return augmix(x, self.severity, self.width, self.max_depth)

    def extra_repr(self) -> str:
        return f"severity={self.severity}, width={self.width}, max_depth={self.max_depth}"


def augmix_views_transform(crop: str = "pad") -> nn.Sequential:
    """The view transform of MEMO and TTAug (the port's ``AugMixAugmenter``): a
    random crop and flip (:class:`CropFlip`), then AugMix mixing the cropped image
    with three chains of its augmentations. Geometric ops fill with black (the port's
    PIL default; official MEMO fills grey)."""
    return nn.Sequential(CropFlip(crop), AugMix())


def check_transform(transform: object, option: str = "transform") -> None:
    """A method's view option: ``None`` (its default views) or a callable on (N, 3, H,
    W) batches, checked when the method is built: some methods call it only now and
    then (ROID on the images it keeps, RoTTA at its memory updates), so anything
    else would fail mid-stream, without naming the option."""
    if transform is not None and not callable(transform):
        raise TypeError(f"{option} must be a module on (N, 3, H, W) batches in [0, 1] (e.g. a "
                        f"kornia.augmentation pipeline) or None for the default, got {type(transform).__name__}")


def check_view_options(num_views: int, crop: str, images_per_forward: int | None) -> None:
    """The options of a method that predicts from AugMix views (MEMO, TTAug), checked
    before it touches the model."""
    check_positive_int(num_views, "num_views")
    check_positive_int(images_per_forward, "images_per_forward", optional=True)
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
