"""Methods where users actually call them: under no_grad / inference_mode, with odd
dtypes, twice on one model, with failing steps and foreign states; the papers'
learning-rate rule and the published presets."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tta
from tta.methods.inputs import floating_dtype
from tta.methods.params import sar_paper_lr

from test_methods import GRADIENT_METHODS, IMAGE_METHODS, changed_keys, make, small_options, state

ALL = GRADIENT_METHODS + ["norm", "source"]


def moved(before, method):
    return changed_keys(before, state(method))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_adapts_under_no_grad_and_inference_mode(name, context, resnet20, noisy_batch, cifar_train_images):
    kw = dict(lr=1e-3, **({"d_margin": 1.0} if name in ("eta", "eata") else {}))
    reference = make(name, copy.deepcopy(resnet20), cifar_train_images, **kw)
    method = make(name, resnet20, cifar_train_images, **kw)
    before = state(method)
    torch.manual_seed(0)
    expected = [reference(noisy_batch) for _ in range(2)]
    torch.manual_seed(0)
    with context():
        x = noisy_batch.clone()  # an inference tensor under inference_mode
        got = [method(x) for _ in range(2)]
    assert moved(before, method), f"{name} did not adapt under {context.__name__}"
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


# inference mode is the stricter block (no_grad's failures were EATA's, by its Fisher
# estimate); both for EATA, inference mode for the others: 22 cases, not 42
@pytest.mark.parametrize("name, context",
                         [("eata", torch.no_grad)] + [(n, torch.inference_mode) for n in IMAGE_METHODS],
                         ids=lambda v: getattr(v, "__name__", v))
def test_wrapped_inside_no_grad_or_inference_mode_as_outside(name, context, noisy_batch):
    """An evaluation loop that wraps inside its no_grad / inference_mode block: copies,
    buffers, Fisher estimates, warm-ups built there must still take updates."""
    x, kw = noisy_batch[:16], small_options(name, noisy_batch)
    if name == "eata":  # its Fisher estimate takes gradients
        kw = {"fisher_loader": [noisy_batch[16:32]], "fisher_size": 16}
    reference, model = tta.load_model("cifar10_resnet20"), tta.load_model("cifar10_resnet20")
    torch.manual_seed(0)
    reference = tta.wrap(reference, name, **kw)
    expected = [reference(x) for _ in range(2)]
    reference.reset()
    expected.append(reference(x))
    torch.manual_seed(0)
    with context():
        method = tta.wrap(model, name, **kw)
        got = [method(x) for _ in range(2)]
    method.reset()
    got.append(method(x))
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_a_model_loaded_inside_inference_mode_is_refused_with_the_fix():
    with torch.inference_mode():
        model = tta.load_model("cifar10_resnet20")
        with pytest.raises(ValueError, match="weights were made inside torch.inference_mode.*load the model outside"):
            tta.wrap(model, "tent")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_cast_to_the_model_dtype(dtype, resnet20, noisy_batch):
    x = noisy_batch[:16].to(dtype)
    expected = tta.wrap(copy.deepcopy(resnet20), "tent")(x.float())
    got = tta.wrap(resnet20, "tent")(x)
    assert got.dtype == torch.float32
    assert torch.equal(expected, got)


def test_norm_takes_its_statistics_weight_by_either_name(resnet20, noisy_batch):
    one = noisy_batch[:1]
    with pytest.raises(ValueError, match=r"bn_alpha < 1 \(e.g. bn_alpha=0.1"):
        tta.wrap(copy.deepcopy(resnet20), "norm")(one)
    by_alpha = tta.wrap(copy.deepcopy(resnet20), "norm", alpha=0.1)(one)
    assert torch.equal(tta.wrap(copy.deepcopy(resnet20), "norm", bn_alpha=0.1)(one), by_alpha)  # as advised
    with pytest.raises(ValueError, match="alpha=0.2 and bn_alpha=0.1 are one option"):
        tta.wrap(resnet20, "norm", alpha=0.2, bn_alpha=0.1)
    # a bad value is named by the option given (before: always "bn_alpha")
    for key, value in (("alpha", -1), ("bn_alpha", 1.5), ("alpha", "0.5")):
        with pytest.raises(ValueError, match=rf"norm: {key} must be a number in \[0, 1\].*got {value!r}"):
            tta.wrap(copy.deepcopy(resnet20), "norm", **{key: value})


def test_a_float64_model_takes_its_source_images_and_batches_in_float64(resnet20, noisy_batch):
    model = resnet20.to(torch.float64)
    method = tta.wrap(model, "eata", fisher_loader=[noisy_batch[16:32]], fisher_size=16)  # float32 source images
    assert method(noisy_batch[:16]).dtype == torch.float32
    assert all(f.dtype == torch.float64 for f in method.fisher)


def test_the_input_dtype_is_that_of_most_weights():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(torch.float16)
    net[1].float()  # float32 norm layers among float16 convolutions
    assert floating_dtype(net) == torch.float16
    net.register_parameter("prompt", nn.Parameter(torch.zeros(4)))  # float32, first in parameters()
    net.double()
    net.prompt.data = net.prompt.data.float()
    assert next(net.parameters()).dtype == torch.float32 and floating_dtype(net) == torch.float64
    assert floating_dtype(nn.Identity()) is None


@pytest.mark.parametrize("shape", [(2, 3, 0, 8), (2, 3, 8, 0)])
def test_zero_sized_images_are_refused_by_the_check(shape, resnet20):
    method = tta.wrap(resnet20, "tent")
    with pytest.raises(ValueError, match="at least 1x1 pixels"):
        method(torch.rand(shape))


def test_a_plain_conv_net_is_refused_at_wrap_time():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="tent: nothing to adapt.*no BatchNorm.*use method 'source'"):
        tta.wrap(net, "tent")
    assert tta.wrap(net, "source")(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_freezing_every_norm_layer_says_so(resnet20):
    with pytest.raises(ValueError, match="frozen.*skip_modules='none'"):
        tta.wrap(resnet20, "sar", skip_modules=["backbone"])


def test_wrapping_one_model_twice_is_refused_clearly(resnet20, noisy_batch):
    first = tta.wrap(resnet20, "tent")
    with pytest.raises(ValueError, match="already wrapped by tta method 'tent'.*copy.deepcopy"):
        tta.wrap(resnet20, "norm")
    with pytest.raises(TypeError, match="already a tta method"):
        tta.wrap(first, "norm")
    # a copy is another model, and a freed method frees its model
    tta.wrap(copy.deepcopy(resnet20), "norm")(noisy_batch)
    del first
    tta.wrap(resnet20, "norm")(noisy_batch)


@pytest.mark.parametrize("name, kwargs", [
    ("tent", {"lr": -1.0}),
    ("tent", {"optimizer": "sgdd", "channels_last": True}),
    ("sar", {"lr": "papr"}),
    ("eata", {}),  # no fisher_loader: refused after the norm layers are configured
    ("cotta", {"teacher_momentum": 2.0}),
    ("rotta", {"memory_size": 0}),
])
def test_a_refused_wrap_leaves_the_model_as_it_was(name, kwargs, resnet20, noisy_batch):
    resnet20.eval()
    with torch.no_grad():
        before = resnet20(noisy_batch)
    calls = []
    hook = resnet20.register_forward_hook(lambda *args: calls.append(1))  # the caller's own hook
    classes = {n: type(m) for n, m in resnet20.named_modules()}
    grads = {n: p.requires_grad for n, p in resnet20.named_parameters()}
    with pytest.raises((ValueError, TypeError)) as refused:
        tta.wrap(resnet20, name, **kwargs)
    assert {n: type(m) for n, m in resnet20.named_modules()} == classes
    assert {n: p.requires_grad for n, p in resnet20.named_parameters()} == grads
    assert all(p.is_contiguous() for p in resnet20.parameters())
    with torch.no_grad():  # source statistics again: one image predicts as in the batch
        assert torch.equal(resnet20(noisy_batch), before)
        torch.testing.assert_close(resnet20(noisy_batch[:1]), before[:1])
    hook.remove()  # the caller's handle still removes its hook
    resnet20(noisy_batch[:1])
    assert len(calls) == 2
    # the refused method lives on in the kept traceback: it does not hold the model
    tta.wrap(resnet20, name, **{k: v for k, v in kwargs.items() if k == "channels_last"}, **(
        {"fisher_loader": [noisy_batch]} if name == "eata" else {}))(noisy_batch)
    assert refused.value is not None


class Boom(RuntimeError):
    pass


def raise_on_call(method, call: int):
    """Forward hooks that raise on the ``call``-th forward (1-based) of the method's
    model or of its collapse guard's reference model, whichever comes then."""
    count = [0]

    def hook(*_):
        count[0] += 1
        if count[0] == call:
            raise Boom(f"forward {call}")

    models = [method.model] + ([method.guard._reference] if method.guard is not None else [])
    handles = [m.backbone.linear.register_forward_hook(hook) for m in models]

    class Handles:
        def remove(self):
            for h in handles:
                h.remove()

    return Handles()


