"""VTE: the mean normalised image feature of the most confident views, classified
against the text features; nothing adapts. On a hand-made stub (the selection and
the mean by hand), a tiny random open_clip model (against a direct computation) and
the zoo's CLIP when it is there."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
import tta.methods.vte  # noqa: F401  (registration)
from tta.augment.views import make_views
from tta.methods.vte import VTE

open_clip = pytest.importorskip("open_clip")

from tiny_clip import CLASSES, load_tiny_clip, registered_on_one_thread, smooth_images  # noqa: E402

TINY = "tta-test-tiny-clip-vte"


@pytest.fixture(scope="module", autouse=True)
def one_thread(tmp_path_factory):
    yield from registered_on_one_thread(TINY, tmp_path_factory)


def tiny_clip(seed=0, **kw):
    return load_tiny_clip(TINY, seed, **kw)


@pytest.fixture
def images():
    return smooth_images(5)


class ShiftViews(nn.Module):
    """Deterministic views: view j (j = 1..N-1) of an image is the image rolled by j
    pixels and darkened by a factor depending on j, whatever the batch."""

    def __init__(self, num_views):
        super().__init__()
        self.per_image = num_views - 1

    def forward(self, x):
        j = torch.arange(x.shape[0]) % self.per_image + 1
        rolled = torch.stack([xi.roll(int(s), dims=-1) for xi, s in zip(x, j)])
        return rolled * (1 - 0.5 * j / (self.per_image + 1)).view(-1, 1, 1, 1)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def direct_vte(clip, x, num_views, fraction, transform=None):
    """VTE written out image by image, as the reference code does it."""
    out = []
    for xi in x:
        views = make_views(xi[None], num_views, transform=transform)[0]
        feats = clip.encode_image(views)
        logits = clip.logit_scale * feats @ clip.text_features().t()
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        keep = entropy.argsort()[: max(1, int(num_views * fraction))]
        out.append(clip.logit_scale * feats[keep].mean(dim=0) @ clip.text_features().t())
    return torch.stack(out)


# ----------------------------------------------------------------------------------
# A hand-made classifier: the selection and the mean by hand
# ----------------------------------------------------------------------------------


class Stub(nn.Module):
    """Two classes with text features e1 and e2; an image's feature is the normalised
    mean of its first two channels; logit scale 10."""

    classnames, num_classes, ctx = ["a", "b"], 2, None

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))  # something that must not change
        self.register_buffer("scale", torch.tensor(10.0))

    @property
    def logit_scale(self):
        return self.scale

    def use_prompt(self, ctx_init):
        raise AssertionError("VTE must not switch to a learnable prompt")

    def text_features(self):
        return torch.eye(2)

    def encode_image(self, x):
        return F.normalize(x.mean(dim=(2, 3))[:, :2] * self.weight, dim=-1)

    def logits(self, image_features, text_features=None):
        text = self.text_features() if text_features is None else text_features
        return self.logit_scale * image_features @ text.t()


# (channel 0, channel 1) of the 5 crops of each of the two images
CROPS = [
    [(1.0, 0.0), (0.0, 1.0), (1.0, 0.2), (0.3, 1.0), (1.0, 1.0)],
    [(0.5, 1.0), (1.0, 0.1), (0.2, 1.0), (1.0, 1.0), (1.0, 0.0)],
]


class TableViews(nn.Module):
    def forward(self, x):
        table = torch.tensor([c for crops in CROPS for c in crops])  # (2 * 5, 2)
        out = x.clone()
        out[:, :2] = table.view(-1, 2, 1, 1)
        return out


def test_keeps_the_lowest_entropy_views_and_averages_their_features():
    x = torch.full((2, 3, 4, 4), 0.5)  # view 0: feature (1, 1) / sqrt 2, the least confident
    method = tta.wrap(Stub(), "vte", num_views=6, selection_p=0.34, transform=TableViews())
    logits = method(x)
    # k = int(6 * 0.34) = 2: image 0 keeps the crops on e1 and e2, image 1 the crop on
    # e1 and the one nearest it, (1, 0.1)
    near = F.normalize(torch.tensor([1.0, 0.1]), dim=0)
    expected = torch.stack([10 * torch.tensor([0.5, 0.5]), 10 * (torch.tensor([1.0, 0.0]) + near) / 2])
    torch.testing.assert_close(logits, expected)
    assert method.last_record.to_dict()["num_selected"] == 4 and method.last_record.num_samples == 2
    assert method.model.weight.item() == 1.0 and not method.model.weight.requires_grad


def test_all_views_kept_is_the_mean_of_every_view():
    x = torch.full((2, 3, 4, 4), 0.5)
    method = tta.wrap(Stub(), "vte", num_views=6, selection_p=1.0, transform=TableViews())
    feats = torch.cat([torch.full((2, 1, 2), 0.5 ** 0.5),
                       F.normalize(torch.tensor(CROPS), dim=-1)], dim=1)
    torch.testing.assert_close(method(x), 10 * feats.mean(dim=1))


# ----------------------------------------------------------------------------------
# A tiny open_clip model
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("templates", ["photo", ["a photo of a {}.", "a blurry photo of the {}."]])
def test_one_view_is_zero_shot(images, templates):
    clip = tiny_clip(templates=templates)
    with torch.no_grad():
        zero_shot = clip(images)
    method = tta.wrap(clip, "vte", num_views=1)
    torch.testing.assert_close(method(images), zero_shot)
    assert clip.ctx is None  # no learnable prompt appeared


def test_equals_a_direct_computation_across_view_chunks(images):
    # 5 images x 64 views: chunks of 4 images (VIEW_CHUNK 256), so two chunks
    clip = tiny_clip()
    method = tta.wrap(clip, "vte", transform=ShiftViews(64))
    with torch.no_grad():
        expected = direct_vte(clip, images, 64, 0.1, transform=ShiftViews(64))
    torch.testing.assert_close(method(images), expected, rtol=1e-4, atol=1e-4)


def test_random_views_match_the_direct_computation_with_the_same_draws(images):
    clip = tiny_clip()
    method = tta.wrap(clip, "vte", num_views=16, selection_p=0.25)
    torch.manual_seed(3)
    got = method(images[:2])
    torch.manual_seed(3)
    views = make_views(images[:2], 16)  # the draws VTE made (one chunk)
    with torch.no_grad():
        feats = clip.encode_image(views.flatten(0, 1)).view(2, 16, -1)
        logits = clip.logits(feats)
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        keep = entropy.argsort(dim=1)[:, :4]
        mean = torch.stack([feats[i, keep[i]].mean(dim=0) for i in range(2)])
    torch.testing.assert_close(got, clip.logits(mean), rtol=1e-4, atol=1e-4)


def test_nothing_changes_and_state_is_trivial(images):
    clip = tiny_clip()
    method = tta.wrap(clip, "vte", transform=ShiftViews(64))
    before = state(method)
    first = method(images)
    assert all(torch.equal(v, state(method)[k]) for k, v in before.items())
    assert method.optimizer is None and method.adapted == [] and clip.text_encode_count == 1
    saved = method.state_dict()
    method.reset()
    method.load_state_dict(saved)
    torch.testing.assert_close(method(images), first, rtol=0, atol=0)  # nothing carried over
    fresh = tta.wrap(tiny_clip(), "vte", transform=ShiftViews(64))
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(images), first, rtol=1e-5, atol=1e-5)


def test_shuffling_the_batch_permutes_the_predictions(images):
    method = tta.wrap(tiny_clip(), "vte", transform=ShiftViews(64))
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(method(images[perm]), method(images)[perm], rtol=1e-4, atol=1e-4)


def test_options_presets_and_augmix(images):
    defaults = tta.method_defaults("vte")
    assert {k: defaults[k] for k in ("num_views", "selection_p", "augmix", "transform")} == dict(
        num_views=64, selection_p=0.1, augmix=False, transform=None)
    assert not {"lr", "steps", "optimizer", "episodic", "ctx_init", "bn_alpha"} & set(defaults)
    assert set(tta.method_presets("vte")) >= {"cifar10", "imagenet"}
    method = tta.wrap(tiny_clip(), "vte", preset="imagenet", num_views=8, augmix=True)
    assert isinstance(method, VTE) and method.views.use_augmix and method.views.num_views == 8
    torch.manual_seed(0)
    out = method(images[:2])
    assert out.shape == (2, len(CLASSES)) and torch.isfinite(out).all()


@pytest.mark.parametrize("options, error, match", [
    (dict(num_views=0), ValueError, "num_views must be a positive integer"),
    (dict(num_views=2.5), ValueError, "num_views must be a positive integer"),
    (dict(num_views=True), ValueError, "num_views must be a positive integer"),
    (dict(selection_p=0.0), ValueError, r"selection_p must be in \(0, 1\]"),
    (dict(selection_p=1.5), ValueError, r"selection_p must be in \(0, 1\]"),
    (dict(selection_p="10%"), ValueError, "selection_p must be a number"),
    (dict(augmix="yes"), ValueError, "augmix must be True or False"),
    (dict(transform="crop"), TypeError, "transform must be an nn.Module"),
    (dict(lr=1e-3), TypeError, "takes no gradient steps"),
    (dict(steps=2), TypeError, "takes no gradient steps"),
    (dict(ctx_init="a photo of a"), TypeError, "learns no prompt"),
    (dict(num_view=8), TypeError, "did you mean 'num_views'"),
])
def test_bad_options_say_what_is_wrong(options, error, match):
    with pytest.raises(error, match=match):
        tta.wrap(tiny_clip(), "vte", **options)


def test_refuses_a_model_that_is_not_a_clip_classifier():
    with pytest.raises(TypeError, match="has no classnames"):
        tta.wrap(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), "vte")


# ----------------------------------------------------------------------------------
# The zoo's CLIP
# ----------------------------------------------------------------------------------


def test_zoo_clip_small(cifar_test_images):
    from tta.models import zoo

    if not (zoo.bundled_dir() / "clip_small.pt").is_file():
        pytest.skip("zoo:clip_small is not trained")
    x = cifar_test_images[0][:8]
    model = tta.load_model("zoo:clip_small")
    with torch.no_grad():
        zero_shot = model(x)
    torch.testing.assert_close(tta.wrap(model, "vte", num_views=1)(x), zero_shot, rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    logits = tta.wrap(tta.load_model("zoo:clip_small"), "vte", preset="cifar10")(x)
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
