"""MEMO (tta/methods/memo.py): the batched, functional per-image episodes equal a plain
loop over the images (the oracle below, kept only here), weights never change, each
image's prediction is its own, BatchNorm statistics are detached and unbiased."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
import tta.methods.memo  # noqa: F401  (registers "memo")
from tta.methods.memo import MEMO, use_memo_batch_norm

from test_methods import changed_keys, state

torch.set_num_threads(1)


class FixedViews(nn.Module):
    """Deterministic views: copy ``k`` of an image (its position within the image's
    ``num_views`` contiguous copies) is shifted by ``k`` pixels and scaled; the same
    views for an image whatever batch it is in."""

    def __init__(self, num_views: int) -> None:
        super().__init__()
        self.num_views = num_views

    def forward(self, x):
        k = torch.arange(x.shape[0]) % self.num_views
        shifted = torch.stack([torch.roll(img, int(s), dims=-1) for img, s in zip(x, k)])
        return shifted * (0.7 + 0.5 * k / self.num_views).view(-1, 1, 1, 1).to(x.dtype)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    with torch.no_grad():  # source statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.double().eval()


# -- the oracle: MEMO one image at a time, ordinary autograd and torch optimizers -----

def _official_bn_forward(self, x):
    # zhangmarvin/memo's _modified_bn_forward: a momentum-1 running-statistics update
    # (unbiased variance, outside autograd), mixed with the source by the prior.
    est_mean = torch.zeros_like(self.running_mean)
    est_var = torch.ones_like(self.running_var)
    F.batch_norm(x, est_mean, est_var, None, None, True, 1.0, self.eps)
    a = self.oracle_alpha
    mean = (1 - a) * self.running_mean + a * est_mean
    var = (1 - a) * self.running_var + a * est_var
    return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def memo_loop(source: nn.Module, x, views_fn, *, alpha, steps, optimizer, **opt):
    """Per image: a fresh copy of the source and a fresh optimizer, ``steps`` steps on
    the marginal entropy of its views, then the logits of the image itself."""
    out = []
    for i in range(x.shape[0]):
        net = copy.deepcopy(source).eval()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.__class__ = type("OfficialBN", (nn.BatchNorm2d,), {"forward": _official_bn_forward})
                m.oracle_alpha = alpha
        opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
        optim = opt_cls(net.parameters(), **opt)
        for _ in range(steps):
            logits = net(views_fn(x[i:i + 1]))
            log_p = logits.log_softmax(dim=1)
            avg = log_p.logsumexp(dim=0) - math.log(logits.shape[0])
            avg = avg.clamp(min=torch.finfo(avg.dtype).min)
            loss = -(avg * avg.exp()).sum()
            optim.zero_grad()
            loss.backward()
            optim.step()
        with torch.no_grad():
            out.append(net(x[i:i + 1]))
    return torch.cat(out)


CASES = [
    # official: plain SGD, one step
    dict(steps=1, optimizer="sgd", lr=0.05, momentum=0.0, nesterov=False),
    # the port: momentum 0.9 + Nesterov, two steps to exercise the momentum buffer
    dict(steps=2, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(steps=2, optimizer="adam", lr=0.01, weight_decay=0.01),
    dict(steps=3, optimizer="adamw", lr=0.01, weight_decay=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['optimizer']}-{c['steps']}")
def test_equals_the_per_image_reference_loop(case):
    torch.manual_seed(1)
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    source = tiny_net()
    case = dict(case)
    steps, optimizer = case.pop("steps"), case.pop("optimizer")
    views = FixedViews(6)
    method = MEMO(copy.deepcopy(source), num_views=6, transform=views, bn_alpha=0.3, steps=steps,
                  optimizer=optimizer, images_per_forward=2, **case)
    got = method(x)
    expected = memo_loop(source, x, lambda img: views(img.repeat_interleave(6, dim=0)), alpha=0.3,
                         steps=steps, optimizer=optimizer, **case)
    # the step moves the logits well beyond the tolerance
    assert (expected - source(x)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)


def test_weights_never_change_reset_is_bit_exact_and_a_state_dict_round_trip_continues(resnet20, noisy_batch):
    method = tta.wrap(resnet20, "memo", num_views=4)
    before = state(method)
    with torch.no_grad():  # adapting under no_grad, as models are usually evaluated
        logits = method(noisy_batch[:3])
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert changed_keys(before, state(method)) == set()
    assert all(p.grad is None for p in method.parameters())
    method.reset()
    assert changed_keys(before, state(method)) == set()

    second = tta.wrap(tta.load_model("cifar10_resnet20"), "memo", num_views=4)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    for batch in (noisy_batch[3:5], noisy_batch[5:7]):
        torch.manual_seed(7)
        a = method(batch)
        torch.manual_seed(7)
        b = second(batch)
        assert torch.equal(a, b)
    assert changed_keys(state(method), state(second)) == set()


def test_a_prediction_depends_on_its_own_image_only():
    torch.manual_seed(2)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    method = MEMO(tiny_net(), num_views=5, transform=FixedViews(5), lr=0.05)
    together = method(x)
    chunked = MEMO(tiny_net(), num_views=5, transform=FixedViews(5), lr=0.05, images_per_forward=3)(x)
    alone = torch.cat([method(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, alone, rtol=1e-6, atol=1e-6)
    # a different neighbour leaves image 0's prediction as it was
    other = torch.cat([x[:1], torch.rand(3, 3, 8, 8, dtype=torch.float64)])
    torch.testing.assert_close(method(other)[0], together[0], rtol=1e-6, atol=1e-6)


def test_batch_norm_statistics_are_unbiased_per_image_and_detached():
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.running_var.fill_(4.0)
    use_memo_batch_norm(bn, alpha=0.25)
    x = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # 2 images x 5 views
    out = torch.vmap(bn)(x)
    var, mean = torch.var_mean(x.detach(), dim=(1, 3, 4), unbiased=True, keepdim=True)  # per image
    var, mean = 0.25 * var + 0.75 * 4.0, 0.25 * mean
    expected = (x.detach() - mean) / (var + bn.eps).sqrt() * bn.weight.detach().view(1, 1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    # Constant statistics: d(sum out)/dx is the per-channel scale exactly (through the
    # statistics it would not be: the mean's share cancels it).
    out.sum().backward()
    torch.testing.assert_close(x.grad, (bn.weight.detach().view(1, 1, 3, 1, 1) / (var + bn.eps).sqrt())
                               .expand_as(x))


@pytest.mark.parametrize("name", ["zoo:resnet26_gn", "zoo:vit_tiny_ln"])
def test_group_and_layer_norm_models_run(name, noisy_batch):
    method = tta.wrap(tta.load_model(name), "memo", num_views=4)
    before = state(method)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule")  # SDPA under vmap on the CPU
        logits = method(noisy_batch[:2])
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert changed_keys(before, state(method)) == set()
    # the step did change the prediction (all weights adapt, no BatchNorm here)
    with torch.no_grad():
        assert not torch.allclose(logits, method.model(noisy_batch[:2]))


def test_a_timm_batch_norm_network_runs():
    model = tta.load_model("timm:resnet18", pretrained=False, num_classes=10)
    method = tta.wrap(model, "memo", num_views=3)
    logits = method(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_defaults_and_presets():
    defaults = tta.method_defaults("memo")
    assert {k: defaults[k] for k in ("num_views", "lr", "momentum", "nesterov", "optimizer", "steps", "bn_alpha")} \
        == {"num_views": 32, "lr": 0.005, "momentum": 0.0, "nesterov": False, "optimizer": "sgd", "steps": 1,
            "bn_alpha": 0.1}
    assert "skip_modules" not in defaults
    port = tta.method_defaults("memo", preset="imagenet")
    assert (port["num_views"], port["lr"], port["momentum"], port["nesterov"], port["crop"]) == \
        (64, 0.00025, 0.9, True, "resized")
    method = tta.wrap(tta.load_model("cifar10_resnet20"), "memo", preset="cifar10")
    assert (method.num_views, method.optimizer.param_groups[0]["momentum"], method.tta_steps) == (32, 0.9, 1)
    assert method.optimizer.param_groups[0]["nesterov"] is True
    assert len(method.adapted) == len(list(method.model.parameters()))


@pytest.mark.parametrize("options, message", [
    (dict(num_views=0), "num_views"),
    (dict(images_per_forward=0), "images_per_forward"),
    (dict(crop="center"), "crop"),
    (dict(steps=0), "steps"),
    (dict(bn_alpha=1.5), "bn_alpha"),
    (dict(nesterov=True), "nesterov=True needs momentum"),
    (dict(amp="fp16"), "fp16"),
    (dict(lr=-1.0), "lr"),
    (dict(optimizer="lbfgs"), "optimizer"),
])
def test_bad_options_are_refused_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        tta.wrap(tiny_net(), "memo", **options)


def test_unknown_options_name_the_close_ones():
    with pytest.raises(TypeError, match="num_views"):
        tta.wrap(tiny_net(), "memo", num_view=4)
    with pytest.raises(TypeError, match="skip_modules"):
        tta.wrap(tiny_net(), "memo", skip_modules="paper")


def test_compile_is_refused_with_the_reason(resnet20):
    """MEMO's forwards all run inside torch.func's vmap and grad, which torch.compile
    does not trace (it failed there with an internal assertion)."""
    with pytest.raises(TypeError, match=r"'memo' runs each image's episode through torch.func.*'compile'"):
        tta.wrap(resnet20, "memo", compile=True)
    assert "compile" not in tta.method_defaults("memo")