@pytest.mark.parametrize("name", ALL)
def test_a_step_that_raises_leaves_the_state_as_before(name, resnet20, noisy_batch, cifar_train_images):
    noisy_batch = noisy_batch[:32]
    # source and norm take no optimizer options
    kw = {} if name in ("source", "norm") else {"lr": 1e-2, "collapse_guard": name in GRADIENT_METHODS}
    method = make(name, resnet20, cifar_train_images, **kw)
    method(noisy_batch)  # optimizer state exists from here on
    # The step's forwards: SAR and DeYO run the model twice; the guard's reference
    # runs after the optimizer step, so a raise there comes after the update.
    for call in (1, 2, 3):
        before = state(method)
        optimizer_before = copy.deepcopy(method.optimizer.state_dict()) if method.optimizer else None
        handle = raise_on_call(method, call)
        try:
            method(noisy_batch)
            raised = False
        except Boom:
            raised = True
        finally:
            handle.remove()
        if not raised:
            assert call > 1 + (name in ("sar", "deyo")) + (method.guard is not None), call
            break
        assert not moved(before, method), (name, call, moved(before, method))
        if optimizer_before is not None:
            after = method.optimizer.state_dict()
            assert after["state"].keys() == optimizer_before["state"].keys()
            for i, entry in optimizer_before["state"].items():
                for k, v in entry.items():
                    assert torch.equal(after["state"][i][k], v)
            assert all(p.grad is None for _, p in method.adapted)
    # and it goes on exactly as one that never failed
    reference = make(name, tta.load_model("cifar10_resnet20"), cifar_train_images, **kw)
    torch.manual_seed(0)
    reference(noisy_batch)
    torch.manual_seed(0)
    expected = reference(noisy_batch)
    fresh = make(name, tta.load_model("cifar10_resnet20"), cifar_train_images, **kw)
    torch.manual_seed(0)
    fresh(noisy_batch)
    handle = raise_on_call(fresh, 3 if name in ("sar", "deyo") else 2 if fresh.guard else 1)
    with pytest.raises(Boom):
        fresh(noisy_batch)
    handle.remove()
    torch.manual_seed(0)
    assert torch.equal(fresh(noisy_batch), expected)


