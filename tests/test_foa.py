"""FOA (forward-only test-time adaptation with CMA-ES over prompt tokens): the
prompt injection, the fitness, the activation shift's one-batch lag, a frozen model,
bit-exact reset and state round trip, and the models it takes or refuses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tta
import tta.methods.foa  # noqa: F401  (registers "foa")
from tta.methods.records import FOARecord

timm = pytest.importorskip("timm")
pytest.importorskip("cma")

torch.set_num_threads(1)


def tiny_vit(class_token: bool = True, **kw) -> torch.nn.Module:
    """A small random timm ViT (class token, 16 patches) in pixel space."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5,
               class_token=class_token, global_pool="token" if class_token else "avg")
    net = VisionTransformer(**{**cfg, **kw})
    return tta.models.ImageClassifier(net, num_classes=5, input_size=(16, 16)).eval()


def source(n: int = 2, b: int = 16, size: int = 16):
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(b, 3, size, size, generator=g), torch.zeros(b, dtype=torch.long)) for _ in range(n)]


def batches(n: int = 3, b: int = 8, size: int = 16):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(b, 3, size, size, generator=g) for _ in range(n)]


def tensors(method) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in method.state_dict().items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        elif k.endswith("_extra_state"):
            out[k + ".cma"] = v["cma"].clone()
    return out


def test_prompts_are_np_tokens_after_the_class_token_without_position_embedding():
    model = tiny_vit()
    foa = tta.wrap(model, "foa", source_loader=source(), popsize=4)
    vit = model.backbone
    assert foa.prompts.shape == (3, 32) and foa._cma.es.N == 3 * 32
    assert 0 < foa.prompts.abs().max() <= (6 / (3 * 16 + 32)) ** 0.5  # VPT's xavier range
    x = batches(1)[0]
    with torch.no_grad():
        # Without prompts the last feature is the model's own head input.
        *_, last = foa.features_of(foa._embed(x), None)
        torch.testing.assert_close(vit.get_classifier()(last), model(x))
        seen = []
        hook = vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        prompts = torch.randn(2, 3, 32)
        feats = list(foa.features_of(foa._embed(x), prompts))
        hook.remove()
    h = seen[0]
    assert h.shape == (2 * 8, 1 + 3 + 16, 32) and len(feats) == 3 and feats[0].shape == (16, 32)
    tokens = foa._embed(x)
    assert torch.equal(h[:8, 1:4], prompts[0].expand(8, 3, 32)) and torch.equal(h[8:, 1:4], prompts[1].expand(8, 3, 32))
    assert torch.equal(h[:8, :1], tokens[:, :1]) and torch.equal(h[8:, 4:], tokens[:, 1:])


