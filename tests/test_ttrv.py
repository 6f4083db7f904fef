"""TTRV: vote-share rewards, GRPO advantages, the entropy term, the KL to the
source, and the online / episodic / single-example modes on a plain classifier and
on CLIP classifiers (a tiny random one; the zoo's pair when it is there)."""

import copy

import pytest
import torch

import tta
import tta.methods.ttrv  # noqa: F401  (registration)
from tta.methods.ttrv import TTRV, clipped_policy_loss, grpo_advantages, vote_entropy, vote_rewards

open_clip = pytest.importorskip("open_clip")

from tiny_clip import CLASSES, load_tiny_clip, registered_on_one_thread, smooth_images  # noqa: E402

TINY = "tta-test-tiny-clip-ttrv"


@pytest.fixture(scope="module", autouse=True)
def one_thread(tmp_path_factory):
    yield from registered_on_one_thread(TINY, tmp_path_factory)


def tiny_clip(seed=0):
    return load_tiny_clip(TINY, seed)


@pytest.fixture
def images():
    return smooth_images(4)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------------
# Rewards, advantages, the loss
# ----------------------------------------------------------------------------------


def test_unanimous_votes_give_zero_advantage():
    draws = torch.full((1, 8), 3)
    rewards, counts, entropy = vote_rewards(draws, 5, entropy_in_reward=True)
    assert torch.equal(rewards, torch.ones(1, 8)) and entropy.item() == 0.0
    assert counts[0].tolist() == [0, 0, 0, 8, 0]
    assert torch.equal(grpo_advantages(rewards), torch.zeros(1, 8))


def test_three_to_one_votes_favour_the_majority():
    draws = torch.tensor([[2, 2, 0, 2]])
    rewards, _, entropy = vote_rewards(draws, 4)
    torch.testing.assert_close(rewards, torch.tensor([[0.75, 0.75, 0.25, 0.75]]))
    # entropy of (3/4, 1/4) over ln 2 (two distinct votes), as the reference code normalises it
    h = -(0.75 * torch.tensor(0.75).log() + 0.25 * torch.tensor(0.25).log()) / torch.tensor(2.0).log()
    torch.testing.assert_close(entropy, h.view(1))
    adv = grpo_advantages(rewards)
    assert (adv[0, [0, 1, 3]] > 0).all() and adv[0, 2] < 0
    # (r - mean) / (unbiased std + 1e-6): mean 0.625, std 0.25
    torch.testing.assert_close(adv[0], torch.tensor([0.125, 0.125, -0.375, 0.125]) / (0.25 + 1e-6))
    # the released code's entropy term is a per-image constant: the same advantages
    with_entropy, _, _ = vote_rewards(draws, 4, entropy_weight=0.75, entropy_in_reward=True)
    torch.testing.assert_close(with_entropy, rewards - 0.75 * h)
    torch.testing.assert_close(grpo_advantages(with_entropy), adv)


def test_vote_entropy_is_one_for_a_uniform_split():
    assert vote_entropy(torch.tensor([[2.0, 2.0, 2.0, 0.0]])).item() == pytest.approx(1.0)


def test_clipped_policy_loss_is_reinforce_at_ratio_one_and_clips_beyond():
    log_p = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, frac = clipped_policy_loss(log_p, log_p.detach(), adv, 0.2)
    loss.backward()
    torch.testing.assert_close(log_p.grad, -adv / 2)  # -mean(A grad log p)
    assert frac.item() == 0
    # ratio e^0.5 > 1.2 with A > 0: clipped, no gradient from that draw
    log_p = torch.tensor([[-0.5]], requires_grad=True)
    loss, frac = clipped_policy_loss(log_p, torch.tensor([[-1.0]]), torch.tensor([[1.0]]), 0.2)
    loss.backward()
    assert frac.item() == 1 and log_p.grad.item() == 0 and loss.item() == pytest.approx(-1.2)


# ----------------------------------------------------------------------------------
# The method on a plain classifier
# ----------------------------------------------------------------------------------


def grad_of(method, x, seed=0):
    """The gradient of the adapted parameters after one round on ``x`` (no update)."""
    method.optimizer.step = lambda *a, **k: None  # keep the parameters where they are
    grads = []
    method.optimizer.zero_grad = lambda set_to_none=True: grads.append(
        [p.grad.detach().clone() for _, p in method.adapted])
    torch.manual_seed(seed)
    method(x)
    return grads[0]


