"""RMT and SANTA: the source prototypes and the contrastive loss they share, RMT's
warm-up and replay, which parameters adapt, reset and checkpoints, other models."""

import copy
import math

import pytest
import torch
from torch import nn

import tta
import tta.methods.rmt  # noqa: F401  (registration)
import tta.methods.santa  # noqa: F401
from tta.methods.norm_layers import use_batch_stats
from tta.methods.params import select_norm_params
from tta.methods.prototypes import make_projector, nearest_prototype, prototype_contrastive_loss

torch.set_num_threads(1)

METHODS = ["rmt", "santa"]
#: a warm-up of two source batches of 16, so that tests stay fast
TINY = {"rmt": {"num_warmup_images": 32}, "santa": {}}


@pytest.fixture(scope="module")
def source(cifar_train_images):
    """Four labelled batches of 16 clean CIFAR-10 training images (every class
    occurs in the first two)."""
    x, y = cifar_train_images
    return [(x[i: i + 16], y[i: i + 16]) for i in range(0, 64, 16)]


@pytest.fixture
def batch(noisy_batch):
    return noisy_batch[:16]


def make(name, model, source, **kw):
    if name == "santa":
        kw.pop("num_warmup_images", None)  # SANTA has no warm-up
    return tta.wrap(model, name, source_loader=source, **{**TINY[name], **kw})


def tensors(obj, prefix=""):
    """Every tensor of a nested state (the optimizer's included), by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}" if prefix else key).items()}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


class CountingLoader:
    """A re-iterable list of batches that counts the batches handed out."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


# -- the shared pieces --------------------------------------------------------------


def supcon_by_the_definition(z, batch_size, temperature):
    """SupCon, mode 'all', no labels, with a loop over the anchors: the positives of
    row a are the rows of the same image, the denominator all rows but a."""
    n = z.shape[0]
    sim = z @ z.T / temperature
    losses = []
    for a in range(n):
        others = [k for k in range(n) if k != a]
        log_denominator = torch.logsumexp(sim[a, others], 0)
        positives = [k for k in others if k % batch_size == a % batch_size]
        losses.append(-sum(sim[a, p] - log_denominator for p in positives) / len(positives))
    return torch.stack(losses).mean()