def test_sar_interrupted_between_its_passes_is_not_left_at_the_ascent_point(resnet20, noisy_batch):
    method = tta.wrap(resnet20, "sar", lr=1e-2, e_margin=10.0)
    params = [p.detach().clone() for _, p in method.adapted]
    handle = raise_on_call(method, 2)  # the second (perturbed) pass
    with pytest.raises(Boom):
        method(noisy_batch)
    handle.remove()
    distance = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p - p0) for (_, p), p0 in zip(method.adapted, params)]))
    assert distance == 0


def without_options(state_dict):
    """A state as saved before states kept their method's options."""
    extra = {k: v for k, v in state_dict["_extra_state"].items() if k != "options"}
    return {**state_dict, "_extra_state": extra}


def test_a_state_of_other_guard_settings_is_refused(resnet20, noisy_batch):
    saved = tta.wrap(copy.deepcopy(resnet20), "tent", collapse_guard={"window": 3})
    saved(noisy_batch[:16])
    with pytest.raises(ValueError, match=r"collapse_guard=\{'window': 3\} \(here \{'window': 7\}\)"):
        tta.wrap(resnet20, "tent", collapse_guard={"window": 7}).load_state_dict(saved.state_dict())


def test_foreign_states_are_refused_before_anything_changes(resnet20, noisy_batch, cifar_train_images):
    tent = tta.wrap(copy.deepcopy(resnet20), "tent")
    tent(noisy_batch)
    sgd_tent = tta.wrap(copy.deepcopy(resnet20), "tent", optimizer="sgd")
    sgd_tent(noisy_batch)
    sar = tta.wrap(copy.deepcopy(resnet20), "sar")
    sar(noisy_batch)
    resnet32_tent = tta.wrap(tta.load_model("cifar10_resnet32"), "tent")
    target = tta.wrap(resnet20, "tent")
    before = state(target)
    cases = [
        (sar.state_dict(), "from method 'sar'"),
        (sgd_tent.state_dict(), r"saved with optimizer='sgd' \(here 'adam'\).*tta.wrap\(model, 'tent', optimizer='sgd'"),
        (without_options(sgd_tent.state_dict()), "optimizer state is not this method's Adam.*SGD"),
        (tta.wrap(copy.deepcopy(resnet20), "tent", lr=0.01).state_dict(), r"lr=0.01 \(here 0.001\)"),
        (resnet32_tent.state_dict(), "does not match this method and model"),
        ({k: v for k, v in tent.state_dict().items() if k != "model.backbone.bn1.weight"}, "missing keys"),
    ]
    for foreign, message in cases:
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(foreign)
        assert not moved(before, target)
    # a state of the same method and model loads, and round-trips bit-exactly; the
    # options that only say how it runs may differ
    target.load_state_dict(tent.state_dict())
    assert not changed_keys(state(tent), state(target))
    tta.wrap(copy.deepcopy(resnet20), "tent", check_inputs=False, channels_last=True).load_state_dict(
        tent.state_dict())
    torch.manual_seed(0)
    a = tent(noisy_batch)
    torch.manual_seed(0)
    assert torch.equal(a, target(noisy_batch))


