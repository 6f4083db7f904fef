"""DeYO: destroying transforms, PLPD and weights, filters, parameters."""

import math

import pytest
import torch

import tta
from tta.augment import Occlude, PatchShuffle, occlude, patch_shuffle, pixel_permute
from tta.methods.deyo import deyo_weights, plpd

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def patches_of(img, n):
    c, h, w = img.shape
    p = img.reshape(c, n, h // n, n, w // n).permute(1, 3, 0, 2, 4).reshape(n * n, -1)
    return sorted(map(tuple, p.float().tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_shuffle_keeps_patches_and_destroys_layout(dtype):
    x = torch.rand(6, 3, 32, 32).to(dtype)
    y = patch_shuffle(x, 4, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    for a, b in zip(x, y):
        assert patches_of(a, 4) == patches_of(b, 4)  # the same 16 patches
        assert not torch.equal(a, b)  # in another arrangement


def test_permutations_are_independent_per_image():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(64, 3, 4, 4).contiguous()
    y = patch_shuffle(x, 4, generator=torch.Generator().manual_seed(0))
    orders = {tuple(img[0].flatten().tolist()) for img in y}
    assert len(orders) > 60  # 64 identical inputs, (nearly) all different outputs
    z = pixel_permute(x, generator=torch.Generator().manual_seed(0))
    assert len({tuple(img[0].flatten().tolist()) for img in z}) > 60


@pytest.mark.parametrize("dtype", DTYPES)
def test_pixel_permute_keeps_pixel_values(dtype):
    x = torch.rand(4, 3, 16, 16).to(dtype)
    y = pixel_permute(x)
    for a, b in zip(x, y):
        # RGB triplets move together: the multiset of pixels is unchanged
        pa = sorted(map(tuple, a.reshape(3, -1).t().float().tolist()))
        pb = sorted(map(tuple, b.reshape(3, -1).t().float().tolist()))
        assert pa == pb and not torch.equal(a, b)


def test_patch_shuffle_resizes_when_not_divisible_and_validates():
    x = torch.rand(2, 3, 30, 30)
    assert patch_shuffle(x, 4).shape == x.shape
    with pytest.raises(ValueError, match="larger than the image"):
        patch_shuffle(x, 64)
    with pytest.raises(ValueError, match="positive integer"):
        PatchShuffle(0)(x)


def test_patch_shuffle_resizes_down_to_the_grid_as_deyo_does(monkeypatch):
    # The official code (Jhyun17/DeYO methods/deyo.py, and the port) resizes to
    # (side // patch_len) * patch_len, the multiple below, then back: 30 px on a 4 x 4
    # grid is cut at 28 px, not blown up to 32.
    import tta.augment.destroy as destroy

    sizes, interpolate = [], destroy.F.interpolate

    def recording(x, size=None, **kw):
        sizes.append(tuple(size))
        return interpolate(x, size=size, **kw)

    monkeypatch.setattr(destroy.F, "interpolate", recording)
    assert patch_shuffle(torch.rand(2, 3, 30, 30), 4).shape == (2, 3, 30, 30)
    assert sizes == [(28, 28), (30, 30)]
    sizes.clear()
    patch_shuffle(torch.rand(2, 3, 32, 32), 4)  # divisible: no resize at all
    assert sizes == []


def test_occlusion_fills_square_with_image_mean():
    x = torch.rand(2, 3, 224, 224)
    y = occlude(x, 0.5)
    mean = x.mean(dim=(2, 3))
    assert torch.allclose(y[:, :, 56:168, 56:168], mean[:, :, None, None].expand(2, 3, 112, 112))
    assert torch.equal(y[:, :, :56], x[:, :, :56]) and torch.equal(y[:, :, 168:], x[:, :, 168:])
    y2 = Occlude(8, top=0, left=24)(torch.rand(1, 3, 32, 32))
    assert y2.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="leaves"):
        occlude(x, 100, top=200)


def test_plpd_and_weights_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    destroyed = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    torch.testing.assert_close(plpd(probs, destroyed), torch.tensor([0.5, 0.0]))
    entropy = torch.tensor([0.3, 0.5])
    w = deyo_weights(entropy, torch.tensor([0.5, 0.0]), margin_e0=0.4, reweight_ent=1.0, reweight_plpd=1.0)
    expected = torch.tensor([math.exp(0.1) + math.exp(0.5), math.exp(-0.1) + 1.0])
    torch.testing.assert_close(w, expected)
    only_plpd = deyo_weights(entropy, torch.tensor([0.5, 0.0]), 0.4, 0.0, 1.0)
    torch.testing.assert_close(only_plpd, torch.tensor([math.exp(0.5), 1.0]))
    torch.testing.assert_close(deyo_weights(entropy, entropy, 0.4, 0.0, 0.0), torch.ones(2))


@pytest.mark.parametrize("skip_modules", ["paper", "last_stage"])
def test_deyo_adapts_only_the_chosen_norm_params(skip_modules, resnet20, noisy_batch):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    adapted = tta.wrap(resnet20, "deyo", lr=1e-2, skip_modules=skip_modules)
    names = {n for n, _ in adapted.adapted}
    assert names and all(".bn" in n or n.startswith("backbone.bn1") for n in names)
    # the official rule freezes `layer4`, which a CIFAR ResNet does not have
    assert any(n.startswith("backbone.layer3") for n in names) == (skip_modules == "paper")
    for _ in range(2):
        adapted(noisy_batch)
    changed = {k for k, v in resnet20.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= names
    record = adapted.last_record.to_dict()
    assert 0 < record["num_selected"] <= record["num_confident"] <= record["num_samples"] == 64


@pytest.mark.parametrize("kw", [dict(deyo_margin=0.0), dict(plpd_threshold=2.0)])
def test_filters_can_remove_everything(kw, resnet20, noisy_batch):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    adapted = tta.wrap(resnet20, "deyo", lr=1e-2, **kw)
    out = adapted(noisy_batch)
    adapted(noisy_batch)
    assert torch.isfinite(out).all()
    assert adapted.last_record.to_dict()["num_selected"] == 0
    assert all(torch.equal(v, before[k]) for k, v in resnet20.state_dict().items())
    assert all(torch.count_nonzero(t) == 0 for s in adapted.optimizer.state.values() for t in s.values())


@pytest.mark.parametrize("aug_type", ["patch", "pixel", "occ"])
def test_every_destroy_transform_runs(aug_type, resnet20, noisy_batch):
    adapted = tta.wrap(resnet20, "deyo", aug_type=aug_type)
    assert adapted(noisy_batch).shape == (64, 10)
    with pytest.raises(ValueError, match="aug_type"):
        tta.wrap(tta.load_model("cifar10_resnet20"), "deyo", aug_type="cutout")


def test_patch_len_larger_than_image_is_refused(resnet20, noisy_batch):
    adapted = tta.wrap(resnet20, "deyo", patch_len=64)
    with pytest.raises(ValueError, match="larger than the image"):
        adapted(noisy_batch)
