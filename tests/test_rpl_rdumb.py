"""RPL's generalised cross-entropy, RDumb, and the reset_every option every
gradient method takes (issue 25)."""

from __future__ import annotations

import io

import pytest
import torch

import tta
from tta.methods.params import select_norm_params
from tta.methods.rpl import generalized_cross_entropy

from test_methods import changed_keys, state


def test_generalized_cross_entropy_interpolates_ce_and_mae():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.0, 0.0]])
    p = logits.softmax(1).amax(1)
    torch.testing.assert_close(generalized_cross_entropy(logits, 1.0), 1 - p)  # MAE on the pseudo-label
    torch.testing.assert_close(generalized_cross_entropy(logits, 1e-4), -p.log(), rtol=1e-3, atol=1e-3)  # CE
    z = logits.clone().requires_grad_(True)
    generalized_cross_entropy(z, 0.8).sum().backward()
    ce = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ce, ce.argmax(1), reduction="sum").backward()
    # GCE's gradient is CE's scaled by p_y^q: the confident row keeps more of it
    torch.testing.assert_close(z.grad, ce.grad * p.pow(0.8).unsqueeze(1))


def test_rpl_adapts_the_norm_affines_and_resets(resnet20, noisy_batch):
    expected = {f"model.{n}" for n, _ in select_norm_params(resnet20)}
    method = tta.wrap(resnet20, "rpl")
    before = state(method)
    for _ in range(3):
        method(noisy_batch)
    changed = changed_keys(before, state(method))
    assert changed and changed <= expected
    method.reset()
    assert changed_keys(before, state(method)) == set()
    imagenet = tta.method_defaults("rpl", preset="imagenet")
    assert imagenet["optimizer"] == "sgd" and imagenet["lr"] == 5e-4 and imagenet["nesterov"]


def test_reset_every_resets_exactly_every_n_updates_and_survives_a_checkpoint(noisy_batch):
    torch.manual_seed(0)
    method = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", reset_every=3)
    source = state(method)
    seen = []
    for _ in range(7):
        method(noisy_batch[:32])
        seen.append(changed_keys(source, state(method)) == set())
    assert seen == [False, False, True, False, False, True, False]
    # Resumed after 4 updates, it resets after the 6th as the uninterrupted one does.
    first = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", reset_every=3)
    for _ in range(4):
        first(noisy_batch[:32])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", reset_every=3)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    assert second.num_updates == 1
    second(noisy_batch[:32])
    assert second.num_updates == 2 and changed_keys(source, state(second))
    second(noisy_batch[:32])
    assert second.num_updates == 0 and changed_keys(source, state(second)) == set()
    with pytest.raises(ValueError, match="reset_every"):
        tta.wrap(tta.load_model("cifar10_resnet20"), "tent", reset_every=0)
    assert "reset_every" not in tta.method_defaults("norm")  # nothing to reset


def test_reset_every_falls_after_the_collapse_guard_has_seen_the_batch(noisy_batch):
    # The reset due at a batch's last step comes after the guard's check of that
    # batch (made with the model that produced it), and the guard's window after the
    # reset starts empty, as reset() promises: the old model's batch is not in it.
    method = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", reset_every=2, collapse_guard=True)
    seen, check = [], method.guard.check
    method.guard.check = lambda x, logits: (seen.append(method.num_updates), check(x, logits))[1]
    for _ in range(2):
        method(noisy_batch[:32])
    assert seen == [1, 2]
    assert method.num_updates == 0 and len(method.guard._history) == 0


def test_rdumb_is_eta_until_its_reset(noisy_batch):
    torch.manual_seed(0)
    eta = tta.wrap(tta.load_model("cifar10_resnet20"), "eta", preset="cifar10")
    torch.manual_seed(0)
    rdumb = tta.wrap(tta.load_model("cifar10_resnet20"), "rdumb", preset="cifar10")
    assert rdumb.reset_every == 1000
    for _ in range(3):
        assert torch.equal(eta(noisy_batch), rdumb(noisy_batch))
    short = tta.wrap(tta.load_model("cifar10_resnet20"), "rdumb", reset_every=2)
    source = state(short)
    short(noisy_batch)
    short(noisy_batch)
    assert changed_keys(source, state(short)) == set()  # weights, optimizer and ETA's mean prediction


def test_reset_every_counts_steps_not_batches(noisy_batch):
    # With steps > 1 the reset falls on the update that reaches the count, as in the
    # port (mariodoebler/test-time-adaptation methods/base.py resets inside its steps
    # loop): steps=2, reset_every=3 resets at the 3rd update, mid-batch, and the 4th
    # update adapts the source model again.
    torch.manual_seed(0)
    method = tta.wrap(tta.load_model("cifar10_resnet20"), "tent", steps=2, reset_every=3)
    method(noisy_batch[:32])
    method(noisy_batch[32:64])
    assert method.num_updates == 1
    once = tta.wrap(tta.load_model("cifar10_resnet20"), "tent")
    once(noisy_batch[32:64])
    assert changed_keys(state(once), state(method)) == set()