def test_the_papers_learning_rate_rule():
    resnet = tta.load_model("cifar10_resnet20")
    vit = tta.load_model("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    assert sar_paper_lr(resnet, 64) == 2.5e-4 and sar_paper_lr(resnet, 32) == 2.5e-4
    assert math.isclose(sar_paper_lr(resnet, 16), 2.5e-4 / 64 * 16 * 2)
    assert math.isclose(sar_paper_lr(resnet, 1), 2.5e-4 / 64 * 2 * 2)
    assert math.isclose(sar_paper_lr(vit, 64), 1e-3) and math.isclose(sar_paper_lr(vit, 16), 2.5e-4)
    assert math.isclose(sar_paper_lr(vit, 1), 2 * 1e-3 / 64)


@pytest.mark.parametrize("name", ["sar", "deyo"])
def test_lr_paper_is_resolved_on_the_first_batch_and_kept_by_reset(name, resnet20, noisy_batch):
    method = tta.wrap(resnet20, name)
    method.load_state_dict(method.state_dict())  # a snapshot taken before the first batch
    with pytest.raises(ValueError, match="batch size 1"):
        method(noisy_batch[:1])  # refused: it must not fix the learning rate
    method(noisy_batch[:16])
    expected = 2.5e-4 / 64 * 16 * 2
    assert math.isclose(method.optimizer.param_groups[0]["lr"], expected)
    method.reset()
    assert math.isclose(method.optimizer.param_groups[0]["lr"], expected)
    with pytest.raises(ValueError, match="no published learning-rate rule"):
        tta.wrap(tta.load_model("cifar10_resnet20"), "tent", lr="paper")


def test_presets_give_the_published_settings(resnet20, cifar_train_images):
    eata = make("eata", copy.deepcopy(resnet20), cifar_train_images, preset="cifar10")
    assert isinstance(eata.optimizer, torch.optim.Adam) and eata.optimizer.param_groups[0]["lr"] == 1e-3
    assert eata.d_margin == 0.4 and eata.fisher_alpha == 1.0
    assert tta.method_defaults("eata", preset="cifar10")["fisher_size"] == 2000
    # explicit overrides refine a preset
    deyo = tta.wrap(copy.deepcopy(resnet20), "deyo", preset="cifar10", lr=5e-4)
    assert isinstance(deyo.optimizer, torch.optim.Adam) and deyo.optimizer.param_groups[0]["lr"] == 5e-4
    tent = tta.wrap(copy.deepcopy(resnet20), "tent", preset="imagenet")
    assert isinstance(tent.optimizer, torch.optim.SGD) and tent.optimizer.param_groups[0]["lr"] == 2.5e-4
    for name in tta.list_methods():
        assert {"cifar10", "imagenet"} <= set(tta.method_presets(name))
    with pytest.raises(KeyError, match="no preset 'cifar100'.*'cifar10', 'imagenet'"):
        tta.wrap(resnet20, "tent", preset="cifar100")


def test_methods_without_an_optimizer_offer_no_optimizer_options() -> None:
    for name in ("source", "norm"):
        defaults = tta.method_defaults(name)
        assert not {"lr", "optimizer", "momentum", "steps", "collapse_guard"} & set(defaults), name
    assert "bn_alpha" not in tta.method_defaults("source") and "bn_alpha" in tta.method_defaults("norm")
    assert "lr" in tta.method_defaults("tent")
    model = tta.load_model("cifar10_resnet20", pretrained=False)
    with pytest.raises(TypeError, match="'source' takes no gradient steps, so 'lr' would change nothing"):
        tta.wrap(model, "source", lr=1e-3)


def _small_bn_net(**bn) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, **bn), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize("name, kwargs, match", [
    ("tent", {}, r"norm layers \(1\) have no affine parameters \(built with affine=False"),
])
def test_norm_layers_without_affines_are_named_as_the_reason(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tta.wrap(_small_bn_net(affine=False), name, **kwargs)


@pytest.mark.parametrize("name, kwargs, match", [
    ("tent", {"bn_alpha": 0.5}, r"BatchNorm layer '1' keeps no running statistics, which bn_alpha < 1 mixes in"),
    ("ttaug", {}, r"BatchNorm layer '1' keeps no running statistics, which bn_alpha < 1 mixes in"),
    ("norm_ema", {}, r"BatchNorm layer '1' keeps no running statistics to average.*method 'norm'"),
])
def test_batchnorm_without_running_statistics_is_refused_before_anything_changes(name, kwargs, match):
    model = _small_bn_net(track_running_stats=False)
    with pytest.raises(ValueError, match=match):
        tta.wrap(model, name, **kwargs)
    assert type(model[1]) is nn.BatchNorm2d  # no layer was swapped before the refusal


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_on_a_float16_model_is_refused_with_the_fix(optimizer):
    """Adam's eps (1e-8) is 0 in float16: its steps divided by zero and the logits
    turned to NaN after two batches. SGD steps stay finite."""
    half = tta.load_model("cifar10_resnet20").half()
    with pytest.raises(ValueError, match=r"float16 parameters: Adam's eps .*amp='bf16'"):
        tta.wrap(half, "tent", optimizer=optimizer)
    wrapped = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", optimizer=optimizer)
    with pytest.raises(ValueError, match=r"float16 parameters: Adam's eps .*amp='bf16'"):
        wrapped.half()  # halved after the wrap: refused as well, before anything moved
    assert all(p.dtype == torch.float32 for p in wrapped.parameters())
    method = tta.wrap(tta.load_model("cifar10_resnet20").half(), "tent", optimizer="sgd", lr=1e-3)
    x = torch.rand(8, 3, 32, 32)
    for _ in range(3):
        assert torch.isfinite(method(x)).all()


@pytest.mark.parametrize("name,option", [("eta", "e_margin"), ("eata", "e_margin"), ("rdumb", "e_margin"),
                                         ("deyo", "margin_e0")])
@pytest.mark.parametrize("value", [float("inf"), 100.0])
def test_a_margin_whose_sample_weights_overflow_is_refused(resnet20, name, option, value):
    # exp(margin - entropy) was inf: the loss, then every weight and output, NaN
    with pytest.raises(ValueError, match=rf"{option}=.*overflows.*ln\(num_classes\)"):
        tta.wrap(resnet20, name, **{option: value}, **({"fisher_alpha": 0} if name == "eata" else {}))
    assert all(p.requires_grad for p in resnet20.parameters())  # refused before configuring the model
    tta.wrap(resnet20, name, **{option: 2 * math.log(10)}, **({"fisher_alpha": 0} if name == "eata" else {}))


@pytest.mark.parametrize("name", ["sar", "deyo"])
def test_a_paper_lr_fixed_on_the_first_batch_survives_a_checkpoint(resnet20, noisy_batch, name):
    """lr="paper" is resolved on the first batch's size; a stream resumed from a
    state saved after it keeps that lr, even when it resumes on a batch of another
    size (it was resolved again there: the resumed run drifted from the straight one)."""
    first, second = noisy_batch[:16], noisy_batch[16:24]
    straight = tta.wrap(copy.deepcopy(resnet20), name)
    straight(first)
    lr = straight.optimizer.param_groups[0]["lr"]
    assert lr == straight.paper_lr(16) != straight.paper_lr(8)
    state = copy.deepcopy(straight.state_dict())
    resumed = tta.wrap(copy.deepcopy(resnet20), name)
    resumed.load_state_dict(state)
    torch.manual_seed(0)
    expected = straight(second)
    torch.manual_seed(0)
    assert torch.equal(resumed(second), expected)
    assert resumed.optimizer.param_groups[0]["lr"] == resumed.lr == lr
    resumed.reset()  # the source weights, the lr of this stream
    assert resumed.optimizer.param_groups[0]["lr"] == lr
    straight.reset()
    torch.manual_seed(0)
    expected = straight(second)
    torch.manual_seed(0)
    assert torch.equal(resumed(second), expected)


@pytest.mark.parametrize("name", ["tent", "norm_ema", "rotta", "memo"])
def test_a_wrapped_model_pickles_whole(name, monkeypatch):
    """``torch.save(adapted)`` (and pickling for a subprocess) of the whole wrapped
    model: the BatchNorm classes tta swaps in are made at run time, so pickle could
    not find them by name. Loaded in a fresh process (no swapped class made yet),
    timm's norm-act layers keep their activation."""
    import io

    from timm.layers import BatchNormAct2d

    from tta.methods import norm_layers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    kw = {"memory_size": 8, "update_frequency": 8} if name == "rotta" else {"num_views": 2} if name == "memo" else {}
    method = tta.wrap(net, name, **kw)
    x = torch.rand(8, 3, 12, 12)
    method(x)
    buffer = io.BytesIO()
    torch.save(method, buffer)
    monkeypatch.setattr(norm_layers, "_SWAPPED", {})  # as in a fresh process
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.model[1]).__name__ == type(method.model[1]).__name__
    torch.manual_seed(1)
    expected = method(x)
    torch.manual_seed(1)
    assert torch.equal(loaded(x), expected)