def test_the_diversity_term_acts_and_the_released_entropy_in_reward_does_not(resnet20, noisy_batch):
    x = noisy_batch[:16]
    make = lambda **kw: tta.wrap(copy.deepcopy(resnet20), "ttrv", kl_weight=0.0, **kw)  # noqa: E731
    plain = grad_of(make(diversity_weight=0.0), x)
    released = grad_of(make(diversity_weight=0.0, entropy_in_reward=True), x)
    diverse = grad_of(make(diversity_weight=0.75), x)
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    size = flat(plain).norm()
    # the released term only moves advantages by rounding: (r - c) - mean(r - c) of
    # equal rewards is not always exactly 0, and GRPO's 1e-6 magnifies it
    assert (flat(released) - flat(plain)).norm() < 0.02 * size
    assert (flat(diverse) - flat(plain)).norm() > 0.1 * size


def test_online_adapts_norm_affines_records_and_resets_bit_exact(resnet20, noisy_batch):
    x = noisy_batch[:16]
    source = state(resnet20)
    method = tta.wrap(resnet20, "ttrv")
    assert method.adapt == "norm" and method.batch_stats and method.lr == 1e-3
    torch.manual_seed(0)
    first = method(x)
    record = method.last_record.to_dict()
    assert list(record) == method.record_type.columns()
    assert record["kl"] == 0.0  # the first forward is the source model's
    assert 0 <= record["vote_entropy"] <= 1 and 0 <= record["num_unanimous"] <= 16
    assert record["clip_fraction"] == 0.0
    for _ in range(2):
        method(x)
    assert method.last_record.to_dict()["kl"] > 0
    moved = changed(source, state(resnet20))
    assert moved and all(k.endswith((".weight", ".bias")) and "bn" in k for k in moved)
    method.reset()
    assert not changed(source, state(resnet20)) and not method.optimizer.state
    torch.manual_seed(0)
    assert torch.equal(method(x), first)


def test_online_state_resumes_bit_exactly(resnet20, noisy_batch):
    a, b = noisy_batch[:16], noisy_batch[16:32]
    method = tta.wrap(resnet20, "ttrv", inner_steps=2)
    torch.manual_seed(0)
    method(a)
    saved = copy.deepcopy(method.state_dict())
    torch.manual_seed(1)
    expected = [method(b), method(a)]
    resumed = tta.wrap(tta.load_model("cifar10_resnet20"), "ttrv", inner_steps=2)
    resumed.load_state_dict(saved)
    torch.manual_seed(1)
    got = [resumed(b), resumed(a)]
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert not changed(state(method), state(resumed))


def test_inner_steps_clip_the_ratio(resnet20, noisy_batch):
    method = tta.wrap(resnet20, "ttrv", inner_steps=4, lr=0.05, kl_weight=0.0)
    torch.manual_seed(0)
    method(noisy_batch[:16])
    assert method.last_record.to_dict()["clip_fraction"] > 0


def test_views_sampling_on_a_plain_classifier(resnet20, noisy_batch):
    method = tta.wrap(resnet20, "ttrv", sampling="views", num_samples=8, num_train_samples=4)
    torch.manual_seed(0)
    out = method(noisy_batch[:4])
    assert out.shape == (4, 10) and method.last_record.to_dict()["kl"] == 0.0


def test_works_under_no_grad(resnet20, noisy_batch):
    x = noisy_batch[:8]
    reference = tta.wrap(copy.deepcopy(resnet20), "ttrv")
    method = tta.wrap(resnet20, "ttrv")
    torch.manual_seed(0)
    expected = [reference(x) for _ in range(2)]
    torch.manual_seed(0)
    with torch.inference_mode():
        got = [method(x.clone()) for _ in range(2)]
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert changed(state(reference.model), state(tta.load_model("cifar10_resnet20")))


def test_per_image_modes_refuse_batchnorm_test_statistics_of_one_image(resnet20):
    with pytest.raises(ValueError, match="bn_alpha < 1"):
        tta.wrap(resnet20, "ttrv", mode="episodic")


def test_bad_options_are_refused(resnet20):
    for kw, match in [({"mode": "twice"}, "mode"), ({"num_train_samples": 1}, "num_train_samples"),
                      ({"num_train_samples": 40}, "num_train_samples"), ({"adapt": "bogus"}, "adapt"),
                      ({"mode": "episodic", "episodic": True}, "episodic"),
                      ({"adapt": "all", "skip_modules": "last_stage"}, "skip_modules"),
                      # the views' options without views: refused, not ignored
                      ({"augmix": True}, "sampling='views'"), ({"transform": torch.nn.Identity()}, "sampling='views'"),
                      ({"sampling": "views", "augmix": "yes"}, "augmix must be True or False")]:
        with pytest.raises(ValueError, match=match):
            tta.wrap(copy.deepcopy(resnet20), "ttrv", **kw)
    with pytest.raises(TypeError, match="CLIP classifier"):
        tta.wrap(resnet20, "ttrv", adapt="prompt")
    with pytest.raises(TypeError, match="transform must be an nn.Module"):
        tta.wrap(copy.deepcopy(resnet20), "ttrv", sampling="views", transform="crop")
    for alpha in (5.0, "0.1", True):
        with pytest.raises(ValueError, match=f"bn_alpha must be a number in \\[0, 1\\], got {alpha!r}"):
            tta.wrap(copy.deepcopy(resnet20), "ttrv", bn_alpha=alpha)
    with pytest.raises(TypeError, match="'bn_alpha' would change nothing"):
        tta.wrap(tiny_clip(), "ttrv", bn_alpha=0.1)
    assert {"cifar10", "imagenet"} <= set(tta.method_presets("ttrv"))


