"""ImageNet-C corruptions: API, determinism, devices, and fidelity to the original code.

Fidelity tests compare with the original implementation (``imagenet_c`` on PyPI for
the ImageNet tables at 224 px; the original algorithms with the CIFAR-10-C /
Tiny-ImageNet-C tables, see ``corruption_reference.py``) on shared CIFAR-10 test
images, every corruption and severity, three presets: mean PSNR within 1 dB, mean
SSIM within 0.03, and per-image mean absolute difference <= 2/255 for the
deterministic corruptions and for the random ones run on the original's own draws
(``PAIRED``). The public ``torch.Generator`` path of those is checked on the same
statistics over 48-512 CIFAR images. Skipped (not failed) when the reference stack
(imagenet-c, wand + ImageMagick, OpenCV, scikit-image, SciPy) is not installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tta.corruptions import ALL_NAMES, EXTRA_NAMES, NAMES, Corrupt, choose_preset, corrupt
from tta.data import cifar10_dir, load_image_folder
from tta.paths import tta_home

DETERMINISTIC = {
    "brightness", "contrast", "saturate", "pixelate", "jpeg_compression", "defocus_blur", "zoom_blur", "gaussian_blur",
}  # fmt: skip
RANDOM = set(ALL_NAMES) - DETERMINISTIC


def _shared_frost_dir() -> Path:
    return tta_home() / "data" / "imagenet-c-frost"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests run thousands of small tensor ops; on a busy 2-core machine two
    OpenMP threads wait on each other and run 10-80x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clean32() -> torch.Tensor:
    x, _ = load_image_folder(cifar10_dir("test"), num_images=64, seed=123)
    return x


def _up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling snapped to 8-bit, so both implementations see the same uint8 image."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).mul(255).round().clamp(0, 255).div(255)


# ------------------------------------------------------------------------------ API


def test_name_lists():
    assert NAMES == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    )  # fmt: skip
    assert EXTRA_NAMES == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert ALL_NAMES == NAMES + EXTRA_NAMES


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shape_dtype_range_all(name, clean32):
    x = clean32[:3]
    g = torch.Generator().manual_seed(0)
    y = corrupt(x, name, 3, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    # quantize=True: 8-bit levels like the original's uint8 output
    assert torch.allclose(y * 255, (y * 255).round(), atol=1e-3)
    # non-square, non-preset size through the imagenet tables
    z = corrupt(_up(x[:2], 48)[..., :40], name, 5, preset="imagenet", generator=g)
    assert z.shape == (2, 3, 48, 40) and z.min() >= 0 and z.max() <= 1


@pytest.mark.parametrize("name", ALL_NAMES)
def test_tiny_and_odd_sizes(name):
    """Images down to 1 px and far from any preset's size: a valid corruption, not a
    padding or solver error (the defocus disk, spatter's reflect-101 filters and
    elastic's control points are wider than such images)."""
    g = torch.Generator().manual_seed(0)
    for h, w in ((1, 1), (2, 3), (8, 8), (9, 5), (17, 33)):
        x = torch.rand(2, 3, h, w, generator=g)
        for severity in (1, 5):
            for preset in (None, "imagenet"):
                y = corrupt(x, name, severity, preset=preset, generator=torch.Generator().manual_seed(1))
                assert y.shape == x.shape and y.dtype == x.dtype
                assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1, (h, w, severity, preset)


def test_bad_names_presets_and_flags_are_refused_with_the_fix():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="did you mean 'jpeg_compression'"):
        corrupt(x, "jpeg", 3)
    with pytest.raises(ValueError, match="did you mean 'cifar'"):
        Corrupt("fog", 3, preset="cifa")
    with pytest.raises(TypeError, match="quantize must be True or False, got 'no'"):
        corrupt(x, "fog", 3, quantize="no")  # a truthy string quantised


@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (2, 3, 5, 0), (3, 0, 5)])
def test_images_without_pixels_are_refused(shape):
    with pytest.raises(ValueError, match=r"at least 1x1 pixels, got shape"):
        corrupt(torch.rand(shape), "jpeg_compression", 3)  # libjpeg crashed the process on them