def test_a_wrapped_method_changes_dtype_whole():
    """``adapted.double()`` (or ``.to(device)``) after some batches: Adam's moments,
    the collapse guard's reference model and the snapshot's source values follow the
    parameters (the next step mixed float and double)."""
    torch.manual_seed(0)
    source = _small_bn_net()
    method = tta.wrap(copy.deepcopy(source), "tent", collapse_guard=True)
    x = torch.rand(8, 3, 12, 12)
    method(x)
    method.double()
    for _ in range(2):
        assert torch.isfinite(method(x.double())).all()
    assert all(v.dtype == torch.float64 for s in method.optimizer.state.values() for k, v in s.items() if k != "step")
    assert all(p.dtype == torch.float64 for p in method.source_params())
    method.reset()
    for (name, p), expected in zip(method.model.named_parameters(), source.double().parameters()):
        assert p.dtype == torch.float64 and torch.equal(p, expected), name


def test_eatas_fisher_follows_the_method_to_another_dtype():
    """EATA's Fisher and anchors are plain tensors: ``.to(device)`` / ``.double()``
    of the method left them behind (a CUDA model's penalty then mixed devices), and
    a reset brought back the snapshot's."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 12, 12)
    method = tta.wrap(_small_bn_net(), "eata", fisher_loader=[x], fisher_size=8, d_margin=1.0)
    method(x)
    method.double()
    for _ in range(2):
        assert all(t.dtype == torch.float64 for t in method.fisher + method.anchors)
        method(x.double())
        method.reset()


@pytest.mark.parametrize("option, value, error, match", [
    ("momentum", "0.9", ValueError, "momentum must be a number >= 0, got '0.9'"),
    ("weight_decay", "1e-4", ValueError, "weight_decay must be a number >= 0, got '1e-4'"),
    ("betas", "0.9", ValueError, r"betas must be two numbers in \[0, 1\)"),
    ("optimizer", torch.optim.SGD, TypeError, r"optimizer must be 'sgd', 'adam' or 'adamw' \(its name"),
    ("optimizer", None, TypeError, "optimizer must be 'sgd', 'adam' or 'adamw'.*got None"),
])
def test_optimizer_options_of_the_wrong_type_are_named(option, value, error, match):
    """Strings from a config and optimizer classes failed inside a comparison or a
    .lower() ("'<' not supported between instances of 'str' and 'int'"), naming no
    option."""
    with pytest.raises(error, match=match):
        tta.wrap(_small_bn_net(), "tent", **{option: value})


@pytest.mark.parametrize("option", ["episodic", "nesterov", "check_inputs", "channels_last"])
def test_switches_given_as_strings_are_refused(option):
    """A string from a config is truthy: episodic="False" reset before every batch,
    silently."""
    with pytest.raises(TypeError, match=f"{option} must be True or False, got 'False'"):
        tta.wrap(_small_bn_net(), "tent", **{option: "False"})


def test_numbers_given_as_booleans_and_bad_guard_settings_are_refused():
    # True is an int to Python: lr=True, steps=True ran as 1 (a typo for a switch)
    for option in ("lr", "steps", "reset_every"):
        with pytest.raises(ValueError, match=rf"{option} must be a positive .*got True"):
            tta.wrap(_small_bn_net(), "tent", **{option: True})
    with pytest.raises(TypeError, match=r"collapse_guard: unknown settings 'windo'; it takes .*window"):
        tta.wrap(_small_bn_net(), "tent", collapse_guard={"windo": 5})
    with pytest.raises(TypeError, match=r"pattern must be a str such as '\*'.*got None"):
        tta.list_methods(None)


class _DictOutput(nn.Module):
    """A Hugging Face style model: its logits in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _small_bn_net()

    def forward(self, x):
        return {"logits": self.net(x)}