def test_fitness_is_summed_entropy_plus_scaled_statistics_distance_by_hand():
    model = tiny_vit()
    foa = tta.wrap(model, "foa", source_loader=source(), popsize=4, fitness_lambda=0.3)
    vit, x = model.backbone, batches(1, b=6)[0]
    prompts = torch.randn(2, 3, 32)
    with torch.no_grad():
        fitness, entropy, discrepancy, heads = foa.score_candidates(foa._embed(x), prompts)
        # by hand, one candidate at a time: [CLS + pos, prompts, patches + pos]
        embedded = vit.patch_embed(model.normalize(x)) + vit.pos_embed[:, 1:]
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(6, -1, -1)
        for k in range(2):
            h = torch.cat([cls, prompts[k].expand(6, -1, -1), embedded], dim=1)
            feats = []
            for i, block in enumerate(vit.blocks):
                h = block(h)
                feats.append(vit.blocks[i + 1].norm1(h[:, 0]) if i + 1 < 3 else vit.norm(h[:, 0]))
            f = torch.cat(feats, dim=1)
            d = ((f.std(0) - foa.source_std) ** 2).sum() + ((f.mean(0) - foa.source_mean) ** 2).sum()
            p = vit.head(feats[-1]).softmax(1)
            ent = -(p * p.log()).sum()
            torch.testing.assert_close(discrepancy[k], d, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(entropy[k], ent, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fitness[k], ent + 0.3 * 6 / 64 * d, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(heads[k], feats[-1], rtol=1e-4, atol=1e-5)


def test_source_statistics_are_the_unbiased_moments_of_the_features():
    model = tiny_vit()
    src = source(n=3, b=10)
    foa = tta.wrap(model, "foa", source_loader=src, num_source_images=25, popsize=4)
    with torch.no_grad():
        images = torch.cat([b[0] for b in src])[:25]
        f = torch.cat(list(foa.features_of(foa._embed(images), None)), dim=1)
    assert foa.source_mean.shape == (3 * 32,)
    torch.testing.assert_close(foa.source_mean, f.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(foa.source_std, f.std(0), rtol=1e-4, atol=1e-5)
    given = tta.wrap(tiny_vit(), "foa", source_statistics=(foa.source_mean, foa.source_std), popsize=4)
    assert torch.equal(given.source_mean, foa.source_mean)
    with pytest.raises(ValueError, match="source images"):
        tta.wrap(tiny_vit(), "foa")


def test_step_scores_popsize_plus_one_candidates_and_predicts_with_the_fittest():
    model = tiny_vit()
    foa = tta.wrap(model, "foa", source_loader=source(), popsize=5, candidates_per_forward=2)
    seen, told = [], []
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    tell = foa._cma.tell
    foa._cma.tell = lambda s, f, r: (told.append((len(s), list(f))), tell(s, f, r))
    scored = []
    score = foa.score_candidates
    foa.score_candidates = lambda t, c: scored.append(score(t, c)) or scored[-1]
    x = batches(1)[0]
    first = foa.prompts.clone()
    out = foa(x)
    assert sum(seen) == 6 * 8 and told[0][0] == 6  # 5 asked + the previous best, in chunks of 2
    fitness, entropy, _, heads = scored[0]
    best = int(np.argmin(told[0][1]))
    torch.testing.assert_close(out, model.backbone.head(heads[best]))  # batch 1: no shift
    record = foa.last_record
    assert isinstance(record, FOARecord) and record.loss == pytest.approx(float(fitness[best]))
    assert record.kept_best == (best == 5)
    if best == 5:
        assert torch.equal(foa.prompts, first)
    assert np.array_equal(foa._best.astype(np.float32), foa.prompts.flatten().numpy())


def test_activation_shift_lags_one_batch_and_follows_the_ema():
    model = tiny_vit()
    foa = tta.wrap(model, "foa", source_loader=source(), popsize=4)
    scored = []
    score = foa.score_candidates
    foa.score_candidates = lambda t, c: scored.append(score(t, c)) or scored[-1]
    head = model.backbone.head
    src_last = foa.source_mean[-32:]
    xs = batches(3)
    outs = [foa(x) for x in xs[:1]]
    ema1 = scored[0][3].mean(1).mean(0)
    assert bool(foa.ema_started) and torch.allclose(foa.test_mean_ema, ema1)
    outs.append(foa(xs[1]))
    fit2, _, _, heads2 = scored[1]
    best2 = int(torch.argmin(fit2))
    torch.testing.assert_close(outs[1], head(heads2[best2] + (src_last - ema1)))
    torch.testing.assert_close(foa.test_mean_ema, 0.9 * ema1 + 0.1 * heads2.mean(1).mean(0))
    # shift_step=0: predictions are the unshifted head of the fittest candidate
    plain = tta.wrap(tiny_vit(), "foa", source_loader=source(), popsize=4, shift_step=0.0)
    plain.score_candidates = lambda t, c, s=plain.score_candidates: scored.append(s(t, c)) or scored[-1]
    plain(xs[0])
    out = plain(xs[1])
    fit, _, _, heads = scored[-1]
    torch.testing.assert_close(out, plain.vit.head(heads[int(torch.argmin(fit))]))


def test_shift_only_ablation_is_one_forward_per_batch():
    model = tiny_vit()
    foa = tta.wrap(model, "foa", source_loader=source(), num_prompts=0)
    seen = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    x1, x2 = batches(2)
    with torch.no_grad():
        out1 = foa(x1)
        out = foa(x2)
        assert [s[:2] for s in seen] == [(8, 17), (8, 17)]  # one pass per batch, no prompt token
        torch.testing.assert_close(out1, model(x1))
        mean1 = model.forward_features(x1).mean(0)
        expected = model.get_classifier()(model.forward_features(x2) + foa.source_mean[-32:] - mean1)
    torch.testing.assert_close(out, expected)


def test_model_is_frozen_and_steps_run_under_no_grad_and_inference_mode():
    model = tiny_vit()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.inference_mode():
        foa = tta.wrap(model, "foa", source_loader=source(), popsize=4)
    xs = batches(3)
    with torch.no_grad():
        out = foa(xs[0])
    with torch.inference_mode():
        foa(xs[1])
    assert out.shape == (8, 5) and not out.requires_grad
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters()) and foa.adapted == []
    assert not {k for k in foa.state_dict() if k.startswith("vit.")}  # the ViT is not stored twice
    with pytest.raises(ValueError, match="at least 2 images"):
        foa(xs[2][:1])


def test_reset_is_bit_exact_and_restarts_the_same_search():
    foa = tta.wrap(tiny_vit(), "foa", source_loader=source(), popsize=4)
    xs = batches(3)
    foa.snapshot()
    before = tensors(foa)
    assert before["_extra_state.cma"].numel() == 0  # a fresh search is not pickled
    first = [foa(x) for x in xs]
    after = tensors(foa)
    assert after["_extra_state.cma"].numel() > 0 and not torch.equal(after["test_mean_ema"], before["test_mean_ema"])
    foa.reset()
    now = tensors(foa)
    assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)
    again = [foa(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_state_dict_round_trip_continues_identically_whatever_numpy_does():
    model = tiny_vit()
    a = tta.wrap(model, "foa", source_loader=source(), popsize=4)
    b = tta.wrap(copy.deepcopy(model), "foa", source_statistics=(a.source_mean, a.source_std), popsize=4)
    xs = batches(5)
    for x in xs[:2]:
        a(x)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.prompts, a.prompts) and np.array_equal(b._best, a._best)
    np.random.seed(123)
    user = np.random.get_state()
    outs_a = [a(x) for x in xs[2:]]
    assert np.array_equal(np.random.get_state()[1], user[1])  # the user's NumPy RNG is untouched
    np.random.rand(11)  # ... and does not feed CMA-ES
    outs_b = [b(x) for x in xs[2:]]
    assert all(torch.equal(p, q) for p, q in zip(outs_a, outs_b))
    assert np.array_equal(a._cma.es.mean, b._cma.es.mean)


def test_a_deepcopy_continues_identically():
    # pycma samples with NumPy's global RandomState: a copy must keep drawing from it
    a = tta.wrap(tiny_vit(), "foa", source_loader=source(), popsize=4)
    xs = batches(4)
    a(xs[0])
    b = copy.deepcopy(a)
    assert all(torch.equal(a(x), b(x)) for x in xs[1:])


def test_a_state_that_is_not_a_cma_search_is_refused_not_run(tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    model = tiny_vit()
    a = tta.wrap(model, "foa", source_loader=source(), popsize=4)
    a(batches(1)[0])
    state = a.state_dict()
    extra = next(k for k in state if k.endswith("_extra_state"))
    state[extra] = {**state[extra], "cma": torch.frombuffer(bytearray(pickle.dumps(Payload())), dtype=torch.uint8)}
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not part of a CMA-ES state"):
        a.load_state_dict(state)
    assert not (tmp_path / "pwned").exists()


def test_cma_draws_the_official_stream():
    import cma

    foa = tta.wrap(tiny_vit(), "foa", source_loader=source())
    asked, _ = foa._cma.ask()
    state = np.random.get_state()
    es = cma.CMAEvolutionStrategy(np.zeros(96), 1.0, {"seed": 2020, "popsize": 27, "maxiter": -1, "verbose": -1})
    official = es.ask()
    np.random.set_state(state)
    assert len(asked) == 27 and all(np.array_equal(p, q) for p, q in zip(asked, official))
    assert tta.wrap(tiny_vit(), "foa", source_loader=source(), popsize=None)._cma.es.popsize == 4 + int(3 * np.log(96))


def test_refuses_a_cnn_and_attention_pooling_by_name():
    with pytest.raises(TypeError, match="needs a Vision Transformer.*CifarResNet"):
        tta.wrap(tta.load_model("cifar10_resnet20", pretrained=False), "foa", source_loader=source(size=32))
    with pytest.raises(TypeError, match="global_pool='map'"):
        tta.wrap(tiny_vit(global_pool="map"), "foa", source_loader=source())
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    distilled = VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                           num_classes=5)
    with pytest.raises(TypeError, match="VisionTransformerDistilled is distilled.*without distillation"):
        tta.wrap(distilled, "foa", source_loader=source())  # an IndexError in the source pass before


def test_register_tokens_and_raw_timm_vits_work():
    model = tiny_vit(reg_tokens=2)
    foa = tta.wrap(model, "foa", source_loader=source(), popsize=4, candidates_per_forward=4)
    init = foa.prompts.clone()
    seen = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    foa(batches(1)[0])
    assert seen[0].shape == (4 * 8, 1 + 2 + 3 + 16, 32)
    # the last candidate (the previous best, here the init) sits after the class and register tokens
    assert torch.equal(seen[1][:, 3:6], init.expand(8, 3, 32))
    raw = tiny_vit().backbone  # a timm ViT itself, no normalisation in front
    assert tta.wrap(raw, "foa", source_loader=source(), popsize=4)(batches(1)[0]).shape == (8, 5)


def test_zoo_vit_tiny_ln_runs_and_stays_frozen(cifar_train_images, noisy_batch):
    try:
        model = tta.load_model("zoo:vit_tiny_ln")
    except Exception as err:  # no bundled/trained checkpoint here
        pytest.skip(f"zoo:vit_tiny_ln unavailable: {err}")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = cifar_train_images[0][:64]
    foa = tta.wrap(model, "foa", source_loader=[(images[:32], None), (images[32:], None)], popsize=6)
    assert foa.source_mean.shape == (6 * 192,) and foa.prompts.shape == (3, 192)
    x = noisy_batch[:16]
    with torch.no_grad():
        plain = model(x)
    outs = [foa(x) for _ in range(2)]
    assert all(o.shape == (16, 10) and torch.isfinite(o).all() for o in outs)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    # forward passes only: no parameter ever holds a gradient, no output carries a graph
    assert all(p.grad is None for p in foa.parameters()) and not any(o.requires_grad for o in outs)
    # the first batch's elitist candidate is the small init prompt: close to the plain model
    assert (outs[0].argmax(1) == plain.argmax(1)).float().mean() > 0.5


def test_counts_given_as_booleans_or_below_their_bound_are_refused():
    """True is an int to Python: popsize=True ran where a switch was meant."""
    for option, bound in (("num_prompts", "an integer >= 0"), ("popsize", "an integer >= 2 or None"),
                          ("candidates_per_forward", "a positive integer or None"),
                          ("num_source_images", "an integer >= 2 or None")):
        with pytest.raises(ValueError, match=rf"{option} must be {bound}, got True"):
            tta.wrap(tiny_vit(), "foa", **{option: True})
    with pytest.raises(ValueError, match=r"popsize must be an integer >= 2 or None, got 1"):
        tta.wrap(tiny_vit(), "foa", popsize=1)