def test_shot_noise_ends_for_uniforms_next_to_one_unquantised():
    # a uniform within float32 rounding of 1 stayed above every float32 partial sum:
    # without a cap on the count the unquantised sampler never ended
    x = torch.full((1, 3, 224, 224), 48 / 255)
    y = corrupt(x, "shot_noise", 5, generator=torch.Generator().manual_seed(80), quantize=False)
    q = corrupt(x, "shot_noise", 5, generator=torch.Generator().manual_seed(80))
    assert torch.equal(y.mul(255).floor(), q.mul(255))  # the same counts, quantised or not


@pytest.mark.parametrize("name", ["pixelate", "elastic_transform", "zoom_blur"])
@pytest.mark.parametrize("quantize", [True, False])
def test_a_callers_autocast_does_not_change_a_corruption(name, quantize):
    x = _up(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), 64)
    plain = corrupt(x, name, 5, preset="imagenet", generator=torch.Generator().manual_seed(1), quantize=quantize)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a model's amp around a Corrupt module
        mixed = corrupt(x, name, 5, preset="imagenet", generator=torch.Generator().manual_seed(1), quantize=quantize)
    assert torch.equal(plain, mixed)


def test_reflect101_matches_opencv_for_any_size():
    """OpenCV's BORDER_REFLECT_101 reflects again off the far edge where the
    padding is wider than the image: so do the padding and defocus's filter."""
    cv2 = pytest.importorskip("cv2")
    from tta.corruptions._blur import disk_kernel
    from tta.corruptions._filters import filter_reflect101, pad_reflect101

    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (1, 5), (2, 3), (5, 8), (8, 8), (12, 30)):
        img = rng.random((h, w, 3)).astype(np.float32)
        t = torch.from_numpy(img).permute(2, 0, 1)[None]
        for ph, pw in ((1, 1), (3, 7), (20, 2)):
            want = cv2.copyMakeBorder(img, ph, ph, pw, pw, cv2.BORDER_REFLECT_101).reshape(h + 2 * ph, w + 2 * pw, 3)
            assert np.array_equal(pad_reflect101(t, ph, pw)[0].permute(1, 2, 0).numpy(), want), (h, w, ph, pw)
        for radius, alias in ((3, 0.1), (10, 0.5)):
            kernel = disk_kernel(float(radius), alias)
            want = cv2.filter2D(img, -1, kernel).reshape(h, w, 3)
            got = filter_reflect101(t, kernel)[0].permute(1, 2, 0).numpy()
            assert np.abs(got - want).max() < 1e-5, (h, w, radius)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_seeded_generator_reproduces(name, clean32):
    x = clean32[:2]
    a = corrupt(x, name, 4, generator=torch.Generator().manual_seed(7))
    b = corrupt(x, name, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    if name in RANDOM:
        c = corrupt(x, name, 4, generator=torch.Generator().manual_seed(8))
        assert not torch.equal(a, c)


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_per_image_generators_make_each_image_independent_of_its_batch(preset, clean32):
    # One generator per image: an image's corruption is decided by its own
    # generator alone, whatever else is in the batch and wherever it sits.
    x = clean32[:6] if preset == "cifar" else _up(clean32[:3], 224)
    n = x.shape[0]

    def gens(ids):
        return [torch.Generator().manual_seed(100 + i) for i in ids]

    for name in ALL_NAMES:
        full = corrupt(x, name, 5, preset=preset, generator=gens(range(n)))
        order = [n - 1, 0, 1]
        part = corrupt(x[order], name, 5, preset=preset, generator=gens(order))
        alone = corrupt(x[1:2], name, 5, preset=preset, generator=gens([1]))
        assert torch.equal(full[order], part), name
        assert torch.equal(full[1:2], alone), name
        if name in RANDOM:
            other = corrupt(x[1:2], name, 5, preset=preset, generator=gens([7]))
            assert not torch.equal(alone, other), name


@pytest.mark.parametrize("name", ALL_NAMES)
def test_memory_layout_does_not_change_the_result(name, clean32):
    # Loaders give channels-last images, users often contiguous ones: the same
    # values and seed must give the same corruption (renders and the 8-bit
    # conversion take either layout their own way).
    x = clean32[:3]
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    for size in (32, 64):
        cl = _up(x, size) if size != 32 else x
        nchw = cl.contiguous()
        a = corrupt(cl, name, 5, preset="cifar", generator=torch.Generator().manual_seed(3))
        b = corrupt(nchw, name, 5, preset="cifar", generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b), (name, size)


def test_per_image_generator_errors(clean32):
    x = clean32[:3]
    with pytest.raises(ValueError, match="2 generators for a batch of 3 images"):
        corrupt(x, "fog", 3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match="one per image"):
        corrupt(x, "fog", 3, generator=[torch.Generator(), 3, torch.Generator()])
    assert corrupt(x[:0], "fog", 3, generator=[]).shape[0] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["gaussian_noise", "glass_blur", "fog", "jpeg_compression", "elastic_transform"])