def test_contrastive_loss_is_supcon_over_prototype_feature_and_augmented_views():
    torch.manual_seed(0)
    prototypes = torch.randn(5, 12, dtype=torch.float64)
    features = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    aug = (features + 0.1 * torch.randn(6, 12, dtype=torch.float64)).detach().requires_grad_()
    head = make_projector(12, 8).double()
    loss = prototype_contrastive_loss(head, prototypes, features, aug, temperature=0.1)

    cosine = torch.stack([torch.cosine_similarity(f[None], prototypes, dim=1) for f in features.detach()])
    nearest = cosine.argmax(1)
    assert torch.equal(nearest_prototype(features, prototypes), nearest)
    z = nn.functional.normalize(head(torch.cat([prototypes[nearest], features, aug])), dim=1)
    expected = supcon_by_the_definition(z, 6, 0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()  # into the features, both views, and the projector
    assert features.grad.abs().sum() > 0 and aug.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_prototypes_are_class_means_of_features_on_source_batch_statistics(resnet20, source):
    reference = copy.deepcopy(resnet20)
    use_batch_stats(reference)
    method = make("santa", resnet20, source, num_prototype_images=20)  # reads 2 batches: 32 > 20
    with torch.no_grad():
        feats = torch.cat([reference.forward_features(x) for x, _ in source[:2]])
    labels = torch.cat([y for _, y in source[:2]])
    expected = torch.stack([feats[labels == c].mean(0) for c in range(10)])
    torch.testing.assert_close(method.prototypes, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # not the source-statistics features
        source_stats = tta.load_model("cifar10_resnet20").forward_features(source[0][0])
    assert not torch.allclose(source_stats, feats[:16], rtol=1e-2, atol=1e-2)


def test_a_class_without_source_images_is_refused(resnet20, source):
    x, y = source[0]
    with pytest.raises(ValueError, match=r"no image of class\(es\) \[9\]"):
        tta.wrap(resnet20, "santa", source_loader=[(x, y.clamp(max=8))])
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        tta.wrap(tta.load_model("cifar10_resnet20"), "santa", source_loader=[(x, y + 5)])


@pytest.mark.parametrize("name", METHODS)
def test_without_source_data_it_says_what_to_set_and_leaves_the_model_alone(name, resnet20, source):
    with pytest.raises(ValueError, match=r"labelled source images.*data\.source_root.*source_loader="):
        tta.wrap(resnet20, name)
    assert all(p.requires_grad for p in resnet20.parameters())  # untouched
    make(name, resnet20, source)  # and still wrappable


@pytest.mark.parametrize("name", METHODS)
def test_a_model_without_the_feature_split_is_refused_by_what_it_lacks(name, source):
    plain = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # no linear classifier
    with pytest.raises(TypeError, match="lacks forward_features and get_classifier"):
        tta.wrap(plain, name, source_loader=source)
    plain.forward_features = lambda x: x
    with pytest.raises(TypeError, match=r"lacks get_classifier\."):
        tta.wrap(plain, name, source_loader=source)


# -- what adapts ---------------------------------------------------------------------


def test_rmt_adapts_every_weight_and_keeps_a_mean_teacher(resnet20, source, batch):
    before = tensors(resnet20.state_dict())
    method = make("rmt", resnet20, source, lr=1e-3)
    teacher = tensors(method.teacher.state_dict())
    projector = tensors(method.projector.state_dict())
    for _ in range(2):
        method(batch)
    moved = changed(before, tensors(resnet20.state_dict()))
    params = {n for n, _ in resnet20.named_parameters()}
    assert moved <= params and not any("running" in k for k in moved)
    assert {"linear.weight", "layer1.0.conv1.weight", "bn1.weight"} <= {k.removeprefix("backbone.") for k in moved}
    assert changed(teacher, tensors(method.teacher.state_dict()))
    assert changed(projector, tensors(method.projector.state_dict())) == set(projector)
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_santa_adapts_the_norm_affines_only_and_never_the_anchor(resnet20, source, batch):
    before = tensors(resnet20.state_dict())
    norm = {n for n, _ in select_norm_params(resnet20)}
    method = make("santa", resnet20, source)
    anchor = tensors(method.anchor.state_dict())
    projector = tensors(method.projector.state_dict())
    for _ in range(2):
        method(batch)
    moved = changed(before, tensors(resnet20.state_dict()))
    assert moved and moved <= norm
    assert not changed(anchor, tensors(method.anchor.state_dict()))
    assert changed(projector, tensors(method.projector.state_dict())) == set(projector)


def test_predictions_rmt_sums_student_and_teacher_santa_is_the_student(resnet20, source, batch):
    rmt = make("rmt", resnet20, source)
    student, teacher = copy.deepcopy(rmt.model), copy.deepcopy(rmt.teacher)
    torch.testing.assert_close(rmt(batch), student(batch) + teacher(batch), rtol=1e-4, atol=1e-4)
    santa = make("santa", tta.load_model("cifar10_resnet20"), source)
    student = copy.deepcopy(santa.model)
    torch.testing.assert_close(santa(batch), student(batch), rtol=1e-4, atol=1e-4)


# -- RMT's warm-up and replay ----------------------------------------------------------


def test_rmt_warms_up_on_source_batches_then_replays_one_per_step(resnet20, source, batch):
    loader = CountingLoader(source)
    method = tta.wrap(resnet20, "rmt", source_loader=loader, num_warmup_images=40)  # 40 // 16 = 2 steps
    # one pass for the prototypes (4 batches), then 2 warm-up batches
    assert loader.drawn == 4 + 2
    steps = {int(s["step"]) for s in method.optimizer.state_dict()["state"].values()}
    assert steps == {2}  # the model's parameters; the projector took no warm-up step
    assert len(method.optimizer.state) == len(list(resnet20.parameters()))
    assert [g["lr"] for g in method.optimizer.param_groups] == [1e-3, 1e-3]
    method(batch)
    method(batch)
    assert loader.drawn == 8


def test_rmt_source_free_variant_replays_nothing_and_no_warm_up_leaves_the_source(resnet20, source, batch):
    source_weights = tensors(resnet20.state_dict())
    loader = CountingLoader(source)
    method = tta.wrap(resnet20, "rmt", source_loader=loader, lambda_ce_src=0.0, num_warmup_images=8)
    assert not changed(source_weights, tensors(resnet20.state_dict()))  # 8 // 16 = 0 steps
    drawn = loader.drawn
    method(batch)
    assert loader.drawn == drawn and method.last_record.source_loss is None
    assert math.isfinite(method.last_record.to_dict()["contrastive_loss"])


# -- state -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_reset_returns_bit_exact_to_the_state_before_the_first_batch(name, resnet20, source, batch):
    method = make(name, resnet20, source)
    keys = set(method.state_dict())
    copy_name = "teacher" if name == "rmt" else "anchor"
    assert {"prototypes", f"{copy_name}.backbone.linear.weight", "projector.0.weight", "projector.2.bias"} <= keys
    start = tensors(method.state_dict())
    if name == "rmt":  # after the warm-up: Adam's moments are part of it
        assert any("exp_avg" in k for k in start)
    for _ in range(2):
        method(batch)
    assert changed(start, tensors(method.state_dict()))
    method.reset()
    assert not changed(start, tensors(method.state_dict()))


@pytest.mark.parametrize("name", METHODS)
def test_a_checkpoint_continues_identically(name, source, batch):
    one_batch = source[:1] * 2
    first = make(name, tta.load_model("cifar10_resnet20"), one_batch, num_warmup_images=16)
    for _ in range(2):
        first(batch)
    torch.manual_seed(3)
    second = make(name, tta.load_model("cifar10_resnet20"), one_batch, num_warmup_images=16)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    torch.manual_seed(7)
    a = first(batch)
    torch.manual_seed(7)
    b = second(batch)
    assert torch.equal(a, b)
    assert not changed(tensors(first.state_dict()), tensors(second.state_dict()))


def assert_same_steps(method, other, batch, steps):
    """``method`` and ``other`` predict alike for ``steps`` steps on ``batch``, each
    step's random draws (the augmentations) the same."""
    for _ in range(steps):
        torch.manual_seed(7)
        expected = method(batch)
        torch.manual_seed(7)
        assert torch.equal(expected, other(batch))


class PassCountingLoader:
    """Source batches in another order each pass, seeded by the pass count (as
    tta-bench's SourceBatches): a resumed stream must start the same passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.passes))
        self.passes += 1
        return iter([self.batches[i] for i in order.tolist()])


def test_rmt_resumes_its_replay_where_the_checkpoint_was(source, batch):
    # 2 warm-up batches, then one replayed per step: the checkpoint falls in the
    # second pass over the three source batches
    first = make("rmt", tta.load_model("cifar10_resnet20"), PassCountingLoader(source[:3]))
    for _ in range(3):
        first(batch)
    resumed = make("rmt", tta.load_model("cifar10_resnet20"), PassCountingLoader(source[:3]))
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert_same_steps(first, resumed, batch, 4)


@pytest.mark.parametrize("name", METHODS)
def test_out_of_range_options_name_the_method_and_the_option(name, source):
    with pytest.raises(ValueError, match=f"{name}: num_prototype_images must be a positive integer, got 0"):
        make(name, tta.load_model("cifar10_resnet20"), source, num_prototype_images=0)


def test_a_wrap_refused_during_the_warm_up_leaves_the_model_as_it_was(source, batch):
    class FailsAfterTwo:  # a read error (or Ctrl-C) after two warm-up steps
        def __iter__(self):
            yield from source[:2]
            raise RuntimeError("read error")

    model = tta.load_model("cifar10_resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="read error"):
        make("rmt", model, FailsAfterTwo(), num_warmup_images=64, num_prototype_images=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", METHODS)
def test_a_deepcopy_continues_identically(name, source, batch):
    method = make(name, tta.load_model("cifar10_resnet20"), source[:3], num_warmup_images=16)
    method(batch)
    assert_same_steps(method, copy.deepcopy(method), batch, 2)


@pytest.mark.parametrize("name", METHODS)
def test_a_step_adapts_under_no_grad_and_records_its_losses(name, resnet20, source, batch):
    method = make(name, resnet20, source)
    before = tensors(method.projector.state_dict())
    with torch.no_grad():
        out = method(batch)
    assert out.shape == (16, 10) and not out.requires_grad
    assert changed(before, tensors(method.projector.state_dict()))
    record = method.last_record.to_dict()
    assert list(record) == method.record_type.columns()
    assert all(math.isfinite(record[k]) for k in ("loss", "contrastive_loss"))


def test_presets_are_the_official_configs():
    for name in METHODS:
        assert tta.method_presets(name)["imagenet"] == {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                                                        "nesterov": True}
        defaults = tta.method_defaults(name, preset="cifar10")
        assert (defaults["optimizer"], defaults["lr"], defaults["temperature"]) == ("adam", 1e-3, 0.1)
    rmt = tta.method_defaults("rmt")
    assert (rmt["teacher_momentum"], rmt["num_warmup_images"], rmt["lambda_ce_src"]) == (0.999, 50000, 1.0)


# -- other models --------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["zoo:resnet26_gn", "zoo:vit_tiny_ln"])
@pytest.mark.parametrize("name", METHODS)
def test_groupnorm_and_layernorm_zoo_models_run(name, model_name, source, batch):
    model = tta.load_model(model_name)
    norm = {n for n, _ in select_norm_params(model)}
    before = tensors(model.state_dict())
    method = make(name, model, source[:2])
    out = method(batch[:8])
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    moved = changed(before, tensors(model.state_dict()))
    assert moved and (name == "rmt" or moved <= norm)


def test_a_timm_backbone_runs(source, batch):
    model = tta.load_model("timm:resnet18", pretrained=False, num_classes=10)
    for name in METHODS:
        method = make(name, copy.deepcopy(model), source[:2], num_warmup_images=16)
        assert method.prototypes.shape == (10, 512) and method(batch[:8]).shape == (8, 10)
