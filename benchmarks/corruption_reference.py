"""The original ImageNet-C corruption code, made importable today: the reference of
the corruption fidelity tests (``tests/test_corruptions.py``) and of the benchmarks
that compare tta's corruptions with it (``corruptions_resnet20``, ``corruptions_speed``).

``imagenet_c`` (PyPI, hendrycks/robustness) is the reference for ``preset="imagenet"``.
It predates NumPy 2, scikit-image 0.19+ and setuptools without ``pkg_resources``, so
its incompatibilities are patched here, around the module, never inside ``tta``:

* ``pkg_resources.resource_filename`` (frost textures) -> a shim pointing at the
  frost folder (the PyPI wheel does not ship the textures anyway);
* ``np.float_`` and binary ``np.fromstring`` -> a NumPy proxy seen only by the module;
* ``skimage.filters.gaussian(multichannel=True)`` -> ``channel_axis=-1``;
* ``skimage.util.random_noise`` -> seeded from ``np.random`` so ``np.random.seed``
  makes the whole reference reproducible.

The CIFAR-10-C and Tiny-ImageNet-C generators (``make_cifar_c.py``,
``make_tinyimagenet_c.py``) were never packaged. :func:`reference_corrupt` runs the
same algorithms with their tables: the helper functions (``disk``,
``plasma_fractal``, ``clipped_zoom``, ImageMagick motion blur) are the package's own,
the corruption bodies below are the original's logic with the image size and the
severity row passed in instead of hard-coded.

Install: ``pip install imagenet-c --no-deps scipy scikit-image "opencv-python-headless<5"
wand`` and ``apt-get install imagemagick libmagickwand-dev``.
"""

from __future__ import annotations

import sys
import types
from io import BytesIO
from pathlib import Path

import numpy as np

__all__ = ["load_reference", "reference_corrupt", "REF_TABLES"]

_MODULE = None


class _Proxy:
    """Attribute access falls through to ``target`` except for the overrides."""

    def __init__(self, target, **overrides):
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._target, name)


def load_reference(frost_dir: str | Path):
    """Import ``imagenet_c.corruptions`` with the compatibility patches applied.

    Raises ``ImportError`` when a piece of the reference stack (imagenet-c, wand with
    the ImageMagick library, OpenCV, scikit-image, SciPy) is missing.
    """
    global _MODULE
    frost_dir = Path(frost_dir)
    if _MODULE is None:
        try:
            import pkg_resources  # noqa: F401  (present on old setuptools)
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda package, rel: str(Path(rel))
            sys.modules["pkg_resources"] = shim
        import skimage
        import skimage.color
        import skimage.filters
        import skimage.util

        import warnings

        with warnings.catch_warnings():  # its scipy.ndimage.interpolation import is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            import imagenet_c.corruptions as mod

        def gaussian(image, sigma=1, multichannel=None, **kwargs):
            if multichannel:
                kwargs["channel_axis"] = -1
            return skimage.filters.gaussian(image, sigma=sigma, **kwargs)

        def random_noise(image, **kwargs):
            kwargs.setdefault("rng", int(np.random.randint(0, 2**31 - 1)))
            return skimage.util.random_noise(image, **kwargs)

        import cv2

        read_cache = {}

        def imread(path, *args):
            # the original re-decodes a frost texture for every image; same pixels, cached
            key = (str(path), args)
            if key not in read_cache:
                read_cache[key] = cv2.imread(str(path), *args)
            return read_cache[key].copy()

        mod.np = _Proxy(np, float_=np.float64, fromstring=lambda s, dtype: np.frombuffer(s, dtype).copy())
        mod.cv2 = _Proxy(cv2, imread=imread)
        mod.gaussian = gaussian
        mod.sk = _Proxy(skimage, util=_Proxy(skimage.util, random_noise=random_noise), color=skimage.color)
        _MODULE = mod
    _MODULE.resource_filename = lambda package, rel: str(frost_dir / Path(rel).name)
    _MODULE._tta_frost_dir = frost_dir
    return _MODULE


# ----------------------------------------------------------------------------- tables
# Severity rows of make_cifar_c.py ("cifar") and make_tinyimagenet_c.py ("tinyimagenet").