def test_dtypes(name, dtype, clean32):
    x = clean32[:2]
    ref = corrupt(x, name, 2, generator=torch.Generator().manual_seed(1))
    y = corrupt(x.to(dtype), name, 2, generator=torch.Generator().manual_seed(1))
    assert y.dtype == dtype and y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    if dtype == torch.float64:  # same draws, finer arithmetic: equal up to a level here and there
        assert (y.float() - ref).abs().mean() < 1 / 255


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_uint8_images_give_the_uint8_levels_of_their_float_images(preset):
    # What decoders give (torchvision.io.decode_jpeg, a DataLoader of them): uint8
    # in, uint8 out, no float batch read or written. Before, uint8 was refused.
    u = torch.randint(0, 256, (5, 3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name in ALL_NAMES:
        for layout in (torch.contiguous_format, torch.channels_last):
            images = u.contiguous(memory_format=layout)
            got = corrupt(images, name, 5, preset=preset, generator=torch.Generator().manual_seed(1))
            floats = corrupt(images.float() / 255, name, 5, preset=preset, generator=torch.Generator().manual_seed(1))
            assert got.dtype == torch.uint8 and got.shape == u.shape, name
            assert torch.equal(got, floats.mul(255).round().to(torch.uint8)), (name, layout)
    one = Corrupt("shot_noise", 2, preset=preset)(u[0], torch.Generator().manual_seed(2))  # a dataset transform
    assert one.dtype == torch.uint8 and one.shape == u[0].shape
    assert torch.equal(images, u)  # the caller's images untouched
    with pytest.raises(ValueError, match=r"quantize=False keeps results between the 8-bit levels.*x.float\(\) / 255"):
        corrupt(u, "fog", 3, quantize=False)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ALL_NAMES)
def test_cuda_matches_cpu_generator(name, clean32):
    x = clean32[:2]
    y_cpu = corrupt(x, name, 3, generator=torch.Generator().manual_seed(3))
    y_gpu = corrupt(x.cuda(), name, 3, generator=torch.Generator().manual_seed(3))
    assert y_gpu.device.type == "cuda"
    assert (y_gpu.cpu() - y_cpu).abs().mean() < 1 / 255
    z = corrupt(x.cuda(), name, 3, generator=torch.Generator("cuda").manual_seed(3))
    assert z.device.type == "cuda" and z.min() >= 0 and z.max() <= 1


@pytest.mark.parametrize("name", ALL_NAMES)
def test_chunked_rendering_matches_one_batch(name, clean32, monkeypatch):
    # The CPU renders a batch in cache-sized chunks after drawing for the whole
    # batch; accelerators render it at once. The cut never changes a value.
    import tta.corruptions._render as render

    for x, preset in ((clean32[:5], "cifar"), (_up(clean32[:4], 40), "imagenet")):
        results = []
        for values in (1, 1 << 30):  # one image per chunk, the whole batch
            monkeypatch.setattr(render, "_CPU_CHUNK_VALUES", values)
            results.append(corrupt(x, name, 5, preset=preset, generator=torch.Generator().manual_seed(4)))
        assert torch.equal(*results), (name, preset)


def test_accelerator_paths_match_cpu_paths(clean32):
    """The batched gathers that motion blur, snow and frost use off the CPU give the
    CPU's per-image slices; the tensor JPEG codec stays within 0.1 level of libjpeg
    on average (0.006-0.05 measured at 64 px)."""
    from tta.corruptions._resample import _shifted_sum_gather, _shifted_sum_slices, imagemagick_motion_offsets
    from tta.corruptions._jpeg import _jpeg_tensors, jpeg_compression
    from tta.corruptions._weather import _frost_crops_gathered, _frost_crops_sliced

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 24, generator=g)
    k, dx, dy = imagemagick_motion_offsets(6.0, 3.0, torch.tensor([-44.0, 3.0, 40.0]))
    k = k.float()
    assert torch.equal(_shifted_sum_gather(x, k, dx, dy), _shifted_sum_slices(x, k.tolist(), dx.tolist(), dy.tolist()))

    textures = [torch.randint(0, 256, (3, 30 + i, 33 - i), dtype=torch.uint8, generator=g) for i in range(5)]
    idx = torch.tensor([4, 0, 2])
    top, left = torch.tensor([3, 9, 0]), torch.tensor([3, 0, 6])
    assert torch.equal(
        _frost_crops_gathered((20, 24), textures, idx, top, left), _frost_crops_sliced((20, 24), textures, idx, top, left)
    )

    images = _up(clean32[:8], 64)
    for quality in (7, 25, 80):
        codec = jpeg_compression(images, quality, None).float()
        tensors = _jpeg_tensors(images, quality).float()
        assert (codec - tensors).abs().mean() < 0.1, quality


