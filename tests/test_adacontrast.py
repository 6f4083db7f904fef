"""AdaContrast (issue 24): what adapts, reset and checkpoints, the two BatchNorm
modes, the key encoder, the queue and bank rings, the warm-up, the neighbours'
soft voting and the class-aware negatives on hand-made data."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tta
import tta.methods.adacontrast  # noqa: F401  (registers the method)
from tta.methods.adacontrast import contrastive_logits, knn_soft_voting, train_mode

from test_methods import changed_keys, same, state

torch.set_num_threads(1)

#: small queue and bank, a short warm-up: the behaviour at a test's cost
SMALL = {"queue_size": 256, "bank_size": 96, "warmup_samples": 64}


def wrap(model=None, **kw):
    return tta.wrap(model if model is not None else tta.load_model("cifar10_resnet20"), "adacontrast",
                    **{**SMALL, **kw})


def intended(method):
    """Names (in the method's state_dict) that a step may change."""
    names = {f"model.{n}" for n, _ in method.model.named_parameters()}
    names |= {f"key_encoder.{n}" for n, _ in method.key_encoder.named_parameters()}
    names |= {"queue_keys", "queue_labels", "bank_features", "bank_probs", "num_seen"}
    if method.bn_mode == "running":  # train-mode BatchNorm moves the running statistics
        names |= {k for k in method.state_dict() if "running_" in k or "num_batches_tracked" in k}
    return names


@pytest.mark.parametrize("bn_mode", ["running", "batch"])
def test_only_the_intended_state_changes_and_reset_is_bit_exact(bn_mode, noisy_batch):
    torch.manual_seed(0)
    method = wrap(bn_mode=bn_mode)
    before = state(method)
    assert {"queue_keys", "queue_labels", "bank_features", "bank_probs", "num_seen"} <= set(before)
    assert any(k.startswith("key_encoder.") for k in before)
    batch = noisy_batch[:32]
    for _ in range(3):
        method(batch)
    after = state(method)
    changed = {k for k in before if before[k].shape != after[k].shape or not same(before[k], after[k])}
    assert changed <= intended(method), changed - intended(method)
    assert {"queue_keys", "queue_labels", "bank_features", "bank_probs", "num_seen",
            "model.backbone.linear.weight", "model.backbone.conv1.weight"} <= changed
    assert any(k.startswith("model.") for k in changed) and any(k.startswith("key_encoder.") for k in changed)
    assert any("running_mean" in k for k in changed) == (bn_mode == "running")
    assert int(method.num_seen) == 96 and method.queue_keys.shape == (256, 64) and method.bank_probs.shape == (96, 10)
    method.reset()
    assert changed_keys(before, state(method)) == set()
    method(batch)  # the queue and bank are sized again after the reset
    assert int(method.num_seen) == 32


def test_a_checkpoint_resumes_the_stream_identically(noisy_batch):
    batch = noisy_batch[:32]
    torch.manual_seed(0)
    first = wrap(warmup_samples=32)
    first(batch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = wrap(warmup_samples=32)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    for seed in (7, 8):  # the second step refines with the bank
        torch.manual_seed(seed)
        a = first(batch)
        torch.manual_seed(seed)
        b = second(batch)
        assert torch.equal(a, b)
    assert first.last_record.to_dict()["refined"] is True
    assert changed_keys(state(first), state(second)) == set()


def test_adapts_under_no_grad_and_on_group_and_layer_norm_models(noisy_batch):
    for name in ("zoo:resnet26_gn", "zoo:vit_tiny_ln"):
        method = wrap(tta.load_model(name), queue_size=32, bank_size=32)
        before = state(method)
        with torch.no_grad():  # adapting under no_grad, as models are usually evaluated
            logits = method(noisy_batch[:16])
        assert logits.shape == (16, 10) and torch.isfinite(logits).all()
        assert changed_keys({k: v for k, v in before.items() if k.startswith("model.")}, state(method))


def test_a_timm_network_runs():
    model = tta.load_model("timm:resnet18", pretrained=False, num_classes=10)
    method = wrap(model, queue_size=32, bank_size=32)
    logits = method(torch.rand(8, 3, 32, 32))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    assert method.queue_keys.shape == (32, 512)


def test_the_bn_modes_adapt_alike_and_predict_with_their_statistics(noisy_batch):
    batch = noisy_batch[:32]
    methods, logits = {}, {}
    for mode in ("running", "batch"):
        torch.manual_seed(0)
        methods[mode] = wrap(bn_mode=mode)
        for _ in range(2):
            logits[mode] = methods[mode](batch)
    running, batch_stats = methods["running"], methods["batch"]
    # the adaptation passes normalise by their own batch in both modes: same weights
    for (_, a), (_, b) in zip(running.model.named_parameters(), batch_stats.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    source = tta.load_model("cifar10_resnet20")
    bn = dict(source.named_modules())["backbone.bn1"]
    moved = dict(running.model.named_modules())["backbone.bn1"]
    kept = dict(batch_stats.model.named_modules())["backbone.bn1"]
    # "running": two train-mode passes a step (weak, strong) moved the statistics;
    # "batch": they stay the source's
    assert not torch.allclose(moved.running_mean, bn.running_mean) and int(moved.num_batches_tracked) == 4
    assert torch.equal(kept.running_mean, bn.running_mean)
    # each reports the model in eval mode with its statistics
    with torch.no_grad():
        assert torch.equal(logits["running"], running.model(batch))
        assert not running.model.training and not moved.training
    assert not torch.allclose(logits["running"], logits["batch"], atol=1e-3)


def test_the_key_encoder_follows_the_model_before_each_update(noisy_batch):
    torch.manual_seed(0)
    method = wrap()
    source = [p.detach().clone() for p in method.model.parameters()]
    method(noisy_batch[:16])
    # the first EMA averages the source with itself: the key encoder is still the source
    assert all(torch.equal(k, s) for k, s in zip(method.key_encoder.parameters(), source))
    after_first = [p.detach().clone() for p in method.model.parameters()]
    method(noisy_batch[:16])
    for k, s0, s1 in zip(method.key_encoder.parameters(), source, after_first):
        torch.testing.assert_close(k, 0.999 * s0 + 0.001 * s1, rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in method.key_encoder.parameters())


def test_queue_and_bank_are_rings_and_the_warmup_ends(noisy_batch):
    torch.manual_seed(0)
    method = wrap(queue_size=40, bank_size=24, warmup_samples=32)
    batch = noisy_batch[:16]
    refined = []
    for step in range(3):
        queue_before = method.queue_keys.clone()
        method(batch)
        refined.append(method.last_record.to_dict()["refined"])
        if step == 2:
            # images 32..47 went to queue slots 32..39, 0..7 (mod 40); slots 8..31 kept
            assert torch.equal(method.queue_keys[8:32], queue_before[8:32])
            assert not torch.equal(method.queue_keys[:8], queue_before[:8])
    # refined once 32 images were seen before the step
    assert refined == [False, False, True]
    assert int(method.num_seen) == 48
    assert torch.allclose(method.queue_keys.norm(dim=1), torch.ones(40))
    # As the official bank, grown by whole batches until it holds >= 24: 32 rows, full
    # after 48 images (rows 0..15 twice)
    assert method.bank_probs.shape[0] == 32 and torch.allclose(method.bank_probs.sum(1), torch.ones(32))


def test_the_bank_holds_the_first_whole_number_of_batches_at_or_above_its_size(noisy_batch):
    """The official bank grows by concatenation until it holds at least bank_size
    entries: 16400 at the CIFAR setting's batch 200, not 16384."""
    for bank_size, batch, rows in ((16384, 200, 16400), (96, 32, 96), (100, 32, 128), (8, 16, 16)):
        method = wrap(queue_size=256, bank_size=max(bank_size, batch))
        method.bank_size = bank_size  # the rows come from the first batch alone: no need to run 16384 images
        method._allocate(torch.zeros(batch, 4), torch.zeros(batch, 10))
        assert method.bank_features.shape == (rows, 4) and method.bank_probs.shape == (rows, 10)


def test_the_adaptation_passes_run_in_train_mode_and_the_prediction_in_eval_mode(noisy_batch):
    """As the official ``model.train()``: dropout active while adapting (model and key
    encoder), not in the prediction."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Dropout(0.5), nn.Linear(8, 10)).eval()
    method = wrap(net, queue_size=32, bank_size=32)
    modes = {"model": [], "key": []}
    method.model[5].register_forward_pre_hook(lambda m, _: modes["model"].append(m.training))
    method.key_encoder[5].register_forward_pre_hook(lambda m, _: modes["key"].append(m.training))
    logits = method(noisy_batch[:16])
    # weak view and query in train mode, the prediction after the step in eval mode
    assert modes == {"model": [True, True, False], "key": [True, True]}
    assert not any(m.training for m in method.model.modules())
    assert torch.equal(logits, method.model(noisy_batch[:16]))  # eval mode: no dropout draw


def test_knn_soft_voting_on_a_hand_made_bank():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.2, 0.8], [0.0, 0.0, 1.0]])
    queries = torch.tensor([[2.0, 0.1], [0.05, 3.0]])  # cosine ignores the norms
    labels, voted = knn_soft_voting(queries, bank, probs, num_valid=5, num_neighbors=2)
    torch.testing.assert_close(voted, torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.6, 0.4]]))
    assert labels.tolist() == [0, 1]
    # the vote is the mean of the k nearest, not of the nearest alone
    _, three = knn_soft_voting(queries[1:], bank, probs, num_valid=5, num_neighbors=3)
    torch.testing.assert_close(three, (probs[2] + probs[3] + probs[1]).unsqueeze(0) / 3)
    # rows past num_valid do not vote, even when nearest; fewer valid rows than k: their mean
    _, partial = knn_soft_voting(queries[1:], bank, probs, num_valid=torch.tensor(2), num_neighbors=3)
    torch.testing.assert_close(partial, ((probs[0] + probs[1]) / 2).unsqueeze(0))
    # euclidean distances see the norms
    far = torch.tensor([[-3.0, 0.0]])
    labels, _ = knn_soft_voting(far, bank, probs, num_valid=5, num_neighbors=1, distance="euclidean")
    assert labels.tolist() == [2]


def test_class_aware_negatives_on_a_hand_made_queue():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    key = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    plain = contrastive_logits(query, key, queue, temperature=0.5)
    torch.testing.assert_close(plain, torch.tensor([[2.0, 2.0, 0.0, -2.0], [2.0, 0.0, 2.0, 0.0]]))
    masked = contrastive_logits(query, key, queue, 0.5, labels=torch.tensor([3, 1]),
                                queue_labels=torch.tensor([3, 1, 3]))
    inf = float("-inf")
    assert masked.tolist() == [[2.0, inf, 0.0, inf], [2.0, 0.0, inf, 0.0]]
    # the positive is never masked, and the loss stays finite
    loss = torch.nn.functional.cross_entropy(masked, torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(loss) and torch.equal(masked[:, 0], plain[:, 0])


def test_users_own_views_are_used(noisy_batch):
    calls = []

    class Spy(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x.flip(3)

    wrap(weak_transform=Spy("weak"), strong_transform=Spy("strong"))(noisy_batch[:8])
    assert calls == ["weak", "strong", "strong"]


def test_default_views_are_per_image_and_in_range():
    method = wrap()
    x = torch.rand(1, 3, 32, 32).repeat(16, 1, 1, 1)
    torch.manual_seed(0)
    strong = method.strong_transform(x)
    assert strong.shape == x.shape and strong.min() >= 0 and strong.max() <= 1
    assert (strong - strong[:1]).abs().flatten(1).amax(1)[1:].min() > 1e-3
    weak = method.weak_transform(x)
    flipped = (weak - x).abs().flatten(1).amax(1) > 0
    assert torch.equal(weak[flipped], x[flipped].flip(3)) and 0 < flipped.sum() < 16


def test_options_presets_and_refusals():
    defaults = tta.method_defaults("adacontrast", preset="cifar10")
    assert defaults["optimizer"] == "sgd" and defaults["lr"] == 2e-4 and defaults["nesterov"]
    assert defaults["weight_decay"] == 1e-4 and defaults["temperature"] == 0.07 and defaults["queue_size"] == 16384
    assert defaults["bn_mode"] == "running" and "bn_alpha" not in defaults
    assert tta.method_defaults("adacontrast", preset="imagenet") == defaults
    assert wrap(bn_mode="batch").batch_stats and not wrap().batch_stats
    with pytest.raises(ValueError, match="bn_mode"):
        wrap(bn_mode="eval")
    with pytest.raises(ValueError, match="does not fit"):
        wrap(queue_size=8)(torch.rand(16, 3, 32, 32))
    plain = nn.Sequential(nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(TypeError, match="lacks forward_features and get_classifier"):  # no linear classifier
        tta.wrap(plain, "adacontrast")
    plain.forward_features = lambda x: x
    plain.get_classifier = lambda: plain[0].weight  # not a layer
    with pytest.raises(TypeError, match="returns the last layer"):
        tta.wrap(plain, "adacontrast")


def test_the_mask_reads_the_queue_labels_after_the_enqueue(noisy_batch, monkeypatch):
    """As both official codes: the logits use the keys queued before this batch, the
    class-aware mask the labels after it (the batch's own slots carry its labels)."""
    import tta.methods.adacontrast as module

    seen = {}
    original = module.contrastive_logits

    def spy(query, key, queue, temperature, labels=None, queue_labels=None):
        seen.update(queue=queue.clone(), queue_labels=queue_labels.clone(), labels=labels.clone())
        return original(query, key, queue, temperature, labels, queue_labels)

    monkeypatch.setattr(module, "contrastive_logits", spy)
    torch.manual_seed(0)
    method = wrap(queue_size=64)
    method(noisy_batch[:16])
    queue_before = seen["queue"]
    assert torch.equal(seen["queue_labels"], method.queue_labels)  # after the enqueue
    assert torch.equal(method.queue_labels[:16], seen["labels"])
    assert not torch.equal(method.queue_keys[:16], queue_before[:16])  # keys: before it
    assert torch.equal(method.queue_keys[16:], queue_before[16:])


def test_records_and_a_failed_step_leaves_everything_as_it_was(noisy_batch):
    torch.manual_seed(0)
    method = wrap()
    method(noisy_batch[:16])
    record = method.last_record.to_dict()
    assert list(record) == method.record_type.columns()
    assert not any(isinstance(v, torch.Tensor) for v in record.values())
    assert record["loss"] == pytest.approx(record["ce_loss"] + record["contrastive_loss"] + record["diversity_loss"],
                                           rel=1e-5)

    # fail in the query's forward (BatchNorm in train mode), then after the update
    # (in the bank's pass: the key encoder, the model and the optimizer have moved)
    for failing, call in ((method.model.get_classifier(), 2), (method.key_encoder.get_classifier(), 1)):
        before, calls = state(method), []

        def hook(module, args, calls=calls, call=call):
            calls.append(1)
            if len(calls) == call:
                raise RuntimeError("out of memory")

        handle = failing.register_forward_pre_hook(hook)
        with pytest.raises(RuntimeError, match="out of memory"):
            method(noisy_batch[:16])
        handle.remove()
        assert changed_keys(before, state(method)) == set()
        assert not any(m.training for m in method.model.modules())
    method(noisy_batch[:16])  # and it goes on


def test_train_mode_gives_every_module_its_own_mode_back():
    # Inside: all in train mode (the official model.train()). After: each as before,
    # a sub-module kept in train mode inside an eval-mode block included.
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), nn.Dropout()).eval()
    model[0][1].train()
    before = [m.training for m in model.modules()]
    with train_mode(model):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
