"""Methods that train nothing (issue 25): LAME corrects the source model's outputs
within a batch, TTAug averages each image's augmented views, BN-EMA (``norm_ema``)
averages BatchNorm statistics across batches."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.methods.lame import lame_affinity, laplacian_optimization
from tta.methods.norm_layers import use_batch_stats

from test_methods import changed_keys, state


# ----------------------------------------------------------------------------- LAME

def test_knn_affinity_votes_for_the_k_nearest_other_images():
    f = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]]), dim=1)
    w = lame_affinity(f, "knn", knn=1)
    assert torch.equal(w, torch.tensor([[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0],
                                        [0, 0, 1, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.float))
    assert torch.equal(lame_affinity(f, "knn", knn=10).sum(1), torch.full((5,), 4.0))  # capped at N - 1
    sym = lame_affinity(f, "knn", knn=1, force_symmetry=True)
    assert torch.equal(sym, sym.t()) and sym[4, 2] == 0.5 and sym[2, 3] == 1


def test_rbf_width_is_the_mean_kth_neighbour_distance_counting_the_image_itself():
    f = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    d = torch.cdist(f, f)
    sigma = d.sort(dim=1).values[:, 2].mean()  # knn=3: self, then the 2nd other image
    torch.testing.assert_close(lame_affinity(f, "rbf", knn=3), torch.exp(-d ** 2 / (2 * sigma ** 2)))
    torch.testing.assert_close(lame_affinity(f, "linear"), f @ f.t())
    with pytest.raises(ValueError, match="affinity must be one of"):
        lame_affinity(f, "gauss")


def test_bound_iterations_reach_the_fixed_point_and_stop_like_the_official_loop():
    g = torch.Generator().manual_seed(1)
    unary = -torch.log_softmax(torch.randn(8, 3, generator=g), dim=1)
    kernel = lame_affinity(F.normalize(torch.randn(8, 5, generator=g), dim=1), "knn", knn=2)
    y, updates = laplacian_optimization(unary, kernel)
    # the official loop: update, compute E, stop from the 3rd update on when E settles
    ref, old, count = (-unary).softmax(1), None, 0
    for i in range(100):
        pairwise = kernel @ ref
        ref = (pairwise - unary).softmax(1)
        count += 1
        energy = (unary * ref - pairwise * ref + ref * ref.clamp_min(1e-20).log()).sum().item()
        if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    assert int(updates) == count < 100
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y, (kernel @ y - unary).softmax(1), atol=1e-5, rtol=0)  # a fixed point


def test_lame_relabels_by_neighbours_and_changes_nothing(resnet20, noisy_batch):
    method = tta.wrap(resnet20, "lame")
    before = state(method)
    with torch.no_grad():
        source = resnet20(noisy_batch)
    out = method(noisy_batch)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(len(out)))  # log of assignments
    assert changed_keys(before, state(method)) == set()
    record = method.last_record.to_dict()
    assert 3 <= record["iterations"] <= 100
    assert record["num_changed"] == int((out.argmax(1) != source.argmax(1)).sum())
    # each batch alone: the same images give the same outputs after other batches
    method(noisy_batch.flip(0))
    torch.testing.assert_close(method(noisy_batch), out)
    assert tta.method_defaults("lame", preset="cifar10")["affinity"] == "rbf"


def test_lame_with_lambda_zero_is_the_source_model(resnet20, noisy_batch):
    out = tta.wrap(resnet20, "lame", bound_lambda=0.0)(noisy_batch[:20])
    with torch.no_grad():
        expected = resnet20(noisy_batch[:20]).softmax(1)
    torch.testing.assert_close(out.exp(), expected, atol=1e-6, rtol=1e-4)


def test_lame_refuses_a_model_without_a_feature_split_and_bad_options(resnet20):
    with pytest.raises(ValueError, match="affinity must be one of"):
        tta.wrap(resnet20, "lame", affinity="cosine")
    with pytest.raises(ValueError, match="knn must be a positive integer"):
        tta.wrap(resnet20, "lame", knn=0)
    with pytest.raises((TypeError, ValueError), match="forward_features"):
        tta.wrap(nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "lame")


# ----------------------------------------------------------------------------- TTAug

class _Identity(nn.Module):
    def forward(self, x):
        return x


def test_ttaug_averages_each_images_views_with_its_own_statistics(resnet20, noisy_batch):
    x = noisy_batch[:6]
    method = tta.wrap(resnet20, "ttaug", num_views=3, transform=_Identity(), images_per_forward=4)
    out = method(x)
    # identical views: each image is normalised by its own statistics (alpha 0.1), alone
    reference = copy.deepcopy(resnet20)
    use_batch_stats(reference, alpha=0.1)
    with torch.no_grad():
        expected = torch.cat([reference(img.unsqueeze(0).expand(4, -1, -1, -1)).mean(0, keepdim=True)
                              for img in x])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_ttaug_views_are_random_crops_and_augmix_and_nothing_adapts(resnet20, noisy_batch):
    torch.manual_seed(0)
    method = tta.wrap(resnet20, "ttaug", num_views=4)
    views = method.views(noisy_batch[:2])
    assert views.shape == (10, 3, 32, 32)
    assert torch.equal(views[0], noisy_batch[0]) and torch.equal(views[5], noisy_batch[1])
    assert not torch.equal(views[1], views[2]) and views.min() >= 0 and views.max() <= 1
    before = state(method)
    method(noisy_batch[:8])
    assert changed_keys(before, state(method)) == set()
    assert tta.method_defaults("ttaug", preset="imagenet")["crop"] == "resized"
    with pytest.raises(ValueError, match="num_views must be a positive integer"):
        tta.wrap(resnet20, "ttaug", num_views=0)


def test_ttaug_runs_on_group_norm_models(noisy_batch):
    out = tta.wrap(tta.load_model("zoo:resnet26_gn"), "ttaug", num_views=2)(noisy_batch[:3])
    assert out.shape == (3, 10) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- BN-EMA

def _bn_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "tracked" in k}


def test_norm_ema_moves_the_statistics_by_momentum_from_the_source(resnet20, noisy_batch):
    method = tta.wrap(copy.deepcopy(resnet20), "norm_ema")
    source = _bn_stats(method.model)
    seen = []
    handle = method.model.backbone.bn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    method(noisy_batch[:50])
    handle.remove()
    moved = _bn_stats(method.model)
    first = "backbone.bn1"
    (h,) = seen
    var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(moved[f"{first}.running_mean"], 0.9 * source[f"{first}.running_mean"] + 0.1 * mean)
    torch.testing.assert_close(moved[f"{first}.running_var"], 0.9 * source[f"{first}.running_var"] + 0.1 * var)
    assert not any(p.requires_grad for p in method.parameters())
    method.reset()
    assert all(torch.equal(v, source[k]) for k, v in _bn_stats(method.model).items())


def test_norm_ema_predicts_with_the_moved_statistics_in_one_pass(resnet20, noisy_batch):
    method = tta.wrap(copy.deepcopy(resnet20), "norm_ema")
    out = method(noisy_batch[:40])
    # Each layer normalised its input with the statistics that input moved, so an
    # eval forward with the final statistics retraces the pass exactly.
    with torch.no_grad():
        again = method.model(noisy_batch[:40])
    torch.testing.assert_close(out, again)
    with torch.no_grad():
        assert not torch.allclose(out, resnet20(noisy_batch[:40]), atol=1e-3)


def test_norm_ema_two_pass_is_the_ports_train_then_eval(resnet20, noisy_batch):
    method = tta.wrap(copy.deepcopy(resnet20), "norm_ema", two_pass=True)
    port = copy.deepcopy(resnet20)
    out = method(noisy_batch[:40])
    port.train()
    with torch.no_grad():
        port(noisy_batch[:40])
        port.eval()
        expected = port(noisy_batch[:40])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_bn_stats(method.model), _bn_stats(port), atol=1e-6, rtol=1e-5)


def test_norm_ema_cumulative_average_starts_from_nothing_and_weighs_batches_equally(resnet20, noisy_batch):
    method = tta.wrap(copy.deepcopy(resnet20), "norm_ema", stats_momentum=None, two_pass=True)
    a, b = noisy_batch[:30], noisy_batch[30:60]
    method(a)
    method(b)
    port = copy.deepcopy(resnet20)
    for m in port.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    port.train()
    with torch.no_grad():
        port(a)
        port(b)
    torch.testing.assert_close(_bn_stats(method.model), _bn_stats(port), atol=1e-5, rtol=1e-4)


def test_norm_ema_works_at_batch_size_one_and_round_trips(resnet20, noisy_batch):
    first = tta.wrap(copy.deepcopy(resnet20), "norm_ema")
    for img in noisy_batch[:3]:
        assert torch.isfinite(first(img.unsqueeze(0))).all()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = tta.wrap(copy.deepcopy(resnet20), "norm_ema")
    second.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(first(noisy_batch[:8]), second(noisy_batch[:8]))
    with pytest.raises(ValueError, match="stats_momentum must be in"):
        tta.wrap(copy.deepcopy(resnet20), "norm_ema", stats_momentum=1.5)
    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        tta.wrap(tta.load_model("zoo:resnet26_gn"), "norm_ema")