def test_quantize_off_gives_continuous_values(clean32):
    x = clean32[:2]
    y = corrupt(x, "gaussian_noise", 1, generator=torch.Generator().manual_seed(0), quantize=False)
    assert not torch.allclose(y * 255, (y * 255).round(), atol=1e-3)
    assert y.min() >= 0 and y.max() <= 1


def test_preset_choice_and_override(clean32):
    assert choose_preset(32, 32) == "cifar"
    assert choose_preset(64, 64) == "tinyimagenet"
    assert choose_preset(224, 224) == "imagenet"
    assert choose_preset(100, 80) == "imagenet"
    assert choose_preset(28, 28) == "cifar" and choose_preset(33, 20) == "tinyimagenet"
    assert choose_preset(64, 48) == "tinyimagenet" and choose_preset(65, 65) == "imagenet"
    x = clean32[:4]
    # CIFAR severity-1 contrast keeps 0.75 of the deviation, ImageNet's keeps 0.4
    auto = corrupt(x, "contrast", 1, quantize=False)
    cifar = corrupt(x, "contrast", 1, preset="cifar", quantize=False)
    imnet = corrupt(x, "contrast", 1, preset="imagenet", quantize=False)
    assert torch.equal(auto, cifar) and not torch.allclose(cifar, imnet)
    mean = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(imnet, ((x - mean) * 0.4 + mean).clamp(0, 1))


