"""Shared fixtures: the real shared ResNet-20 and real CIFAR-10 test images, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests read data and weights from the shared read-only folder next to the repo
# unless TTA_HOME is set already.
_SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if "TTA_HOME" not in os.environ and _SHARED.is_dir():
    os.environ["TTA_HOME"] = str(_SHARED)
# CI passes a relative TTA_HOME (``../shared``); subprocesses started from a temporary
# directory (the tta-bench CLI tests) must still find it.
if "TTA_HOME" in os.environ:
    os.environ["TTA_HOME"] = str(Path(os.environ["TTA_HOME"]).expanduser().resolve())

torch.set_num_threads(min(2, torch.get_num_threads()))

import tta  # noqa: E402
from tta.data import cifar10_dir, load_image_folder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where torch sees no GPU, so one marker both
    selects them (``pytest -m cuda``) and keeps them from failing elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """An empty TTA_HOME and no bundled zoo checkpoints."""
    from tta.models import zoo

    monkeypatch.setenv("TTA_HOME", str(tmp_path))
    monkeypatch.setattr(zoo, "bundled_dir", lambda: tmp_path / "no-bundled-zoo")
    return tmp_path


@pytest.fixture(scope="session")
def cifar_test_images() -> tuple[torch.Tensor, torch.Tensor]:
    """2000 shared CIFAR-10 test images (seeded subset) and labels."""
    return load_image_folder(cifar10_dir("test"), num_images=2000, seed=0)


@pytest.fixture(scope="session")
def cifar_train_images() -> tuple[torch.Tensor, torch.Tensor]:
    return load_image_folder(cifar10_dir("train"), num_images=256, seed=0)


@pytest.fixture(scope="session")
def noisy_batch(cifar_test_images) -> torch.Tensor:
    """64 test images with severity-5 Gaussian noise (CIFAR-10-C: std 0.10)."""
    x = cifar_test_images[0][:64]
    g = torch.Generator().manual_seed(1)
    return (x + 0.10 * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture
def resnet20() -> torch.nn.Module:
    """A fresh copy of the pretrained shared CIFAR-10 ResNet-20."""
    return tta.load_model("cifar10_resnet20")
