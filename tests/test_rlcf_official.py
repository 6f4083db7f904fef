"""RLCF where its reference code goes further (issue 26): a saved CoOp context as the
starting prompt (also TPT's), the image encoder's momentum buffer, and the
fine-grained preset; on tiny random open_clip models (offline)."""

import pickle
from pathlib import Path

import pytest
import torch

import tta

open_clip = pytest.importorskip("open_clip")

from tiny_clip import (CLASSES, load_tiny_clip, registered_on_one_thread, smooth_images,  # noqa: E402
                       with_agreeing_texts)

from tta.methods.rlcf import RLCF  # noqa: E402

TINY = "tta-test-tiny-clip-rlcf"
WIDTH = 64  # the tiny text tower's token width


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    yield from registered_on_one_thread(TINY, tmp_path_factory)


def tiny_clip(seed=0, **kw):
    return load_tiny_clip(TINY, seed, **kw)


@pytest.fixture
def images():
    return smooth_images(3)


def agreeing_reward(images, seed=1):
    """The tiny CLIP of ``seed`` as a reward model whose class texts agree with ``images``."""
    return with_agreeing_texts(tiny_clip(seed), images, seed)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------
# A saved context as the starting prompt
# ----------------------------------------------------------------------------------


def test_a_saved_context_sets_the_prompt_exactly(tmp_path, images):
    text = tiny_clip(ctx_init="a photo of a")
    # the context of "a photo of a", saved as a plain tensor: the same classifier
    torch.save(text.ctx.detach().clone(), tmp_path / "ctx.pt")
    plain = tiny_clip(ctx_init=str(tmp_path / "ctx.pt"))
    assert torch.equal(plain.ctx.detach(), text.ctx.detach()) and plain.ctx.dtype == torch.float32
    assert plain.ctx_source == str(tmp_path / "ctx.pt") and "ctx.pt" in repr(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), text(images), rtol=0, atol=1e-6)
    # a CoOp checkpoint (fp16, under the prompt learner's state_dict, beside other entries)
    torch.manual_seed(3)
    learned = 0.02 * torch.randn(4, WIDTH)
    coop = {"state_dict": {"ctx": learned.half(), "token_prefix": torch.zeros(5, 1, WIDTH),
                           "token_suffix": torch.zeros(5, 72, WIDTH)}, "epoch": 50, "optimizer": {"state": {}}}
    torch.save(coop, tmp_path / "model.pth.tar-50")
    model = tiny_clip(ctx_init=tmp_path / "model.pth.tar-50")  # a Path too
    assert torch.equal(model.ctx.detach(), learned.half().float())
    # exactly the prompt a classifier gets by setting its context by hand
    by_hand = tiny_clip(ctx_init="a photo of a")
    with torch.no_grad():
        by_hand.ctx.copy_(learned.half().float())
        torch.testing.assert_close(model(images), by_hand(images), rtol=0, atol=1e-6)
        assert not torch.allclose(model(images), text(images), atol=1e-3)
    # a whole model's state dict, and the tensor itself
    torch.save({"prompt_learner.ctx": learned, "image_encoder.w": torch.ones(2)}, tmp_path / "model.pth")
    assert torch.equal(tiny_clip(ctx_init=str(tmp_path / "model.pth")).ctx.detach(), learned)
    assert torch.equal(tiny_clip(ctx_init=learned).ctx.detach(), learned)
    # other lengths and class names after loading
    longer = 0.02 * torch.randn(6, WIDTH)
    torch.save(longer, tmp_path / "six.pt")
    six = tiny_clip(ctx_init=str(tmp_path / "six.pt"))
    assert torch.equal(six.ctx.detach(), longer)
    six.set_classnames(CLASSES[:2])
    assert six(images).shape == (3, 2) and torch.equal(six.ctx.detach(), longer)