def test_module_matches_function(clean32):
    x = clean32[:2]
    aug = Corrupt("shot_noise", 2, generator=torch.Generator().manual_seed(5))
    assert isinstance(aug, torch.nn.Module)
    assert "shot_noise" in repr(aug)
    y = aug(x)
    assert torch.equal(y, corrupt(x, "shot_noise", 2, generator=torch.Generator().manual_seed(5)))
    # a generator passed to forward overrides the module's own
    plain = Corrupt("gaussian_noise", 3)
    a = plain(x, generator=torch.Generator().manual_seed(9))
    b = plain(x, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert torch.equal(a, corrupt(x, "gaussian_noise", 3, generator=torch.Generator().manual_seed(9)))
    with pytest.raises(ValueError):
        Corrupt("shotnoise!", 2)
    with pytest.raises(ValueError):
        Corrupt("shot_noise", 9)


def test_errors(clean32):
    x = clean32[:1]
    with pytest.raises(ValueError, match="did you mean 'gaussian_noise'"):
        corrupt(x, "gausian_noise", 1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "teleport", 1)
    for bad in (0, 6, -1):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", bad)
    for bad in (2.5, "3", True, None):
        with pytest.raises(TypeError, match="severity"):
            corrupt(x, "fog", bad)
    assert corrupt(x, "contrast", np.int64(2)).shape == x.shape
    # one image, as a dataset transform gets it: the batch of one's result, unbatched
    one = corrupt(x[0], "fog", 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, corrupt(x, "fog", 1, generator=torch.Generator().manual_seed(0))[0])
    assert torch.equal(Corrupt("fog", 1)(x[0], torch.Generator().manual_seed(0)), one)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) or \(3, H, W\)"):
        corrupt(x[0, :1], "fog", 1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        corrupt(x[:, :1], "fog", 1)
    with pytest.raises(TypeError, match="floating point RGB in \\[0, 1\\] or uint8 RGB, got dtype torch.int32"):
        corrupt((x * 255).to(torch.int32), "fog", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x * 255, "fog", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x - 0.5, "fog", 1)
    with pytest.raises(TypeError):
        corrupt(x.numpy(), "fog", 1)
    with pytest.raises(ValueError, match="preset"):
        corrupt(x, "fog", 1, preset="cifar10")
    with pytest.raises(TypeError, match="generator"):
        corrupt(x, "fog", 1, generator=0)
    assert corrupt(x[:0], "fog", 1).shape == (0, 3, 32, 32)


# ------------------------------------------------------------------------- fidelity
# Corruptions whose randomness is a few global draws (angles, textures, fields): the
# per-image spread of PSNR across draws is 1-3 dB, far above the 1 dB tolerance for
# a handful of images. Their fidelity test pairs the draws: tta runs with a stand-in
# random stream replaying NumPy's draws in the original's order (same seed for both),
# which checks every step of the corruption pixel by pixel; the public
# torch.Generator path is checked statistically on many CIFAR images below.
PAIRED = {"glass_blur", "motion_blur", "snow", "frost", "fog", "elastic_transform", "spatter"}

# images per (preset, corruption): fewer where the pure-Python original is slow
_N = {
    "cifar": {"default": 24, "noise": 64, "paired": 12},
    "tinyimagenet": {"default": 8, "noise": 16, "paired": 6, "glass_blur": 2},
    "imagenet": {"default": 4, "noise": 8, "paired": 3, "glass_blur": 1},
}
_SIZE = {"cifar": 32, "tinyimagenet": 64, "imagenet": 224}
_PSNR_CAP = 60.0  # identical images have infinite PSNR; cap so means stay finite


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _psnr_ssim(clean: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = [min(peak_signal_noise_ratio(c, o, data_range=255), _PSNR_CAP) for c, o in zip(clean, out)]
    ssim = [structural_similarity(c, o, channel_axis=-1, data_range=255) for c, o in zip(clean, out)]
    return float(np.mean(psnr)), float(np.mean(ssim))


@pytest.fixture(scope="module")
def reference():
    from benchmarks import corruption_reference as ref  # the repository root is on pytest's pythonpath

    try:
        ref.load_reference(_shared_frost_dir())
    except ImportError as err:  # imagenet-c, wand/ImageMagick, OpenCV, scikit-image, SciPy
        pytest.skip(f"original ImageNet-C code not importable: {err}")
    pytest.importorskip("skimage.metrics")
    return ref


@pytest.fixture(scope="module")
def many32() -> torch.Tensor:
    x, _ = load_image_folder(cifar10_dir("test"), num_images=512, seed=321)
    return x


def _compare(reference, x, name, preset, n_label, paired, mad_limit):
    clean = _to_uint8(x)
    report = []
    for severity in range(1, 6):
        seed = 1000 * severity
        if paired:
            ref = reference.reference_corrupt(
                clean, name, severity, preset, _shared_frost_dir(), seed=seed, seed_per_image=True
            )
            ours = np.concatenate(
                [
                    _to_uint8(reference.ours_with_numpy_draws(x[i : i + 1], name, severity, preset, None, seed + i))
                    for i in range(len(x))
                ]
            )
        else:
            ref = reference.reference_corrupt(clean, name, severity, preset, _shared_frost_dir(), seed=seed)
            g = torch.Generator().manual_seed(seed)
            ours = _to_uint8(corrupt(x, name, severity, preset=preset, generator=g))
        p_ref, s_ref = _psnr_ssim(clean, ref)
        p_our, s_our = _psnr_ssim(clean, ours)
        mad = np.abs(ref.astype(np.float64) - ours.astype(np.float64)).mean(axis=(1, 2, 3)).max()
        report.append(
            f"s{severity}: PSNR {p_our:.2f} vs {p_ref:.2f} dB, SSIM {s_our:.4f} vs {s_ref:.4f}, max MAD {mad:.3f}/255"
        )
        msg = f"{preset} {name} ({n_label})\n" + "\n".join(report)
        assert abs(p_our - p_ref) <= 1.0, msg
        assert abs(s_our - s_ref) <= 0.03, msg
        if mad_limit is not None:
            assert mad <= mad_limit, msg
    print(f"\n{preset} {name} ({n_label}): " + "; ".join(report))


@pytest.mark.parametrize("preset", ["cifar", "tinyimagenet", "imagenet"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_fidelity_to_original(name, preset, clean32, reference):
    counts = _N[preset]
    kind = "paired" if name in PAIRED else "noise" if name.endswith("_noise") else "default"
    n = counts.get(name, counts[kind])
    x = clean32[:n] if preset == "cifar" else _up(clean32[:n], _SIZE[preset])
    paired = name in PAIRED
    # paired draws make every corruption comparable pixel by pixel
    mad_limit = 2.0 if (name in DETERMINISTIC or paired) else None
    _compare(reference, x, name, preset, f"{n} images, {'paired draws' if paired else 'torch.Generator'}", paired, mad_limit)


# statistics of the public torch.Generator path for the PAIRED corruptions
# sized from the measured per-image spread across draws (PSNR sd <= 2.8 dB, SSIM sd
# <= 0.13 for elastic): keeps both tolerances >= 3.5 standard errors of the difference
_N_STATS = {"glass_blur": 48, "elastic_transform": 512, "frost": 384, "spatter": 256}


@pytest.mark.parametrize("name", sorted(PAIRED))
def test_generator_path_statistics(name, many32, reference):
    n = _N_STATS.get(name, 192)
    _compare(reference, many32[:n], name, "cifar", f"{n} images, torch.Generator", False, None)


# ------------------------------------------------------------------ glass, frost files


@pytest.mark.parametrize("low,high", [(-4, 4), (-2, 2), (0, 2), (-3, 3), (0, 5)])
def test_randint_draws_every_integer_of_its_range_alike(low, high):
    # Power-of-two ranges come from bit fields of shared 30-bit draws, the others
    # from one draw each: both uniform over [low, high), neighbours independent, and
    # with one generator per image each image's draws are its generator's alone.
    from tta.corruptions._common import Rng

    cpu = torch.device("cpu")
    for gen in (torch.Generator().manual_seed(0), [torch.Generator().manual_seed(i) for i in range(4)]):
        v = Rng(gen, cpu, torch.float32).randint(low, high, (4, 300, 250), dtype=torch.int8)
        assert v.dtype == torch.int8 and v.shape == (4, 300, 250)
        assert v.min() == low and v.max() == high - 1
        share = torch.bincount((v.long() - low).flatten(), minlength=high - low).double() / v.numel()
        assert (share - 1 / (high - low)).abs().max() < 0.005  # 300 000 draws: sd < 0.001
        a = v.flatten().double()
        assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1]) < 0.01
        if isinstance(gen, list):
            alone = Rng([torch.Generator().manual_seed(2)], cpu, torch.float32).randint(low, high, (1, 300, 250))
            assert torch.equal(alone[0], v[2].long())


@pytest.mark.parametrize("delta", [1, 2, 4])
def test_glass_shuffle_matches_sequential_loop(delta):
    """The vectorised shuffle equals the original's sequential numpy-view "swap"."""
    from tta.corruptions._blur import _gather_pixels, _glass_sources

    g = torch.Generator().manual_seed(delta)
    img = torch.rand(2, 3, 13, 11, generator=g)
    h, w = img.shape[-2:]
    rows, cols = len(range(h - delta, delta, -1)), len(range(w - delta, delta, -1))
    draws = torch.randint(-delta, delta, (2, rows, cols, 2), generator=g)
    got = _gather_pixels(img, _glass_sources(2, h, w, delta, draws))
    for b in range(2):
        x = img[b].permute(1, 2, 0).numpy().copy()  # HWC, like the original
        for i, hh in enumerate(range(h - delta, delta, -1)):
            for j, ww in enumerate(range(w - delta, delta, -1)):
                dx, dy = (int(v) for v in draws[b, i, j])
                x[hh, ww], x[hh + dy, ww + dx] = x[hh + dy, ww + dx], x[hh, ww]
        np.testing.assert_array_equal(got[b].permute(1, 2, 0).numpy(), x)


def test_frost_checksums_match_shared_textures():
    from tta.corruptions import FROST_FILES, FROST_SHA256
    from tta.paths import sha256_of

    folder = _shared_frost_dir()
    if not folder.is_dir():
        pytest.skip(f"no shared frost textures at {folder}")
    assert set(FROST_FILES) == set(FROST_SHA256)
    for name in FROST_FILES:
        assert sha256_of(folder / name) == FROST_SHA256[name]


def test_frost_textures_cached_per_device():
    from tta.corruptions import load_frost_textures

    a = load_frost_textures(_shared_frost_dir(), 0.2, "cpu")
    b = load_frost_textures(_shared_frost_dir(), 0.2, "cpu")
    assert a is b and len(a) == 6 and a[0].dtype == torch.uint8 and a[0].shape == (3, 120, 180)


def test_frost_missing_offline_names_directory(tmp_path, monkeypatch, clean32):
    import tta.corruptions._frost as frost_mod

    def offline(url, dest, sha256_prefix=None):
        raise RuntimeError(f"could not download {url} (offline); place the file by hand at {dest}")

    monkeypatch.setattr(frost_mod, "download", offline)
    empty = tmp_path / "no-frost-here"
    with pytest.raises(FileNotFoundError, match="no-frost-here"):
        corrupt(clean32[:1], "frost", 1, frost_dir=empty)


def test_frost_download_once_with_checksum(tmp_path, monkeypatch, clean32):
    """Missing textures are fetched (here from the shared copy through a file:// URL,
    with tta.paths.download and its sha256 check) into the cache, once."""
    import tta.corruptions._frost as frost_mod

    src = _shared_frost_dir()
    if not src.is_dir():
        pytest.skip(f"no shared frost textures at {src}")
    monkeypatch.setattr(frost_mod, "FROST_URL", src.resolve().as_uri() + "/{name}")
    calls = []
    real = frost_mod.download
    monkeypatch.setattr(frost_mod, "download", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cache = tmp_path / "cache" / "imagenet-c-frost"
    y = corrupt(clean32[:2], "frost", 3, frost_dir=cache, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 6 and sorted(p.name for p in cache.iterdir()) == sorted(frost_mod.FROST_FILES)
    ref = corrupt(clean32[:2], "frost", 3, frost_dir=src, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, ref)
    frost_mod._CACHE.clear()
    corrupt(clean32[:1], "frost", 1, frost_dir=cache)
    assert len(calls) == 6  # present now: nothing downloaded again

    # a corrupted download is rejected by the checksum
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "frost1.png").write_bytes(b"not a png")
    monkeypatch.setattr(frost_mod, "FROST_URL", bad.resolve().as_uri() + "/{name}")
    with pytest.raises(FileNotFoundError, match="checksum"):
        corrupt(clean32[:1], "frost", 1, frost_dir=tmp_path / "other")


def test_corrupt_module_in_sequential(clean32):
    aug = torch.nn.Sequential(Corrupt("contrast", 2), Corrupt("jpeg_compression", 1))
    y = aug(clean32[:2])
    assert y.shape == (2, 3, 32, 32) and y.min() >= 0 and y.max() <= 1


def test_set_frost_dir_module_setting(tmp_path, monkeypatch, clean32):
    import tta.corruptions._frost as frost_mod
    from tta.corruptions import default_frost_dir, set_frost_dir

    def offline(url, dest, sha256_prefix=None):
        raise RuntimeError(f"could not download {url} (offline)")

    monkeypatch.setattr(frost_mod, "download", offline)
    try:
        set_frost_dir(tmp_path / "elsewhere")
        assert default_frost_dir() == tmp_path / "elsewhere"
        with pytest.raises(FileNotFoundError, match="elsewhere"):
            corrupt(clean32[:1], "frost", 2)
        # an explicit argument wins over the setting
        y = corrupt(clean32[:1], "frost", 2, frost_dir=_shared_frost_dir())
        assert y.shape == (1, 3, 32, 32)
    finally:
        set_frost_dir(None)
    assert default_frost_dir() == tta_home() / "data" / "imagenet-c-frost"


def test_motion_blur_off_the_cpu_reads_no_device_value_per_tap():
    """The batched (accelerator) motion blur of motion_blur and snow reads its tap
    weights from the host: on a device tensor, float(k[t]) waited for the device at
    every one of up to 31 taps. Meta tensors stand in for a device here (they have
    no values to read, so any host read raises)."""
    from tta.corruptions._resample import imagemagick_motion_offsets, motion_blur_im

    k, dx, dy = imagemagick_motion_offsets(7.5, 3.0, torch.zeros(2, device="meta"))
    assert k.device.type == "cpu" and dx.device.type == "meta"
    y = motion_blur_im(torch.empty(2, 3, 20, 24, device="meta"), 7.5, 3.0, torch.zeros(2, device="meta"))
    assert y.shape == (2, 3, 20, 24) and y.device.type == "meta"


def test_corrupt_with_a_generator_warns_in_several_dataloader_workers(monkeypatch):
    """Each DataLoader worker gets a copy of a Corrupt transform's generator in the
    same state: the workers then corrupt their images with the same draws (items 0
    and 1, in workers 0 and 1, came out identical). That warns, once per process;
    without a generator, or re-seeded per worker, it does not."""
    import types
    import warnings

    x = torch.full((3, 8, 8), 0.5)
    worker = types.SimpleNamespace(id=1, num_workers=2)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    seeded = Corrupt("gaussian_noise", 3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="same random draws"):
        seeded(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seeded(x)  # once per process
        Corrupt("gaussian_noise", 3)(x)  # torch's generator, seeded per worker
        reseeded = Corrupt("gaussian_noise", 3, generator=torch.Generator().manual_seed(0))
        reseeded.generator.manual_seed(1000 + worker.id)  # what a worker_init_fn does
        reseeded(x)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
        Corrupt("gaussian_noise", 3, generator=torch.Generator().manual_seed(0))(x)  # the main process
        # a corruption that draws nothing, and worker 0 re-seeded with seed + its id (0)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
        Corrupt("brightness", 3, generator=torch.Generator().manual_seed(0))(x)
        worker.id = 0
        first = Corrupt("gaussian_noise", 3, generator=torch.Generator().manual_seed(0))
        first.generator.manual_seed(0 + worker.id)
        first(x)