@pytest.mark.parametrize("name", ["tent", "norm", "source", "sar"])
def test_a_model_returning_a_dict_is_named_with_the_fix(name):
    """It failed deep in the method ("'dict' object has no attribute 'float'"); the
    check lives for the step only, so the model itself still runs as it did."""
    model = _DictOutput()
    method = tta.wrap(model, name)
    with pytest.raises(TypeError, match=r"_DictOutput returned a dict \(keys 'logits'\): wrap it in a module"):
        method(torch.rand(4, 3, 12, 12))
    assert not model._forward_hooks and model(torch.rand(4, 3, 12, 12))["logits"].shape == (4, 10)


def test_counts_given_as_booleans_are_refused_by_every_method_and_view_helper(resnet20):
    """True is an int to Python: RoTTA's memory_size=True, LAME's knn=True, TTRV's
    steps=True ran (as 1) where a switch was meant (TPT, RLCF: test_clip; FOA: test_foa)."""
    from tta.augment.destroy import patch_shuffle
    from tta.augment.views import augmented_copies, make_views

    cases = [("rotta", resnet20, "memory_size"), ("rotta", resnet20, "update_frequency"),
             ("lame", resnet20, "knn"), ("lame", resnet20, "max_steps"),
             ("ttrv", resnet20, "steps"), ("ttrv", resnet20, "inner_steps"),
             ("ttrv", resnet20, "num_samples")]
    for name, model, option in cases:
        with pytest.raises(ValueError, match=rf"{option}.* got (16 and )?True"):
            tta.wrap(copy.deepcopy(model), name, **{option: True})
    x = torch.rand(2, 3, 16, 16)
    for helper, option in ((patch_shuffle, "patch_len"), (augmented_copies, "num_copies"), (make_views, "num_views")):
        with pytest.raises(ValueError, match=rf"{option} must be a positive integer, got True"):
            helper(x, **{option: True})


def test_a_model_returning_a_dict_is_named_in_the_passes_made_when_wrapping():
    """EATA's Fisher pass and RMT's warm-up run the model at wrap time: they failed
    deep in a loss too."""
    source = [(torch.rand(10, 3, 12, 12), torch.arange(10))]
    match = r"_DictOutput returned a dict \(keys 'logits'\): wrap it in a module"
    with pytest.raises(TypeError, match=match):
        tta.wrap(_DictOutput(), "eata", fisher_loader=source, fisher_size=10)
    model = _DictOutputWithFeatures()
    with pytest.raises(TypeError, match=match.replace("_DictOutput", "_DictOutputWithFeatures")):
        tta.wrap(model, "rmt", source_loader=source, num_prototype_images=10, num_warmup_images=10)
    assert not model._forward_hooks


class _DictOutputWithFeatures(_DictOutput):
    """timm's feature interface (RMT's prototypes need it), a dict from forward."""

    def forward_features(self, x):
        return self.net[:-1](x)

    def get_classifier(self):
        return self.net[-1]