def test_wrong_contexts_are_refused_with_a_clear_message(tmp_path):
    torch.save(torch.zeros(4, 32), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"shape \(4, 32\).*\(n_ctx, 64\)"):
        tiny_clip(ctx_init=str(tmp_path / "narrow.pt"))
    torch.save({"state_dict": {"ctx": torch.zeros(5, 4, WIDTH)}}, tmp_path / "csc.pth")
    with pytest.raises(ValueError, match=r"shape \(5, 4, 64\).*class-specific"):
        tiny_clip(ctx_init=str(tmp_path / "csc.pth"))
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no single prompt context.*'weight'"):
        tiny_clip(ctx_init=str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        tiny_clip(ctx_init=str(tmp_path / "missing.pt"))
    # safe loading only: a pickled object is refused, with how to extract the context
    (tmp_path / "unsafe.pt").write_bytes(pickle.dumps(Path("x"), protocol=2))
    with pytest.raises(ValueError, match="(?s)weights_only=True.*state_dict"):
        tiny_clip(ctx_init=str(tmp_path / "unsafe.pt"))
    # prompt text stays prompt text
    assert tiny_clip(ctx_init="itap of a").ctx_source is None


def test_tpt_and_rlcf_start_from_a_saved_context_and_return_to_it(tmp_path, images):
    torch.manual_seed(4)
    learned = 0.02 * torch.randn(4, WIDTH)
    torch.save({"state_dict": {"ctx": learned}}, tmp_path / "coop.pth.tar-50")
    path = str(tmp_path / "coop.pth.tar-50")
    tpt = tta.wrap(tiny_clip(), "tpt", num_views=16, ctx_init=path)
    assert torch.equal(tpt.model.ctx.detach(), learned)
    tpt(images[:1])
    assert not torch.equal(tpt.model.ctx.detach(), learned)
    tpt.reset()
    assert torch.equal(tpt.model.ctx.detach(), learned)
    # a classifier that already had a prompt takes the saved one
    rlcf = tta.wrap(tiny_clip(ctx_init="a photo of a"), "rlcf", reward=agreeing_reward(images), num_views=16,
                    ctx_init=path)
    assert torch.equal(rlcf.model.ctx.detach(), learned)
    rlcf(images[:1])
    assert not torch.equal(rlcf.model.ctx.detach(), learned)
    rlcf.reset()
    assert torch.equal(rlcf.model.ctx.detach(), learned)
    # the image-encoder variant classifies with it, fixed
    image = tta.wrap(tiny_clip(), "rlcf", reward=agreeing_reward(images), adapt="image_norm", num_views=16,
                     ctx_init=path)
    assert torch.equal(image.model.ctx.detach(), learned) and not image.model.ctx.requires_grad
    image(images[:1])
    assert torch.equal(image.model.ctx.detach(), learned)


# ----------------------------------------------------------------------------------
# The momentum buffer
# ----------------------------------------------------------------------------------


def ema_rlcf(images, **kw):
    kw = dict(reward=agreeing_reward(images), adapt="image_norm", num_views=8, steps=1, lr=5e-2, ema=True,
              ema_momentum=0.5, ema_every=2) | kw
    return tta.wrap(tiny_clip(), "rlcf", **kw)


def test_momentum_buffer_is_off_by_default_with_the_official_values():
    defaults = tta.method_defaults("rlcf")
    assert {k: defaults[k] for k in ("ema", "ema_momentum", "ema_every", "ema_weight")} == dict(
        ema=False, ema_momentum=0.9998, ema_every=64, ema_weight=1.0)
    method = tta.wrap(tiny_clip(), "rlcf", reward=None, num_views=8)
    assert method.momentum_state is None and not any("momentum_state" in k for k in method.state_dict())
    with pytest.raises(ValueError, match="episodic"):
        tta.wrap(tiny_clip(), "rlcf", reward=None, ema=True, episodic=True)
    with pytest.raises(ValueError, match="ema_every"):
        tta.wrap(tiny_clip(), "rlcf", reward=None, ema=True, ema_every=0)


def test_momentum_buffer_averages_after_each_image_and_refreshes_the_start(images):
    method = ema_rlcf(images)
    params = [p for _, p in method.adapted]
    source = [p.detach().clone() for p in params]
    buf = method.momentum_state
    initial = state(method)
    torch.manual_seed(0)
    out = method(images[:1])
    first = [p.detach().clone() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(first, source))
    # the prediction is the adapted model's, not the average's
    with torch.no_grad():
        assert torch.equal(out, method.model(images[:1]))
    expected = [s.lerp(f, 0.5) for s, f in zip(source, first)]
    assert all(torch.equal(a, e) for a, e in zip(buf.averages(), expected))
    assert all(torch.equal(s, s0) for s, s0 in zip(buf.starts(), source)) and int(buf.count) == 1
    # the second image starts from the start (still the source), then refreshes it
    method.restart()
    assert all(torch.equal(p, s) for p, s in zip(params, source))
    method(images[1:2])
    second = [p.detach().clone() for p in params]
    expected = [e.lerp(s, 0.5) for e, s in zip(expected, second)]
    assert all(torch.equal(a, e) for a, e in zip(buf.averages(), expected)) and int(buf.count) == 0
    assert all(torch.equal(s, a) for s, a in zip(buf.starts(), expected))  # ema_weight 1: the average
    method.restart()
    assert all(torch.equal(p, a) for p, a in zip(params, expected)) and not method.optimizer.state
    # reset: model, buffer and count back to the source, bit-exact
    method.reset()
    assert same(state(method), initial) and not method.optimizer.state


def test_momentum_start_mixes_in_the_source_by_ema_weight(images):
    method = ema_rlcf(images, ema_every=1, ema_weight=0.25)
    source = [p.detach().clone() for _, p in method.adapted]
    method(images[:1])
    for start, s, a in zip(method.momentum_state.starts(), source, method.momentum_state.averages()):
        torch.testing.assert_close(start, 0.75 * s + 0.25 * a)


def test_momentum_batches_run_image_by_image_and_state_round_trips(images):
    together = ema_rlcf(images, ema_every=2)
    torch.manual_seed(1)
    out = together(images)
    alone = ema_rlcf(images, ema_every=2)
    torch.manual_seed(1)
    outs = [alone(images[i: i + 1]) for i in range(3)]
    assert torch.equal(out, torch.cat(outs))
    assert same(state(together.momentum_state), state(alone.momentum_state))
    # a checkpoint resumes bit-exactly: the buffer, its count and the model
    saved = together.state_dict()
    resumed = ema_rlcf(images, ema_every=2)
    resumed.load_state_dict(saved)
    assert same(state(resumed), state(together)) and int(resumed.momentum_state.count) == 1
    torch.manual_seed(2)
    expected = together(images[:2])
    torch.manual_seed(2)
    assert torch.equal(resumed(images[:2]), expected)
    assert same(state(resumed), state(together))


# ----------------------------------------------------------------------------------
# The fine-grained preset
# ----------------------------------------------------------------------------------


def test_fine_grained_preset_is_the_official_setting(images):
    assert tta.method_presets("rlcf")["fine_grained"] == {"steps": 5, "augmix": True}
    defaults = tta.method_defaults("rlcf", preset="fine_grained")
    assert {k: defaults[k] for k in ("steps", "augmix", "sample_k", "num_views", "selection_p", "weight_decay",
                                     "reward", "lr")} == dict(
        steps=5, augmix=True, sample_k=3, num_views=64, selection_p=0.1, weight_decay=5e-4,
        reward="clip:ViT-L-14/openai", lr=None)
    method = tta.wrap(tiny_clip(), "rlcf", preset="fine_grained", reward=None, num_views=8)
    assert isinstance(method, RLCF) and method.tta_steps == 5 and method.views.use_augmix
    assert method.optimizer.param_groups[0]["lr"] == 7e-3
    image = tta.wrap(tiny_clip(), "rlcf", preset="fine_grained", reward=None, num_views=8, adapt="image")
    assert image.tta_steps == 5 and image.optimizer.param_groups[0]["lr"] == 1e-5
    assert tta.method_defaults("rlcf", preset="imagenet")["steps"] == 3