REF_TABLES = {
    "cifar": {
        "gaussian_noise": [0.04, 0.06, .08, .09, .10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [.01, .02, .03, .05, .07],
        "speckle_noise": [.06, .1, .12, .16, .2],
        "gaussian_blur": [.4, .6, 0.7, .8, 1],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                      np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
        "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                 (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                 (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                    (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                    (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
        "contrast": [.75, .5, .4, .3, 0.15],
        "brightness": [.05, .1, .15, .2, .3],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "elastic_transform": [(32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                              (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                              (32 * 0.1, 32 * 0.03, 32 * 0.03)],
        "plasma_mapsize": 32,
        "frost_rescale": 0.2,
    },
    "tinyimagenet": {
        "gaussian_noise": [0.04, 0.08, .12, .15, .18],
        "shot_noise": [250, 100, 50, 30, 15],
        "impulse_noise": [.01, .02, .05, .08, .14],
        "speckle_noise": [.15, .2, 0.25, 0.3, 0.35],
        "gaussian_blur": [.5, .75, 1, 1.25, 1.5],
        "glass_blur": [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
        "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
        "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                      np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
        "fog": [(.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
        "frost": [(1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)],
        "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
                 (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
                 (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)],
        "spatter": [(0.62, 0.1, 0.7, 0.7, 0.6, 0), (0.65, 0.1, 0.8, 0.7, 0.6, 0),
                    (0.65, 0.3, 1, 0.69, 0.6, 0), (0.65, 0.1, 0.7, 0.68, 0.6, 1),
                    (0.65, 0.1, 0.5, 0.67, 0.6, 1)],
        "contrast": [.4, .3, .2, .1, .05],
        "brightness": [.1, .2, .3, .4, .5],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        "jpeg_compression": [65, 58, 50, 40, 25],
        "pixelate": [0.9, 0.8, 0.7, 0.6, 0.5],
        "elastic_transform": [(64 * 0, 64 * 0, 64 * 0.08), (64 * 0.05, 64 * 0.3, 64 * 0.06),
                              (64 * 0.1, 64 * 0.08, 64 * 0.06), (64 * 0.1, 64 * 0.03, 64 * 0.03),
                              (64 * 0.16, 64 * 0.03, 64 * 0.02)],
        "plasma_mapsize": 64,
        "frost_rescale": 0.3,
    },
}  # fmt: skip


# ------------------------------------------------------- size/table-parametrised bodies
# Each takes a PIL image, its severity row ``c``, the image size ``s`` and the
# preset table ``t``; returns what the original function returns.


def _r_gaussian_noise(m, x, c, s, t):
    x = np.array(x) / 255.0
    return np.clip(x + np.random.normal(size=x.shape, scale=c), 0, 1) * 255


def _r_shot_noise(m, x, c, s, t):
    x = np.array(x) / 255.0
    return np.clip(np.random.poisson(x * c) / c, 0, 1) * 255


def _r_impulse_noise(m, x, c, s, t):
    x = m.sk.util.random_noise(np.array(x) / 255.0, mode="s&p", amount=c)
    return np.clip(x, 0, 1) * 255


def _r_speckle_noise(m, x, c, s, t):
    x = np.array(x) / 255.0
    return np.clip(x + x * np.random.normal(size=x.shape, scale=c), 0, 1) * 255


def _r_gaussian_blur(m, x, c, s, t):
    x = m.gaussian(np.array(x) / 255.0, sigma=c, multichannel=True)
    return np.clip(x, 0, 1) * 255


def _r_glass_blur(m, x, c, s, t):
    x = np.uint8(m.gaussian(np.array(x) / 255.0, sigma=c[0], multichannel=True) * 255)
    for _ in range(c[2]):
        for h in range(s - c[1], c[1], -1):
            for w in range(s - c[1], c[1], -1):
                dx, dy = np.random.randint(-c[1], c[1], size=(2,))
                hp, wp = h + dy, w + dx
                x[h, w], x[hp, wp] = x[hp, wp], x[h, w]  # the original's view "swap"
    return np.clip(m.gaussian(x / 255.0, sigma=c[0], multichannel=True), 0, 1) * 255


def _r_defocus_blur(m, x, c, s, t):
    import cv2

    x = np.array(x) / 255.0
    kernel = m.disk(radius=c[0], alias_blur=c[1])
    channels = np.array([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)]).transpose((1, 2, 0))
    return np.clip(channels, 0, 1) * 255


def _im_motion(m, png_bytes, radius, sigma, angle):
    import cv2

    img = m.MotionImage(blob=png_bytes)
    img.motion_blur(radius=radius, sigma=sigma, angle=angle)
    return cv2.imdecode(np.frombuffer(img.make_blob(), np.uint8), cv2.IMREAD_UNCHANGED)


def _r_motion_blur(m, x, c, s, t):
    out = BytesIO()
    x.save(out, format="PNG")
    x = _im_motion(m, out.getvalue(), c[0], c[1], np.random.uniform(-45, 45))
    if x.shape != (s, s):
        return np.clip(x[..., [2, 1, 0]], 0, 255)
    return np.clip(np.array([x, x, x]).transpose((1, 2, 0)), 0, 255)


def _r_zoom_blur(m, x, c, s, t):
    x = (np.array(x) / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for z in c:
        out += m.clipped_zoom(x, z)
    return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


def _r_fog(m, x, c, s, t):
    x = np.array(x) / 255.0
    max_val = x.max()
    x += c[0] * m.plasma_fractal(mapsize=t["plasma_mapsize"], wibbledecay=c[1])[:s, :s][..., np.newaxis]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _r_frost(m, x, c, s, t):
    import cv2

    idx = np.random.randint(5)
    name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"][idx]
    frost = m.cv2.imread(str(m._tta_frost_dir / name))
    f = t["frost_rescale"]
    frost = cv2.resize(frost, (0, 0), fx=f, fy=f)
    xs, ys = np.random.randint(0, frost.shape[0] - s), np.random.randint(0, frost.shape[1] - s)
    frost = frost[xs : xs + s, ys : ys + s][..., [2, 1, 0]]
    return np.clip(c[0] * np.array(x) + c[1] * frost, 0, 255)


def _r_snow(m, x, c, s, t):
    import cv2
    from PIL import Image

    x = np.array(x, dtype=np.float32) / 255.0
    snow = np.random.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    snow = m.clipped_zoom(snow[..., np.newaxis], c[2])
    snow[snow < c[3]] = 0
    snow = Image.fromarray((np.clip(snow.squeeze(), 0, 1) * 255).astype(np.uint8), mode="L")
    out = BytesIO()
    snow.save(out, format="PNG")
    snow = _im_motion(m, out.getvalue(), c[4], c[5], np.random.uniform(-135, -45)) / 255.0
    snow = snow[..., np.newaxis]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(s, s, 1) * 1.5 + 0.5)
    return np.clip(x + snow + np.rot90(snow, k=2), 0, 1) * 255


def _r_spatter(m, x, c, s, t):
    import cv2

    x = np.array(x, dtype=np.float32) / 255.0
    liquid = np.random.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    liquid = m.gaussian(liquid, sigma=c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        liquid = (liquid * 255).astype(np.uint8)
        dist = 255 - cv2.Canny(liquid, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
        dist = cv2.equalizeHist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)
        dist = cv2.filter2D(dist, cv2.CV_8U, ker)
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        mm = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
        mm /= np.max(mm, axis=(0, 1))
        mm *= c[4]
        color = np.concatenate((175 / 255.0 * np.ones_like(mm[..., :1]), 238 / 255.0 * np.ones_like(mm[..., :1]),
                                238 / 255.0 * np.ones_like(mm[..., :1])), axis=2)  # fmt: skip
        color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        return cv2.cvtColor(np.clip(x + mm * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255
    mm = np.where(liquid > c[3], 1, 0)
    mm = m.gaussian(mm.astype(np.float32), sigma=c[4])
    mm[mm < 0.8] = 0
    color = np.concatenate((63 / 255.0 * np.ones_like(x[..., :1]), 42 / 255.0 * np.ones_like(x[..., :1]),
                            20 / 255.0 * np.ones_like(x[..., :1])), axis=2)  # fmt: skip
    color *= mm[..., np.newaxis]
    x *= 1 - mm[..., np.newaxis]
    return np.clip(x + color, 0, 1) * 255


def _r_contrast(m, x, c, s, t):
    x = np.array(x) / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _r_brightness(m, x, c, s, t):
    x = m.sk.color.rgb2hsv(np.array(x) / 255.0)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    return np.clip(m.sk.color.hsv2rgb(x), 0, 1) * 255


def _r_saturate(m, x, c, s, t):
    x = m.sk.color.rgb2hsv(np.array(x) / 255.0)
    x[:, :, 1] = np.clip(x[:, :, 1] * c[0] + c[1], 0, 1)
    return np.clip(m.sk.color.hsv2rgb(x), 0, 1) * 255


def _r_jpeg_compression(m, x, c, s, t):
    from PIL import Image

    out = BytesIO()
    x.save(out, "JPEG", quality=c)
    return Image.open(out)


def _r_pixelate(m, x, c, s, t):
    from PIL import Image

    x = x.resize((int(s * c), int(s * c)), Image.BOX)
    return x.resize((s, s), Image.BOX)


def _r_elastic_transform(m, image, c, s, t):
    import cv2
    from scipy.ndimage import map_coordinates

    image = np.array(image, dtype=np.float32) / 255.0
    shape = image.shape
    shape_size = shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float32([center_square + square_size, [center_square[0] + square_size, center_square[1] - square_size],
                       center_square - square_size])  # fmt: skip
    pts2 = pts1 + np.random.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
    mat = cv2.getAffineTransform(pts1, pts2)
    image = cv2.warpAffine(image, mat, shape_size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    dx = (m.gaussian(np.random.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (m.gaussian(np.random.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dx, dy = dx[..., np.newaxis], dy[..., np.newaxis]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
    return np.clip(map_coordinates(image, indices, order=1, mode="reflect").reshape(shape), 0, 1) * 255


_BODIES = {name[3:]: fn for name, fn in list(globals().items()) if name.startswith("_r_")}


def reference_corrupt(
    images: np.ndarray, name: str, severity: int, preset: str, frost_dir: str | Path, seed: int = 0,
    parametrised: bool = False, seed_per_image: bool = False,
) -> np.ndarray:
    """Corrupt ``(N, H, W, 3)`` uint8 images with the original code; returns uint8.

    ``preset="imagenet"`` calls the ``imagenet_c`` package itself (224 px images)
    unless ``parametrised`` asks for the bodies above with the package's own
    severity rows (used to check those bodies against the package).
    ``seed_per_image`` seeds NumPy with ``seed + i`` before image ``i`` (to pair
    draws with :func:`ours_with_numpy_draws`); otherwise once with ``seed``.
    """
    from PIL import Image

    m = load_reference(frost_dir)
    np.random.seed(seed)
    size = images.shape[1]
    out = []
    for i, img in enumerate(images):  # the original works image by image
        if seed_per_image:
            np.random.seed(seed + i)
        pil = Image.fromarray(img)
        if preset == "imagenet" and not parametrised:
            res = getattr(m, name)(pil, severity)
        else:
            if preset == "imagenet":
                c = _imagenet_row(m, name, severity)
                t = {"plasma_mapsize": 256, "frost_rescale": 1.0}
            else:
                t = REF_TABLES[preset]
                c = t[name][severity - 1]
            res = _BODIES[name](m, pil, c, size, t)
        out.append(np.uint8(res))
    return np.stack(out)


def _imagenet_row(m, name: str, severity: int):
    """Severity row of the package function, read from its source (the rows are
    local lists inside each function)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(getattr(m, name)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "c":
            table = node.value.value  # c = [...][severity - 1]
            return eval(compile(ast.Expression(table), "<table>", "eval"), {"np": np})[severity - 1]
    raise KeyError(name)


class NumpyDraws:
    """Stands in for ``tta.corruptions._common.Rng`` with NumPy's global legacy RNG,
    drawing what the original draws, in its order and shapes, for one image
    (batch 1). With the same ``np.random.seed`` both implementations then see the
    same random numbers, so their outputs can be compared pixel by pixel."""

    generator = None

    def __init__(self, dtype=None, device="cpu"):
        import torch

        self.dtype = dtype or torch.float32
        self.device = torch.device(device)
        self.source = self.device

    def _t(self, a):
        import torch

        t = torch.as_tensor(np.asarray(a))
        return t.to(self.dtype) if t.is_floating_point() else t.long()

    def uniform(self, shape, low=0.0, high=1.0):
        return self._t(np.random.uniform(low, high, size=shape))

    def normal(self, shape, mean=0.0, std=1.0):
        return self._t(np.random.normal(size=shape, loc=mean, scale=std))

    def randint(self, low, high, shape, dtype=None):
        return self._t(np.random.randint(low, high, size=shape))

    def randint_below(self, high):
        return self._t([np.random.randint(0, int(h)) for h in high.reshape(-1)]).reshape(high.shape)

    def poisson(self, rates):
        return self._t(np.random.poisson(rates.double().numpy()))


def ours_with_numpy_draws(x, name: str, severity: int, preset: str, frost_dir, seed: int):
    """``tta.corruptions`` on one image ``(1, 3, H, W)`` with NumPy's draws (seeded)."""
    import tta.corruptions as tc

    np.random.seed(seed)
    return tc._apply(x, name, severity, preset, NumpyDraws(), True, frost_dir)
