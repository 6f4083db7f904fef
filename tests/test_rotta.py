"""RoTTA: the memory bank's add/evict rule, Robust BatchNorm, the step, state."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tta
import tta.methods.rotta  # noqa: F401  (registers "rotta")
from tta.methods.params import select_norm_params
from tta.methods.rotta import cstu_add_, robust_bn_update, use_robust_bn

torch.set_num_threads(1)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def changed_keys(before, after):
    return {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}


def empty_bank(n):
    return (torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n, dtype=torch.long),
            torch.zeros(n, dtype=torch.bool))


def offer(bank, label, u, num_classes, **kw):
    return int(cstu_add_(*bank, torch.tensor(label), torch.tensor(u), num_classes=num_classes, **kw))


def contents(bank):
    labels, unc, age, valid = bank
    return sorted((int(c), round(float(x), 6), int(a)) for c, x, a, v in zip(labels, unc, age, valid) if v)


class ReferenceCSTU:
    """The official list-based rule (BIT-DA/RoTTA core/utils/memory.py), restated."""

    def __init__(self, capacity, num_class, lambda_t=1.0, lambda_u=1.0):
        self.n, self.c, self.lt, self.lu = capacity, num_class, lambda_t, lambda_u
        self.data = [[] for _ in range(num_class)]  # [uncertainty, age] per item

    def score(self, age, u):
        return self.lt / (1 + math.exp(-age / self.n)) + self.lu * u / math.log(self.c)

    def add(self, label, u):
        total = sum(map(len, self.data))
        if len(self.data[label]) < self.n / self.c:
            if total < self.n:
                ok = True
            else:
                top = max(map(len, self.data))
                ok = self.evict([k for k in range(self.c) if len(self.data[k]) == top], self.score(0, u))
        else:
            ok = self.evict([label], self.score(0, u))
        if ok:
            self.data[label].append([u, 0])
        for items in self.data:
            for item in items:
                item[1] += 1
        return ok

    def evict(self, classes, new_score):
        best = None
        for k in classes:
            for i, (u, age) in enumerate(self.data[k]):
                s = self.score(age, u)
                if best is None or s >= best[0]:
                    best = (s, k, i)
        if best is None:
            return True
        if best[0] > new_score:
            self.data[best[1]].pop(best[2])
            return True
        return False

    def contents(self):
        return sorted((k, round(u, 6), age) for k, items in enumerate(self.data) for u, age in items)


def test_memory_bank_hand_worked_example():
    # N = 4, C = 3: share 4/3, so a class under its share holds 0 or 1 images.
    # Priorities H = sigmoid(age / 4) + U / ln 3 (lambda_t = lambda_u = 1).
    bank = empty_bank(4)
    taken = [offer(bank, c, u, 3) < 4 for c, u in [
        (0, 0.2),   # A: free space
        (0, 0.4),   # B: class 0 holds 1 < 4/3: free space
        (1, 0.6),   # C
        (1, 0.1),   # D: the bank is full, ages A4 B3 C2 D1
        (2, 0.0),   # class 2 under its share, bank full: evict the top of the majority classes 0 and 1:
                    # H(A)=.731+.182=.913, H(B)=.679+.364=1.043, H(C)=.622+.546=1.169, H(D)=.562+.091=.653;
                    # C (1.169) > the newcomer's .5 -> C out, E in; ages A5 B4 D2 E1
        (0, 0.9),   # class 0 at its share: only its own: H(A)=.777+.182=.959, H(B)=.731+.364=1.095 <
                    # the newcomer's .5 + .819 = 1.319 -> rejected; ages A6 B5 D3 E2
        (1, 0.05),  # class 1 under its share, full, counts (2, 1, 1): majority class 0 only:
                    # H(A)=.818+.182=1.000, H(B)=.777+.364=1.141 > .5 + .046 -> B out, F in
    ]]
    assert taken == [True, True, True, True, True, False, True]
    # every stored image aged once per offer after its own (rejected ones included)
    assert contents(bank) == [(0, 0.2, 7), (1, 0.05, 1), (1, 0.1, 4), (2, 0.0, 3)]


def test_memory_bank_ties_go_to_the_last_item_in_the_official_scan_order():
    # lambda_t = 0: equal uncertainties give equal priorities.
    bank = empty_bank(2)  # C = 3: every class under its share while it holds none
    offer(bank, 0, 0.5, 3, lambda_t=0.0)
    offer(bank, 1, 0.5, 3, lambda_t=0.0)
    offer(bank, 2, 0.1, 3, lambda_t=0.0)  # majority classes 0 and 1 tie: the higher class goes
    assert [c for c, _, _ in contents(bank)] == [0, 2]
    bank = empty_bank(4)  # C = 2, share 2
    offer(bank, 0, 0.5, 2, lambda_t=0.0)  # older
    offer(bank, 0, 0.5, 2, lambda_t=0.0)  # younger
    offer(bank, 0, 0.1, 2, lambda_t=0.0)  # class 0 at its share: the tie goes to the younger
    assert contents(bank) == [(0, 0.1, 1), (0, 0.5, 3)]
    assert offer(bank, 0, 0.5, 2, lambda_t=0.0) == 4  # equal priority is not enough: rejected


@pytest.mark.parametrize("num_classes, capacity", [(3, 8), (10, 16), (10, 64), (100, 16)])
def test_memory_bank_matches_the_official_rule(num_classes, capacity):
    g = torch.Generator().manual_seed(num_classes + capacity)
    # skewed labels (as under label shift) make every branch of the rule happen
    labels = torch.multinomial(torch.rand(num_classes, generator=g) ** 3, 400, True, generator=g)
    unc = torch.rand(400, generator=g) * math.log(num_classes)
    ref, bank = ReferenceCSTU(capacity, num_classes), empty_bank(capacity)
    for c, u in zip(labels.tolist(), unc.tolist()):
        u = float(torch.tensor(u, dtype=torch.float32))
        assert ref.add(c, u) == (offer(bank, c, u, num_classes) < capacity)
        assert contents(bank) == ref.contents()


def test_robust_bn_mixes_stores_and_predicts_with_the_global_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-1, 1)
    reference = copy.deepcopy(bn)
    use_robust_bn(bn, alpha=0.05)
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    # prediction: eval-mode BatchNorm on the stored statistics, which do not move
    torch.testing.assert_close(bn(x), reference(x))
    assert torch.equal(bn.running_mean, reference.running_mean)
    # training pass: 0.95 stored + 0.05 batch (biased variance), kept as the new global
    var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    mean = 0.95 * reference.running_mean + 0.05 * mean_b
    var = 0.95 * reference.running_var + 0.05 * var_b
    x.requires_grad_(True)
    with robust_bn_update(bn):
        out = bn(x)
    expected = F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    # the gradient flows through the batch part of the statistics
    out.sum().backward()
    assert x.grad.abs().max() > 0 and bn.weight.grad is not None
    no_stats_grad = torch.autograd.grad(expected.sum(), x)[0]
    assert not torch.allclose(x.grad, no_stats_grad)
    # weighted: statistics of the selected images only, as a forward on the subset
    a, b = copy.deepcopy(bn), copy.deepcopy(bn)
    keep = torch.tensor([1.0, 0, 1, 1, 0, 1])
    with robust_bn_update(a, weight=keep), robust_bn_update(b), torch.no_grad():
        full = a(x)
        subset = b(x[keep.bool()])
    torch.testing.assert_close(full[keep.bool()], subset)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert bn.num_batches_tracked == 0 and list(bn.state_dict()) == list(reference.state_dict())


def make(model=None, **kw):
    return tta.wrap(model if model is not None else tta.load_model("cifar10_resnet20"), "rotta", **kw)


def test_only_the_norm_affines_and_the_global_statistics_change(resnet20, noisy_batch):
    before = state(resnet20)
    method = make(resnet20)
    names = {n for n, _ in method.adapted}
    assert names == {n for n, _ in select_norm_params(resnet20)}
    for _ in range(2):
        method(noisy_batch)
    assert method.last_record.to_dict()["num_updates"] == 1
    changed = changed_keys(before, state(resnet20))
    stats = {k for k in before if k.endswith(("running_mean", "running_var"))}
    assert changed & names and changed & stats and changed <= names | stats
    teacher = {k for k, v in state(method).items() if k.startswith("teacher.")}
    assert changed_keys({k: before[k[len("teacher."):]] for k in teacher}, state(method)) & teacher


def test_updates_follow_the_global_count_and_the_teacher_predicts_first(noisy_batch):
    torch.manual_seed(0)
    method = make(update_frequency=40)
    counts = []
    for batch in (noisy_batch[:24], noisy_batch[24:], noisy_batch):  # 24, 40, 64 images
        teacher = copy.deepcopy(method.teacher)
        logits = method(batch)
        with torch.no_grad():
            assert torch.equal(logits, teacher(batch))  # stored statistics, before this batch's updates
        counts.append(method.last_record.to_dict()["num_updates"])
    assert counts == [0, 1, 2] and int(method.num_seen) == 128  # updates at images 40, 80, 120


def test_an_update_mid_batch_sees_the_images_up_to_its_count(noisy_batch):
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, images):
            seen.append(images[method.mem_valid].clone())
            return images

    method = make(update_frequency=20, transform=Spy())
    x = noisy_batch[:50]
    method(x)
    assert len(seen) == 2  # after images 20 and 40 of the batch
    first, second = ([(img == x).flatten(1).all(1).nonzero().item() for img in stored] for stored in seen)
    assert max(first) < 20 and max(second) < 40 and max(second) >= 20


def test_a_failing_step_leaves_the_state_as_it_was(noisy_batch):
    class Failing(torch.nn.Module):
        def forward(self, images):
            raise RuntimeError("augmentation failed")

    method = make(update_frequency=32, transform=Failing())
    method(noisy_batch[:16])  # no update yet
    before = state(method)
    with pytest.raises(RuntimeError, match="augmentation failed"):
        method(noisy_batch[:32])  # the memory took images and the teacher moved its statistics
    assert not changed_keys(before, state(method)) and int(method.num_seen) == 16


def test_reset_is_bit_exact(noisy_batch):
    method = make()
    source = state(method)
    assert source["mem_images"].numel() == 0
    torch.manual_seed(0)
    first = method(noisy_batch)
    method(noisy_batch[:40])
    assert method.optimizer.state and int(method.num_seen) == 104
    method.reset()
    assert not changed_keys(source, state(method))
    assert not method.optimizer.state
    torch.manual_seed(0)
    assert torch.equal(method(noisy_batch), first)


def test_state_dict_holds_teacher_and_memory_and_resumes_a_stream(noisy_batch, cifar_test_images):
    x = cifar_test_images[0][:96]
    a = make()
    torch.manual_seed(1)
    a(noisy_batch)
    a(x[:40])
    saved = copy.deepcopy(a.state_dict())
    for key in ("mem_images", "mem_labels", "mem_uncertainty", "mem_age", "mem_valid", "num_seen"):
        assert key in saved
    assert saved["mem_images"].shape == (64, 3, 32, 32) and int(saved["num_seen"]) == 104
    assert any(k.startswith("teacher.") and k.endswith("running_mean") for k in saved)
    b = make()
    b.load_state_dict(saved)
    for i, batch in enumerate((x[40:], noisy_batch)):
        torch.manual_seed(10 + i)
        out_a = a(batch)
        torch.manual_seed(10 + i)
        assert torch.equal(out_a, b(batch))
    assert not changed_keys(state(a), state(b))


def test_adapts_under_no_grad_and_inference_mode(noisy_batch):
    for context in (torch.no_grad, torch.inference_mode):
        method = make(update_frequency=32)
        before = state(method)
        with context():
            method(noisy_batch[:32])
        changed = changed_keys(before, state(method))
        assert any(k.startswith("model.") and k.endswith(".weight") for k in changed)


@pytest.mark.parametrize("name", ["zoo:resnet26_gn", "zoo:vit_tiny_ln"])
def test_group_and_layer_norm_models_adapt_their_affines(name, noisy_batch):
    model = tta.load_model(name)
    method = make(model, memory_size=16, update_frequency=16)
    assert {n for n, _ in method.adapted} == {n for n, _ in select_norm_params(model)}
    before = state(method)
    with torch.no_grad():
        logits = method(noisy_batch[:16])
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    changed = changed_keys(before, state(method))
    assert {k for k in changed if k.startswith("model.")} <= {f"model.{n}" for n, _ in method.adapted}
    assert any(k.startswith("model.") for k in changed) and any(k.startswith("teacher.") for k in changed)


def test_timm_networks_run():
    model = tta.load_model("timm:resnet18", pretrained=False, num_classes=10)
    method = make(model, memory_size=8, update_frequency=8)
    logits = method(torch.rand(8, 3, 32, 32))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    assert method.last_record.to_dict()["num_updates"] == 1
    # timm's BatchNormAct layers keep their activation
    from timm.layers import BatchNormAct2d

    layer = BatchNormAct2d(4, act_layer=torch.nn.ReLU).eval()
    reference = copy.deepcopy(layer)
    use_robust_bn(layer, alpha=0.05)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), reference(x))
    with robust_bn_update(layer):
        assert layer(x).min() >= 0


def test_record_presets_and_refusals(noisy_batch):
    method = make()
    method(noisy_batch[:16])
    record = method.last_record.to_dict()
    assert record["num_updates"] == 0 and record["loss"] is None
    # the source model is unsure of noisy images and says mostly one class: some of the
    # images taken in replaced earlier ones of their class
    assert 1 <= record["memory_occupancy"] <= record["num_selected"] <= 16
    assert list(record) == method.record_type.columns()
    assert set(tta.method_presets("rotta")) == {"cifar10", "imagenet"}
    defaults = tta.method_defaults("rotta", preset="cifar10")
    assert defaults["optimizer"] == "adam" and defaults["lr"] == 1e-3 and defaults["memory_size"] == 64
    assert defaults["teacher_momentum"] == 0.999 and defaults["rbn_alpha"] == 0.05
    assert "bn_alpha" not in defaults
    with pytest.raises(ValueError, match="one image size"):
        method(torch.rand(4, 3, 40, 40))
    # the image counter stays on the host when the method moves (read each batch, no sync)
    counter, labels = method.num_seen, method.mem_labels
    method._apply(lambda t: t.clone())  # what .to(device) does to every tensor
    assert method.num_seen is counter and method.mem_labels is not labels
    with pytest.raises(ValueError, match="running statistics"):
        model = tta.load_model("cifar10_resnet20", pretrained=False)
        model.backbone.bn1.track_running_stats = False
        model.backbone.bn1.running_mean = model.backbone.bn1.running_var = None
        make(model)
