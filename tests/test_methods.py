"""Per-method behaviour on the real shared ResNet-20 and real noisy CIFAR-10 images."""

import copy

import pytest
import torch

import tta
from tta.methods.entropy import softmax_entropy
from tta.methods.norm_layers import sample_weighted_batch_stats
from tta.methods.optim import gated_step
from tta.methods.params import last_stage_prefixes, paper_frozen_modules, select_norm_params

GRADIENT_METHODS = ["tent", "eta", "eata", "sar", "deyo"]
#: the methods that run on any image classifier (not only CLIP or ViTs)
IMAGE_METHODS = [n for n in tta.list_methods() if getattr(tta.methods.method_class(n), "requires", None) is None]


def make(name, model, train_images=None, **kw):
    if name == "eata" and "fisher_loader" not in kw:
        x = train_images[0][:128] if train_images is not None else torch.rand(64, 3, 32, 32)
        kw.update(fisher_loader=[x[:64], x[64:]], fisher_size=128)
    return tta.wrap(model, name, **kw)


def small_options(name, images):
    """Options that build method ``name`` on ResNet-20 cheaply: its source images
    from ``images`` (32 or more) where it needs them, few views."""
    kw = {"fisher_alpha": 0.0} if name == "eata" else {}
    if name in ("rmt", "santa"):  # they learn from labelled source images
        kw["source_loader"] = [(images[:32], torch.arange(32) % 10)]
        kw.update(num_warmup_images=32) if name == "rmt" else None
    if name == "cotta":
        kw["num_views"] = 2
    return kw


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def same(a, b):
    """Bit-exact equality where NaN equals NaN (unset running averages are NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def changed_keys(before, after):
    return {k for k in before if not same(before[k], after[k])}


def expected_params(model, name):
    # SAR and DeYO follow the official rule (freeze `layer4`): a 3-stage CIFAR ResNet
    # adapts every norm layer, like the other methods.
    assert paper_frozen_modules(model) == []
    return {n for n, _ in select_norm_params(model)}


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_only_intended_parameters_change(name, resnet20, noisy_batch, cifar_train_images):
    before = state(resnet20)
    expected = expected_params(resnet20, name)
    adapted = make(name, resnet20, cifar_train_images, lr=1e-3)
    for _ in range(3):
        adapted(noisy_batch)
    changed = changed_keys(before, state(resnet20))
    assert changed, f"{name} changed nothing"
    assert changed <= expected, changed - expected
    # running statistics are never touched
    assert not any("running" in k for k in changed)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_loss_goes_down_on_a_fixed_batch(name, resnet20, noisy_batch, cifar_train_images):
    torch.manual_seed(0)
    kw = dict(optimizer="sgd", lr=5e-3, momentum=0.9)
    if name in ("eta", "eata"):
        kw["d_margin"] = 1.0  # a fixed batch is redundant with itself by design
    adapted = make(name, resnet20, cifar_train_images, **kw)
    losses = []
    for _ in range(8):
        adapted(noisy_batch)
        losses.append(adapted.last_record.to_dict()["loss"])
    assert losses[-1] < losses[0], losses
    with torch.no_grad():
        mean_entropy = softmax_entropy(resnet20(noisy_batch)).mean()
        # the starting point: the same model with test statistics, before any update
        start = tta.wrap(tta.load_model("cifar10_resnet20"), "norm")(noisy_batch)
    assert mean_entropy < softmax_entropy(start).mean()


@pytest.mark.parametrize("name", GRADIENT_METHODS + ["norm"])
def test_reset_is_bit_exact(name, resnet20, noisy_batch, cifar_train_images):
    adapted = make(name, resnet20, cifar_train_images, **({} if name == "norm" else {"lr": 1e-2}))
    source = state(adapted)
    torch.manual_seed(0)
    first = adapted(noisy_batch)
    for _ in range(3):
        adapted(noisy_batch)
    if adapted.optimizer is not None:
        assert adapted.optimizer.state  # there is optimizer state to reset
    adapted.reset()
    after = state(adapted)
    assert not changed_keys(source, after)
    if adapted.optimizer is not None:
        assert not adapted.optimizer.state
    # the same stream after reset gives the same predictions
    torch.manual_seed(0)
    again = adapted(noisy_batch)
    assert torch.equal(first.argmax(1), again.argmax(1))


def test_source_changes_nothing(resnet20, noisy_batch):
    reference = copy.deepcopy(resnet20).eval()
    before = state(resnet20)
    adapted = tta.wrap(resnet20, "source")
    out = adapted(noisy_batch)
    with torch.no_grad():
        assert torch.equal(out, reference(noisy_batch))
    assert not changed_keys(before, state(resnet20))
    assert adapted.optimizer is None


def test_norm_uses_batch_statistics_and_alpha_mixes(resnet20, noisy_batch):
    reference = copy.deepcopy(resnet20)
    out = tta.wrap(resnet20, "norm")(noisy_batch)
    reference.train()  # plain train-mode BN normalises with batch statistics
    with torch.no_grad():
        torch.testing.assert_close(out, reference(noisy_batch), rtol=1e-4, atol=1e-4)
    source = tta.load_model("cifar10_resnet20")
    with torch.no_grad():
        torch.testing.assert_close(tta.wrap(copy.deepcopy(source), "norm", alpha=0.0)(noisy_batch), source(noisy_batch), rtol=1e-4, atol=1e-4)
    half = tta.wrap(copy.deepcopy(source), "norm", alpha=0.5)(noisy_batch)
    assert not torch.allclose(half, out) and not torch.allclose(half, source(noisy_batch))
    with pytest.raises(ValueError, match="are one option"):
        tta.wrap(copy.deepcopy(source), "norm", alpha=0.5, bn_alpha=0.2)


def test_state_dict_resumes_a_stream(noisy_batch, cifar_test_images):
    x = cifar_test_images[0][:128]
    a = tta.wrap(tta.load_model("cifar10_resnet20"), "eta", lr=1e-2, d_margin=0.4)
    a(noisy_batch)
    a(x[:64])
    saved = copy.deepcopy(a.state_dict())
    b = tta.wrap(tta.load_model("cifar10_resnet20"), "eta", lr=1e-2, d_margin=0.4)
    b.load_state_dict(saved)
    for batch in (x[64:], noisy_batch):
        assert torch.equal(a(batch), b(batch))
    assert torch.equal(a.mean_probs, b.mean_probs)


@pytest.mark.parametrize("options", [dict(optimizer="sgd", momentum=0.9), dict(optimizer="adam")])
def test_a_loaded_state_shares_no_tensor_with_where_it_came_from(options, noisy_batch):
    # torch's Optimizer.load_state_dict keeps the given tensors (momentum buffers, Adam's
    # moments): a method loaded from another's state_dict() stepped the other's optimizer
    # state, and reset() to a mid-stream snapshot() stepped the snapshot, so a second
    # reset went back to somewhere else. nn.Module.load_state_dict copies; so does a method.
    x = noisy_batch[:16]
    a = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", lr=1e-2, **options)
    a(x)
    b = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", lr=1e-2, **options)
    b.load_state_dict(a.state_dict())
    loaded = copy.deepcopy(b.optimizer.state_dict()["state"])
    a(x)
    now = b.optimizer.state_dict()["state"]
    assert loaded and all(same(loaded[i][k], now[i][k])
                          for i in loaded for k in loaded[i] if torch.is_tensor(loaded[i][k]))

    a.snapshot()
    saved = copy.deepcopy(a.state_dict())
    for _ in range(2):
        a(x)
        a.reset()
        back = a.state_dict()
        assert not changed_keys(state_of(saved), state_of(back))
        opt_saved, opt_back = saved["_extra_state"]["optimizer"]["state"], back["_extra_state"]["optimizer"]["state"]
        assert all(same(opt_saved[i][k], opt_back[i][k]) for i in opt_saved for k in opt_saved[i]
                   if torch.is_tensor(opt_saved[i][k]))


def state_of(state_dict):
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def test_episodic_resets_before_each_batch(resnet20, noisy_batch):
    adapted = tta.wrap(resnet20, "tent", episodic=True, lr=1e-2)
    assert torch.equal(adapted(noisy_batch), adapted(noisy_batch))


def test_gated_step_skips_exactly():
    p = torch.nn.Parameter(torch.ones(3))
    for opt in (torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1), torch.optim.Adam([p], lr=0.1)):
        p.grad = torch.full((3,), 2.0)
        gated_step(opt, torch.tensor(False))
        assert torch.equal(p.detach(), torch.ones(3))
        assert all(torch.count_nonzero(v) == 0 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        gated_step(opt, torch.tensor(True))
        assert not torch.equal(p.detach(), torch.ones(3))
        with torch.no_grad():
            p.fill_(1.0)


def test_sample_weighted_stats_equal_a_subset_forward(resnet20, noisy_batch):
    tta.methods.norm_layers.use_batch_stats(resnet20)
    keep = torch.zeros(noisy_batch.shape[0], dtype=torch.bool)
    keep[::3] = True
    with torch.no_grad():
        with sample_weighted_batch_stats(resnet20, keep):
            full = resnet20(noisy_batch)
        subset = resnet20(noisy_batch[keep])
    torch.testing.assert_close(full[keep], subset, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sar", "deyo"])
def test_frozen_modules_follow_the_official_rule(name):
    vit = tta.load_model("timm:vit_tiny_patch16_224", pretrained=False)
    frozen = ["backbone.blocks.9", "backbone.blocks.10", "backbone.blocks.11", "backbone.norm"]
    assert [n for n in paper_frozen_modules(vit) if n.count(".") <= 2] == frozen
    assert last_stage_prefixes(vit) == frozen  # 12 blocks: the two rules agree
    r18 = tta.load_model("timm:resnet18", pretrained=False)
    assert last_stage_prefixes(r18) == ["backbone.layer4"]
    assert {n for n in paper_frozen_modules(r18) if n.count(".") == 1} == {"backbone.layer4"}
    adapted = tta.wrap(vit, name)
    names = {n for n, _ in adapted.adapted}
    assert names and not any(n.startswith(tuple(frozen)) for n in names)
    assert all("norm" in n for n in names)
    # 24 blocks: the official code freezes blocks 9-11 (its substrings), the
    # last-stage rule the last quarter
    deep = tta.load_model("timm:vit_tiny_patch16_224", pretrained=False, depth=24)
    paper = {n for n, _ in tta.wrap(copy.deepcopy(deep), name).adapted}
    assert not any(n.startswith(("backbone.blocks.9.", "backbone.blocks.11.")) for n in paper)
    assert any(n.startswith("backbone.blocks.23.") for n in paper)
    last = {n for n, _ in tta.wrap(deep, name, skip_modules="last_stage").adapted}
    assert any(n.startswith("backbone.blocks.9.") for n in last)
    assert not any(n.startswith(("backbone.blocks.18.", "backbone.blocks.23.")) for n in last)


def test_eata_fisher_regulariser(resnet20, noisy_batch, cifar_train_images):
    with pytest.raises(ValueError, match="fisher_loader"):
        tta.wrap(copy.deepcopy(resnet20), "eata")
    adapted = make("eata", resnet20, cifar_train_images, lr=1e-2, d_margin=0.4)
    assert len(adapted.fisher) == len(adapted.adapted)
    assert all((f >= 0).all() for f in adapted.fisher) and any(f.sum() > 0 for f in adapted.fisher)
    adapted(noisy_batch)
    # a strong regulariser keeps the weights closer to the source
    strong = make("eata", tta.load_model("cifar10_resnet20"), cifar_train_images, lr=1e-2, d_margin=0.4, fisher_alpha=5e3)
    strong(noisy_batch)
    strong(noisy_batch)
    adapted(noisy_batch)

    def drift(m):
        return sum(((p - a) ** 2).sum() for (_, p), a in zip(m.adapted, m.anchors))

    assert drift(strong) < drift(adapted)


def test_sar_recovers_from_collapse(resnet20, noisy_batch):
    # a reset threshold above any entropy forces the recovery path every step
    adapted = tta.wrap(resnet20, "sar", lr=1e-2, reset_constant=100.0)
    source = [p.detach().clone() for _, p in adapted.adapted]
    adapted(noisy_batch)
    assert adapted.num_resets.item() == 1
    assert all(torch.equal(p, s) for (_, p), s in zip(adapted.adapted, source))
    normal = tta.wrap(tta.load_model("cifar10_resnet20"), "sar", lr=1e-2)
    normal(noisy_batch)
    assert normal.num_resets.item() == 0 and not torch.isnan(normal.ema)


def test_sar_cifar10_preset_is_the_ports_sam_over_sgd():
    # mariodoebler/test-time-adaptation's SAR.setup_optimizer builds SAM(params,
    # torch.optim.SGD, lr=OPTIM.LR, momentum=OPTIM.MOMENTUM) whatever OPTIM.METHOD
    # says: cifar10_c/sar.yaml's "METHOD: Adam" is never read, so the CIFAR-10-C run
    # is SGD (momentum 0.9, no Nesterov) at lr 1e-3.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 10))
    sar = tta.wrap(model, "sar", preset="cifar10")
    assert type(sar.optimizer) is torch.optim.SGD
    group = sar.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-3, 0.9, False, 0.0)


def test_batch_size_one_with_batch_norm_is_refused(resnet20, noisy_batch):
    adapted = tta.wrap(resnet20, "tent")
    with pytest.raises(ValueError, match="batch size 1"):
        adapted(noisy_batch[:1])
    mixed = tta.wrap(tta.load_model("cifar10_resnet20"), "norm", alpha=0.1)
    assert mixed(noisy_batch[:1]).shape == (1, 10)
    assert tta.wrap(tta.load_model("cifar10_resnet20"), "source")(noisy_batch[:1]).shape == (1, 10)


BAD_INPUTS = {
    "nan": (lambda x: x.masked_fill(torch.rand_like(x) < 0.01, float("nan")), ValueError, "NaN"),
    "inf": (lambda x: x.masked_fill(torch.rand_like(x) < 0.01, float("inf")), ValueError, "inf"),
    "0-255 floats": (lambda x: x * 255, ValueError, "divide by 255"),
    "uint8": (lambda x: (x * 255).to(torch.uint8), TypeError, "uint8"),
    "grayscale": (lambda x: x[:, :1], ValueError, "grayscale"),
    "rgba": (lambda x: torch.cat([x, x[:, :1]], 1), ValueError, "RGBA"),
    "rank 3": (lambda x: x[0], ValueError, "shape"),
    "empty": (lambda x: x[:0], ValueError, "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_state_untouched(case, resnet20, noisy_batch):
    transform, error, message = BAD_INPUTS[case]
    adapted = tta.wrap(resnet20, "tent", lr=1e-2)
    adapted(noisy_batch)
    before = state(adapted)
    with pytest.raises(error, match=message):
        adapted(transform(noisy_batch.clone()))
    assert not changed_keys(before, state(adapted))


def test_non_logit_output_is_refused(noisy_batch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="logits"):
        tta.wrap(model, "norm")(noisy_batch)


def test_channels_last_gives_the_same_result(noisy_batch):
    torch.manual_seed(0)
    plain = tta.wrap(tta.load_model("cifar10_resnet20"), "tent")
    fast = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", channels_last=True)
    for _ in range(2):
        a, b = plain(noisy_batch), fast(noisy_batch)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["tent", "deyo", "sar"])
def test_bf16_autocast_adapts_like_float32(name, noisy_batch):
    torch.manual_seed(0)
    full = tta.wrap(tta.load_model("cifar10_resnet20"), name, lr=1e-2)
    half = tta.wrap(tta.load_model("cifar10_resnet20"), name, lr=1e-2, amp="bf16")
    for _ in range(2):
        a, b = full(noisy_batch), half(noisy_batch)
    assert b.dtype == torch.float32
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.85
    with pytest.raises(ValueError, match="CUDA"):
        tta.wrap(tta.load_model("cifar10_resnet20"), "tent", amp="fp16")(noisy_batch)
    with pytest.raises(ValueError, match="amp"):
        tta.wrap(tta.load_model("cifar10_resnet20"), "tent", amp="int8")


def test_compile_falls_back_to_eager_when_compilation_fails(noisy_batch, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    reference = tta.wrap(tta.load_model("cifar10_resnet20"), "tent")
    adapted = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", compile=True)
    assert adapted.compiled
    real_call = adapted.model._call_impl
    calls = []

    def failing_compiled_call(*args, **kwargs):
        # what a compiled module raises when its backend cannot build a graph
        calls.append(1)
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("no compiler here"), None)

    monkeypatch.setattr(adapted.model, "_compiled_call_impl", failing_compiled_call)
    with pytest.warns(UserWarning, match="running eagerly") as record:
        out = adapted(noisy_batch)
    assert record[0].filename == __file__
    assert calls and not adapted.compiled and adapted.model._compiled_call_impl is None
    torch.testing.assert_close(out, reference(noisy_batch))
    torch.testing.assert_close(adapted(noisy_batch), reference(noisy_batch))
    assert real_call is not None


@pytest.mark.parametrize("name", ["norm", "deyo"])
def test_channels_last_test_statistics_match(name, noisy_batch):
    torch.manual_seed(0)
    a = tta.wrap(tta.load_model("cifar10_resnet20"), name)(noisy_batch)
    torch.manual_seed(0)
    b = tta.wrap(tta.load_model("cifar10_resnet20"), name, channels_last=True)(noisy_batch)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["tent", "sar", "deyo", "eta"])
def test_gradient_methods_with_mixed_bn_statistics_adapt_at_batch_size_one(name, noisy_batch):
    adapted = tta.wrap(tta.load_model("cifar10_resnet20"), name, bn_alpha=0.1, lr=1e-2)
    before = [p.detach().clone() for _, p in adapted.adapted]
    for i in range(4):
        assert adapted(noisy_batch[i:i + 1]).shape == (1, 10)
    if name in ("tent",):
        assert any(not torch.equal(b, p) for b, (_, p) in zip(before, adapted.adapted))


def test_timm_norm_act_layers_keep_their_activation_under_every_batch_norm_swap():
    """timm's BatchNormAct2d normalises, then applies dropout and its activation; each
    of tta's BatchNorm variants replaces only the normalisation (EfficientNet-B0 has 49
    such layers: before the shared swap kept the activation, Tent, BN-adapt and
    BN-EMA ran it without any)."""
    from timm.layers import BatchNormAct2d

    from tta.methods.memo import use_memo_batch_norm
    from tta.methods.norm_ema import use_ema_stats
    from tta.methods.norm_layers import grouped_batch_stats, use_batch_stats

    torch.manual_seed(0)
    reference = BatchNormAct2d(4, act_layer=torch.nn.ReLU).eval()
    reference.running_mean.normal_()
    x = torch.randn(6, 4, 3, 3)
    for swap in (lambda m: use_batch_stats(m, alpha=0.0), use_ema_stats, lambda m: use_memo_batch_norm(m, 0.0)):
        layer = copy.deepcopy(reference)
        swap(layer)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference(x))
    layer = copy.deepcopy(reference)
    use_batch_stats(layer)
    with torch.no_grad(), grouped_batch_stats(layer, groups=2):
        out = layer(x)
    assert out.min() >= 0 and (out == 0).any()  # the ReLU ran, also on the grouped path


@pytest.mark.parametrize("shape", [(8, 4, 5, 7), (6, 3, 11), (16, 64, 8, 8)])
def test_cpu_batch_statistics_and_their_gradient_equal_native_batch_norm(shape):
    """The CPU path of test-statistics BatchNorm (its own moments, the native
    normalisation and backward) against native train-mode batch_norm: outputs and
    the gradients of input, weight and bias; shifted inputs (mean far from 0) too."""
    from tta.methods.norm_layers import _CPUTrainBatchNorm, channel_moments

    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 20).requires_grad_(True)
    c = shape[1]
    w, b = (torch.rand(c) + 0.5).requires_grad_(True), torch.randn(c).requires_grad_(True)
    upstream = torch.randn(shape)
    fast = _CPUTrainBatchNorm.apply(x, w, b, 1e-5)
    grads_fast = torch.autograd.grad((fast * upstream).sum(), (x, w, b))
    native = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    grads_native = torch.autograd.grad((native * upstream).sum(), (x, w, b))
    torch.testing.assert_close(fast, native, rtol=1e-5, atol=1e-5)
    for g_fast, g_native in zip(grads_fast, grads_native):
        torch.testing.assert_close(g_fast, g_native, rtol=1e-4, atol=1e-4)
    mean, var = channel_moments(x.detach())
    ref_var, ref_mean = torch.var_mean(x.detach().double(), dim=[0, *range(2, x.dim())], correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)
    # bf16 input: statistics in float32
    assert channel_moments(x.detach().bfloat16())[1].dtype == torch.float32


def test_a_cpu_step_keeps_freed_host_memory_unless_told_not_to(tmp_path):
    """The first CPU step sets glibc's malloc to reuse freed memory (tta/_host_memory.py);
    TTA_HOST_ALLOCATOR=default leaves it alone. In subprocesses: the setting is per process."""
    import os
    import platform
    import subprocess
    import sys

    script = ("import torch, tta, tta._host_memory as h\n"
              "m = tta.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),"
              " torch.nn.Flatten(), torch.nn.Linear(144, 10)), 'norm')\n"
              "assert h._applied is None\n"
              "m(torch.rand(2, 3, 8, 8))\n"
              "print(h._applied)\n")
    for env_value, expected in ((None, platform.libc_ver()[0] == "glibc"), ("default", False)):
        env = {k: v for k, v in os.environ.items() if k != "TTA_HOST_ALLOCATOR"}
        if env_value is not None:
            env["TTA_HOST_ALLOCATOR"] = env_value
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(expected), out.stderr