@pytest.mark.parametrize("mode", ["online", "episodic"])
def test_a_one_class_classifier_is_refused_before_any_update(mode, images):
    model = load_tiny_clip(TINY, 0, classnames=["cat"])
    method = tta.wrap(model, "ttrv", mode=mode, num_samples=8, num_train_samples=4)
    before = state(model)
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        method(images)
    assert not changed(before, state(model))


# ----------------------------------------------------------------------------------
# CLIP classifiers
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapt", ["prompt", "image_norm", "image"])
def test_clip_adapts_only_the_chosen_parameters(adapt, images):
    model = tiny_clip()
    method = tta.wrap(model, "ttrv", adapt=adapt, lr=1e-2, num_samples=8, num_train_samples=4)
    source = state(method)
    assert not method.batch_stats
    torch.manual_seed(0)
    method(images)
    assert method.last_record.to_dict()["kl"] == 0.0
    method(images)
    moved = {k.removeprefix("model.") for k in changed(source, state(method))}
    names = {n for n, _ in method.adapted}
    assert moved and moved <= names
    if adapt == "prompt":
        assert names == {"ctx"}
    else:
        assert all(n.startswith("clip.visual.") for n in names)
    method.reset()
    assert not changed(source, state(method))


def quantile_draws(probs, num_samples, replacement=False, generator=None):
    """torch.multinomial without randomness: the draws at the quantiles (k + 0.5) / n."""
    u = (torch.arange(num_samples, dtype=probs.dtype) + 0.5) / num_samples
    cdf = probs.cumsum(dim=1) / probs.sum(dim=1, keepdim=True)
    return torch.searchsorted(cdf, u.expand(probs.shape[0], -1).contiguous()).clamp_(max=probs.shape[1] - 1)


def test_clip_episodic_is_independent_per_image(images, monkeypatch):
    monkeypatch.setattr(torch, "multinomial", quantile_draws)  # episodes free of the RNG's order
    method = tta.wrap(tiny_clip(), "ttrv", mode="episodic", num_samples=8, num_train_samples=4, lr=5e-2)
    source = state(method)
    first = method(images)
    assert not changed(source, state(method))  # every episode ends at the source again
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(method(images[order]), first[order], rtol=0, atol=1e-5)
    torch.testing.assert_close(method(images[2:3]), first[2:3], rtol=0, atol=1e-5)
    with torch.no_grad():
        zero_shot = tiny_clip()(images)
    assert (first - zero_shot).abs().max() > 1e-3  # the episodes do adapt


def test_clip_single_example_adapts_once_then_only_predicts(images):
    method = tta.wrap(tiny_clip(), "ttrv", mode="single_example", single_example_steps=3, lr=5e-2,
                      num_samples=8, num_train_samples=4)
    torch.manual_seed(0)
    method(images)
    assert method.last_record.num_selected == 1 and method.single_example_done
    after = state(method)
    out = method(images)
    assert not changed(after, state(method)) and method.last_record.num_selected == 0
    with torch.no_grad():
        assert torch.equal(out, method.model(images))
    saved = method.state_dict()
    method.reset()
    assert not method.single_example_done
    method.load_state_dict(saved)
    assert method.single_example_done


def test_clip_views_sampling(images):
    method = tta.wrap(tiny_clip(), "ttrv", sampling="views", num_samples=8, num_train_samples=4)
    torch.manual_seed(0)
    assert method(images).shape == (4, 5)
    assert method.last_record.to_dict()["kl"] == 0.0


def test_zoo_clip_small_online(cifar_test_images):
    from tta.models import zoo

    if not (zoo.bundled_dir() / "clip_small.pt").is_file():
        pytest.skip("zoo:clip_small is not trained")
    model = tta.load_model("zoo:clip_small")
    method = tta.wrap(model, "ttrv")
    assert method.adapt == "prompt" and isinstance(method, TTRV)
    x = cifar_test_images[0][:32]
    torch.manual_seed(0)
    for xb in x.split(16):
        assert method(xb).shape == (16, 10)
    record = method.last_record.to_dict()
    assert record["kl"] > 0 and record["num_samples"] == 16
