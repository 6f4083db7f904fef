"""End to end, offline: the shared pretrained ResNet-20 on real corrupted CIFAR-10."""

import pytest
import torch

import tta

pytestmark = pytest.mark.slow

CIFAR_SETTINGS = {
    "source": {},
    "norm": {},
    "tent": dict(optimizer="adam", lr=1e-3),
    "eta": dict(optimizer="adam", lr=1e-3, d_margin=0.4),
    "eata": dict(optimizer="adam", lr=1e-3, d_margin=0.4, fisher_alpha=1.0),
    "sar": dict(optimizer="sgd", lr=1e-3),
    "deyo": dict(optimizer="adam", lr=1e-3),
}


def stream_error(name, batches, fisher_images=None, **overrides):
    kw = {**CIFAR_SETTINGS[name], **overrides}
    if name == "eata":
        kw.update(fisher_loader=[fisher_images], fisher_size=len(fisher_images))
    torch.manual_seed(0)
    adapted = tta.wrap(tta.load_model("cifar10_resnet20"), name, **kw)
    wrong = total = 0
    for x, y in batches:
        wrong += (adapted(x).argmax(1) != y).sum().item()
        total += y.numel()
    return 100.0 * wrong / total


@pytest.fixture(scope="module")
def gaussian_stream(cifar_test_images):
    """1000 test images, severity-5 Gaussian noise (CIFAR-10-C: std 0.10), shuffled,
    batches of 200."""
    x, y = cifar_test_images
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(1000, generator=g)
    x, y = x[order], y[order]
    x = (x + 0.10 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return [(x[i:i + 200], y[i:i + 200]) for i in range(0, 1000, 200)]


@pytest.fixture(scope="module")
def source_error(gaussian_stream):
    return stream_error("source", gaussian_stream)


@pytest.mark.parametrize("name", ["norm", "tent", "eta", "eata", "sar", "deyo"])
def test_method_beats_source_on_gaussian_noise(name, gaussian_stream, source_error, cifar_train_images):
    assert source_error > 70  # severity 5 noise really hurts the source model
    error = stream_error(name, gaussian_stream, cifar_train_images[0])
    assert error < source_error - 15, (name, error, source_error)


EIGHT = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
         "contrast", "brightness", "pixelate", "jpeg_compression"]


@pytest.fixture(scope="module")
def eight_corruption_stream(cifar_test_images):
    """8 severity-5 corruptions x 1000 images, continual, batches of 200, rendered by
    tta.corruptions with the CIFAR preset."""
    from tta.corruptions import corrupt

    x, y = cifar_test_images
    batches = []
    for i, name in enumerate(EIGHT):
        sl = slice(1000 * (i % 2), 1000 * (i % 2) + 1000)
        xc = corrupt(x[sl], name, 5, preset="cifar", generator=torch.Generator().manual_seed(i))
        batches += [(xc[j:j + 200], y[sl][j:j + 200]) for j in range(0, 1000, 200)]
    return batches


def test_deyo_beats_source_and_matches_tent_on_eight_corruptions(eight_corruption_stream):
    # Same optimizer and step size for both. At Tent's CIFAR lr (1e-3) the two are
    # within 0.1 point of each other on these streams; DeYO's filters let it take
    # larger steps: lr 5e-3 is Tent's best of {1, 2, 3, 5}e-3 on the 2000-image
    # stream of benchmarks/RESULTS.md, and there DeYO is 1.5 points better.
    errors = {"source": stream_error("source", eight_corruption_stream)}
    for name in ("tent", "deyo"):
        errors[name] = stream_error(name, eight_corruption_stream, optimizer="adam", lr=5e-3)
    assert errors["deyo"] < errors["source"] - 10, errors
    assert errors["deyo"] <= errors["tent"], errors


# Errors on the fixed-seed stream above, recorded 2026-11-27 with the sync-free
# implementation (mask filters, gated steps, sample-weighted BN statistics): any
# later speed work must keep them within 0.2 points. DeYO re-recorded 2026-12-03 when
# it took the official frozen-module rule (every BN layer of a CIFAR ResNet adapts;
# 50.2 with the last stage frozen).
RECORDED = {"norm": 50.4, "tent": 50.3, "eta": 50.0, "eata": 50.0, "sar": 50.4, "deyo": 50.5}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_accuracy_unchanged_by_optimisations(name, gaussian_stream, cifar_train_images):
    assert stream_error(name, gaussian_stream, cifar_train_images[0]) == pytest.approx(RECORDED[name], abs=0.2)
