"""CLIP classifiers, augmented views, TPT and RLCF on tiny random open_clip models (offline)."""

import math

import pytest
import torch

import tta
from tta.augment.views import gather_views, make_views, random_resized_crops
from tta.methods.clip_views import marginal_entropy, select_confident
from tta.methods.params import select_norm_params

open_clip = pytest.importorskip("open_clip")

from tiny_clip import (CLASSES, load_tiny_clip, registered_on_one_thread, smooth_images,  # noqa: E402
                       with_agreeing_texts)

from tta.methods.rlcf import candidate_classes, clip_reward, reinforce_loss  # noqa: E402
from tta.models.clip import CLIPClassifier  # noqa: E402
from tta.models.clip_models import split_spec  # noqa: E402

TINY = "tta-test-tiny-clip"


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    yield from registered_on_one_thread(TINY, tmp_path_factory)


def tiny_clip(seed=0, **kw):
    return load_tiny_clip(TINY, seed, **kw)


@pytest.fixture
def images():
    return smooth_images(2)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------


def test_logits_are_scaled_cosine_as_in_open_clip(images):
    model = tiny_clip()
    assert isinstance(model, CLIPClassifier)
    assert (model.num_classes, model.input_size, model.classnames) == (5, (32, 32), CLASSES)
    with torch.no_grad():
        logits = model(images)
        clip = model.clip
        tokens = open_clip.get_tokenizer(TINY)([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        image = clip.encode_image((images - mean) / std, normalize=True)
        expected = clip.logit_scale.exp() * image @ clip.encode_text(tokens, normalize=True).T
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.std() > 0.01  # the tiny random model does tell the classes apart
    # other sizes are resized inside (shorter side, centre crop)
    assert model.preprocess(torch.rand(1, 3, 40, 64)).shape == (1, 3, 32, 32)
    assert model(torch.rand(3, 3, 40, 64)).shape == (3, 5)


def test_a_loaded_state_gives_the_prompt_its_token_embeddings(images):
    source, target = tiny_clip(ctx_init="a photo of a"), tiny_clip(seed=1, ctx_init="a photo of a")
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert torch.equal(target(images), source(images))
    with pytest.raises(TypeError, match="got dtype torch.uint8"):
        source((images * 255).to(torch.uint8))


def test_local_checkpoints_that_do_not_load_name_the_file(tmp_path):
    good = tmp_path / "tiny.pt"
    torch.save(tiny_clip().clip.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{truncated} does not load into open_clip model '{TINY}'"):
        tta.load_model(f"clip:{TINY}", weights=truncated)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint file at {tmp_path}/missing.pt"):
        tta.load_model(f"clip:{TINY}/{tmp_path}/missing.pt")


def test_template_ensemble_averages_normalised_features():
    templates = ["a photo of a {}.", "art of the {}."]
    ensemble = tiny_clip(templates=templates).text_features()
    singles = [tiny_clip(templates=[t]).text_features() for t in templates]
    expected = torch.nn.functional.normalize(singles[0] + singles[1], dim=-1)
    torch.testing.assert_close(ensemble, expected)
    assert len(tiny_clip(templates="clip80").templates) == 80
    cifar = tiny_clip(templates="cifar10").templates  # the CLIP authors' CIFAR-10 ensemble, VTE's there
    assert len(cifar) == len(set(cifar)) == 18 and cifar[0] == "a photo of a {}."
    assert cifar[9] == "a photo of the {}." and cifar[-1] == "a photo of the big {}."
    assert len(tiny_clip(templates="clip7").templates) == 7
    assert len(tiny_clip(classnames=None).classnames) == 1000


@pytest.mark.parametrize("template", ["a photo of a {}, a type of {}.", "a {0} photo", "a photo", "a {} of {",
                                      "{name} photo", 7])
def test_templates_need_exactly_one_place_for_the_name(template):
    with pytest.raises(ValueError, match="exactly one '{}'|with a '{}'"):
        tiny_clip(templates=[template])
    assert tiny_clip(templates=["{{a}} photo of a {}."]).templates == ["{{a}} photo of a {}."]


def test_prompt_init_reproduces_the_template_zero_shot(images):
    template = tiny_clip()  # "a photo of a {}."
    prompt = tiny_clip(ctx_init="a photo of a")
    assert prompt.ctx.shape == (4, 64)  # "a photo of a": 4 tokens
    ids = prompt.tokenizer(["a photo of a"])[0, 1:5]
    assert torch.equal(prompt.ctx.detach(), prompt.clip.token_embedding.weight[ids])
    with torch.no_grad():
        torch.testing.assert_close(prompt(images), template(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prompt.text_features(), template.text_features(), rtol=1e-5, atol=1e-5)
        prompt.ctx.add_(0.05 * torch.randn_like(prompt.ctx))
        assert not torch.allclose(prompt(images), template(images), atol=1e-3)  # the context is used
    other = tiny_clip(ctx_init="itap of a")
    with torch.no_grad():
        torch.testing.assert_close(other(images), tiny_clip(templates=["itap of a {}."])(images),
                                   rtol=1e-5, atol=1e-5)


def test_text_features_are_cached_until_something_changes(images):
    model = tiny_clip(ctx_init="a photo of a")
    with torch.no_grad():
        first = model.text_features()
        model(images)
        model(images)
        assert model.text_encode_count == 1
        model.ctx.add_(0.1)  # an update of the prompt
        second = model.text_features()
        assert model.text_encode_count == 2 and not torch.allclose(first, second)
        model.text_features()
        assert model.text_encode_count == 2
        model.clip.ln_final.bias.add_(0.1)  # a text-tower weight
        model.text_features()
        assert model.text_encode_count == 3
        with torch.autocast("cpu", dtype=torch.bfloat16):  # features of another precision
            assert model.text_features().dtype == torch.float32 and model.text_encode_count == 4
        model.text_features()  # full precision again: not the bfloat16 features
        assert model.text_encode_count == 5
    model.set_classnames(CLASSES[:3])
    assert model(images).shape == (2, 3) and model.text_encode_count == 6
    # with gradients wanted for the context, the features carry a graph each time
    model.ctx.requires_grad_(True)
    features = model.text_features()
    assert features.requires_grad and model.text_encode_count == 7
    features.sum().backward()
    assert model.ctx.grad is not None and model.ctx.grad.abs().sum() > 0


def test_local_checkpoint_and_name_parsing(tmp_path, images):
    model = tiny_clip(seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(model.clip.state_dict(), path)
    for loaded in (tta.load_model(f"clip:{TINY}/{path}", classnames=CLASSES),
                   tta.load_model(f"clip:{TINY}", weights=path, classnames=CLASSES)):
        with torch.no_grad():
            assert torch.equal(loaded(images), model(images))
    known = ["ViT-B-16", "ViT-B-16-quickgelu"]
    assert split_spec("ViT-B-16/openai", known) == ("ViT-B-16", "openai")
    assert split_spec("ViT-B/16/openai", known) == ("ViT-B-16", "openai")
    assert split_spec("ViT-B-16//ckpt/x.bin", known) == ("ViT-B-16", "/ckpt/x.bin")
    assert split_spec("ViT-B-16", known) == ("ViT-B-16", None)
    with pytest.raises(KeyError, match="did you mean 'ViT-B-16'"):
        tta.load_model("clip:ViT-B-61/openai")
    with pytest.raises(FileNotFoundError):
        tta.load_model(f"clip:{TINY}", weights=tmp_path / "missing.pt")


def test_files_that_are_not_checkpoints_name_the_file(tmp_path):
    text = tmp_path / "passwd"
    text.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(text.read_bytes())
    for path in (text, junk):
        for load in (lambda: tta.load_model(f"clip:{TINY}", weights=path, classnames=CLASSES),
                     lambda: tta.load_model(f"clip:{TINY}/{path}", classnames=CLASSES)):
            with pytest.raises(ValueError, match="is not a checkpoint") as err:
                load()
            assert str(path) in str(err.value) and "a valid open_clip checkpoint is" in str(err.value)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Code()}}, evil)
    with pytest.raises(ValueError, match=f"refusing to load {evil}"):
        tta.load_model(f"clip:{TINY}", weights=evil, classnames=CLASSES)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        tta.load_model(f"clip:{TINY}", weights=tmp_path, classnames=CLASSES)


class _Code:
    """Pickled as a call: what weights_only loading must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


# ----------------------------------------------------------------------------------
# Views and selection
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("augmix", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_views_shapes_dtype_and_original(augmix, dtype, images):
    x = images.to(dtype)
    views = make_views(x, 6, use_augmix=augmix)
    assert views.shape == (2, 6, 3, 32, 32) and views.dtype == dtype and views.device == x.device
    assert torch.equal(views[:, 0], x)  # the image itself, unchanged
    assert torch.isfinite(views.float()).all() and views.min() >= -1e-3 and views.max() <= 1 + 1e-2
    # every augmented view differs from the image and from the others
    flat = views.float().flatten(2)
    distance = torch.cdist(flat, flat)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert (distance[:, off_diagonal] > 1e-3).all()


def test_views_are_independent_across_images_and_seedable():
    x = torch.rand(1, 3, 16, 16).expand(2, -1, -1, -1)  # the same image twice
    views = make_views(x, 5)
    assert not torch.allclose(views[0, 1:], views[1, 1:])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(make_views(x, 5, use_augmix=True, generator=g1),
                       make_views(x, 5, use_augmix=True, generator=g2))


@pytest.mark.parametrize("name", ["tpt", "ttaug", "memo"])
def test_a_view_transform_that_resizes_is_refused_naming_the_fix(name, images):
    import kornia.augmentation as K

    method = tta.wrap(tiny_clip(), name, num_views=4, transform=K.RandomResizedCrop((64, 64)))
    with pytest.raises(ValueError, match=r"must keep the images' shape .*RandomResizedCrop\(\(32, 32\)\)"):
        method(images)


def test_full_crops_are_the_image_and_flips_mirror_it():
    x = torch.rand(2, 3, 16, 20)  # aspect 1.25: a whole-image crop is allowed
    whole = make_views(x, 4, scale=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(whole[:, 1:], x.unsqueeze(1).expand(-1, 3, -1, -1, -1), atol=1e-5, rtol=0)
    flipped = make_views(x, 4, scale=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(flipped[:, 1:], x.flip(-1).unsqueeze(1).expand(-1, 3, -1, -1, -1),
                               atol=1e-5, rtol=0)
    # small crops magnify: neighbouring pixels of a view are closer than in the image
    zoomed = make_views(x, 9, scale=(0.1, 0.1), flip_p=0.0)[:, 1:]
    assert zoomed.diff(dim=-1).abs().mean() < 0.5 * x.diff(dim=-1).abs().mean()


def test_crops_that_fit_nowhere_fall_back_to_torchvisions_centred_crop():
    # Aspect 8 with scale (1, 1): no box within the 3/4..4/3 ratios fits, so every
    # crop is torchvision's fallback, the 4/3-wide box centred in the image.
    x = torch.arange(64.0).view(1, 1, 1, 64).expand(16, 3, 8, 64).contiguous()
    crops = random_resized_crops(x, scale=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(crops, crops[:1].expand_as(crops))  # no random offset
    torch.testing.assert_close(crops[:, 0].mean(), torch.tensor(31.5), atol=1e-4, rtol=0)  # centred


def test_selection_and_marginal_entropy_match_a_hand_computation():
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 10, 4)
    chosen = select_confident(logits, 0.3)
    assert chosen.shape == (2, 3)
    for b in range(2):
        entropies = []
        for n in range(10):
            p = [math.exp(v) for v in logits[b, n].tolist()]
            p = [v / sum(p) for v in p]
            entropies.append(-sum(v * math.log(v) for v in p))
        assert chosen[b].tolist() == sorted(range(10), key=entropies.__getitem__)[:3]
    assert select_confident(logits, 0.1).shape == (2, 1)  # int(10 * 0.1)
    assert select_confident(logits[:, :5], 0.1).shape == (2, 1)  # at least one view
    picked = gather_views(logits, chosen)
    assert torch.equal(picked[1, 2], logits[1, chosen[1, 2]])
    mean_p = picked.softmax(-1).mean(dim=1)
    torch.testing.assert_close(marginal_entropy(picked), -(mean_p * mean_p.log()).sum(-1))


# ----------------------------------------------------------------------------------
# TPT
# ----------------------------------------------------------------------------------


def test_tpt_adapts_only_the_context_and_resets_bit_exact(images):
    model = tiny_clip()
    adapted = tta.wrap(model, "tpt", num_views=16)
    assert model.ctx is not None  # TPT set up the learnable prompt
    source = state(adapted)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["ctx"]
    torch.manual_seed(0)
    first = adapted(images[:1])
    assert changed(source, state(adapted)) == {"model.ctx"}
    assert adapted.optimizer.state
    adapted.reset()
    assert not changed(source, state(adapted)) and not adapted.optimizer.state
    # episodic: every image starts from the initial prompt, whatever came before
    adapted(images[1:])
    torch.manual_seed(0)
    assert torch.equal(adapted(images[:1]), first)


def test_one_tpt_step_lowers_the_marginal_entropy_of_the_selected_views(images):
    model = tiny_clip()
    adapted = tta.wrap(model, "tpt", num_views=32)
    torch.manual_seed(1)
    features, index, _ = adapted.select_views(images[:1])
    selected = gather_views(features, index)[0]
    assert selected.shape == (3, 32)  # int(32 * 0.1) views
    with torch.no_grad():
        before = marginal_entropy(model.logits(selected))
    torch.manual_seed(1)
    out = adapted(images[:1])  # draws the same views
    torch.testing.assert_close(adapted.last_record.loss, before)
    with torch.no_grad():
        after = marginal_entropy(model.logits(selected))
        assert after < before
        # the prediction is the image's own with the tuned prompt
        torch.testing.assert_close(out, model(images[:1]))


# ----------------------------------------------------------------------------------
# RLCF
# ----------------------------------------------------------------------------------


def test_clip_reward_matches_a_hand_computation():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]]), dim=-1)
    text = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1)
    classes = torch.tensor([[0, 1, 3], [2, 1, 3]])
    s = 1 / math.sqrt(2)
    expected = 2.5 * torch.tensor([[1.0, 0.0, s], [0.0, 0.8, max(0.6 * s + 0.8 * s, 0)]])
    torch.testing.assert_close(clip_reward(image, text, classes), expected)


def test_reinforce_loss_subtracts_the_mean_reward_per_view():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    classes = candidate_classes(logits.detach(), 3, "topk")
    assert torch.equal(classes, logits.detach().topk(3, dim=1).indices)
    reward = torch.rand(4, 3)
    loss, advantage = reinforce_loss(logits, classes, reward)
    torch.testing.assert_close(advantage.mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    log_p = logits.log_softmax(1)
    hand = -sum((reward[v, j] - reward[v].mean()) * log_p[v, classes[v, j]]
                for v in range(4) for j in range(3)) / 12
    torch.testing.assert_close(loss, hand)
    # a reward that is the same for every candidate of a view teaches nothing
    flat, _ = reinforce_loss(logits, classes, reward[:, :1].expand(-1, 3))
    (grad,) = torch.autograd.grad(flat, logits)
    assert grad.abs().max() < 1e-6
    drawn = candidate_classes(logits.detach(), 3, "sample")
    assert drawn.shape == (4, 3) and all(len(set(row)) == 3 for row in drawn.tolist())


@pytest.mark.parametrize("adapt", ["prompt", "image", "image_norm"])
def test_rlcf_adapts_only_the_chosen_parameters(adapt, images):
    model, reward = tiny_clip(), with_agreeing_texts(tiny_clip(seed=1), images)
    reward_before = state(reward)
    adapted = tta.wrap(model, "rlcf", reward=reward, adapt=adapt, num_views=32, steps=2,
                       lr=None if adapt == "prompt" else 1e-3)
    assert adapted.reward_model is reward
    visual = {f"clip.visual.{n}" for n, _ in model.clip.visual.named_parameters()}
    norms = {f"clip.visual.{n}" for n, _ in select_norm_params(model.clip.visual)}
    expected = {"prompt": {"ctx"}, "image": visual, "image_norm": norms}[adapt]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    source = state(model)
    adapted(images[:1])
    assert adapted.last_record.to_dict()["loss"] != 0
    moved = changed(source, state(model))
    assert moved and moved <= expected
    if adapt != "image":
        assert moved == expected
    assert not changed(reward_before, state(reward))
    assert not any(p.requires_grad for p in reward.parameters())
    adapted.reset()
    assert not changed(source, state(model))
    assert adapted.optimizer.param_groups[0]["lr"] == (7e-3 if adapt == "prompt" else 1e-3)


def test_rlcf_reward_by_name_or_copy_and_its_checks(images):
    model = tiny_clip()
    by_name = tta.wrap(model, "rlcf", reward=f"clip:{TINY}", num_views=8)
    assert isinstance(by_name.reward_model, CLIPClassifier)
    assert by_name.reward_model.classnames == CLASSES and by_name.reward_model.ctx is None
    assert by_name(images).shape == (2, 5)
    assert tta.wrap(tiny_clip(), "rlcf", reward=None, num_views=8)(images).shape == (2, 5)
    with pytest.raises(ValueError, match="class names"):
        tta.wrap(tiny_clip(), "rlcf", reward=tiny_clip(classnames=CLASSES[:4]))
    policy = tiny_clip()
    with pytest.raises(ValueError, match="policy itself"):
        tta.wrap(policy, "rlcf", reward=policy)
    with pytest.raises(ValueError, match="adapt"):
        tta.wrap(tiny_clip(), "rlcf", reward=None, adapt="text")
    with pytest.raises(ValueError, match=r"sample_k must be an integer in \[2, 5\].*got 1"):
        tta.wrap(tiny_clip(), "rlcf", reward=None, sample_k=1)  # one candidate: no advantage


def test_rlcf_reward_follows_the_policys_class_names(images):
    policy = tiny_clip()
    method = tta.wrap(policy, "rlcf", reward=None, num_views=8)
    for names in (CLASSES[:3], CLASSES + ["owl", "lynx", "heron"]):
        policy.set_classnames(names)
        assert method(images).shape == (2, len(names))
        assert method.reward_model.classnames == names
    policy.set_classnames(CLASSES[:2])
    with pytest.raises(ValueError, match="sample_k=3 candidates, but the policy now has 2 classes"):
        method(images)


@pytest.mark.parametrize("name, kwargs", [
    ("tpt", {}), ("rlcf", {"reward": None, "ema": True, "ema_every": 1}),
])
def test_reset_every_counts_from_each_reset(name, kwargs, images):
    method = tta.wrap(tiny_clip(), name, num_views=8, reset_every=3, **kwargs)
    resets, reset = [], method.reset
    method.reset = lambda: (resets.append(method.num_updates), reset())
    for _ in range(7):
        method(images)
    assert resets == [3, 3] and method.num_updates == 1


@pytest.mark.parametrize("name, kw", [("tpt", {}), ("vte", {}), ("rlcf", {"reward": None}), ("ttrv", {})])
def test_compile_is_refused_where_only_the_encoders_run(name, kw, images):
    with pytest.raises(TypeError, match="never its forward.*'compile' would change nothing"):
        tta.wrap(tiny_clip(), name, compile=True, **kw)
    adapt = "image" if name in ("rlcf", "ttrv") else None  # the image encoder adapts through the forward
    if adapt is not None:
        kw = {**kw, "num_views": 4} if name == "rlcf" else {"num_samples": 4, "num_train_samples": 2}
        method = tta.wrap(tiny_clip(), name, compile="eager", adapt=adapt, **kw)
        assert method.compiled and method(images).shape == (2, 5)


def test_a_refused_clip_wrap_keeps_the_classifiers_templates(images):
    model = tiny_clip(templates="clip7")
    with torch.no_grad():
        before = model(images)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="lr"):
        tta.wrap(model, "rlcf", reward=None, lr=-1.0)  # refused after use_prompt
    assert model.ctx is None and len(model.templates) == 7
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(model(images), before)


# ----------------------------------------------------------------------------------
# Other models, other methods
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tpt", "rlcf"])
def test_clip_methods_refuse_other_models(name):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(TypeError, match="CLIP classifier"):
        tta.wrap(model, name)


def test_clip_methods_declare_what_they_need():
    needs = {n: getattr(tta.methods.method_class(n), "requires", None) for n in tta.list_methods()}
    assert {n for n, r in needs.items() if r == "clip"} == {"tpt", "rlcf", "vte"}
    assert tta.method_defaults("tpt")["lr"] == 5e-3 and tta.method_defaults("rlcf")["sample_k"] == 3


def test_tent_on_clip_changes_only_image_layernorm_affines(images):
    model = tiny_clip()
    source = state(model)
    adapted = tta.wrap(model, "tent", lr=1e-2)
    names = {n for n, _ in adapted.adapted}
    assert any(".ln_" in n for n in names) and all(n.endswith((".weight", ".bias")) for n in names)
    for _ in range(2):
        adapted(images)
    moved = changed(source, state(model))
    visual_norms = {f"clip.visual.{n}" for n, _ in select_norm_params(model.clip.visual)}
    # the fixed text head takes no gradient: only the image encoder's LayerNorms move
    assert moved == visual_norms
    adapted.reset()
    assert not changed(source, state(model))


@pytest.mark.parametrize("name", ["tpt", "rlcf"])
def test_a_float64_clip_takes_float64_images_beside_its_float32_prompt(name, images):
    model = tiny_clip().double()
    method = tta.wrap(model, name, num_views=8, **({"reward": None} if name == "rlcf" else {}))
    assert model.ctx.dtype == torch.float32  # learned in float32, first among the parameters
    assert torch.isfinite(method(images)).all()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["tpt", "rlcf"])
def test_clip_methods_adapt_under_no_grad_and_inference_mode(name, context, images):
    kw = dict(num_views=16) if name == "tpt" else dict(num_views=16, reward=tiny_clip(1))
    expected_method = tta.wrap(tiny_clip(), name, **kw)
    torch.manual_seed(0)
    expected = expected_method(images)
    method = tta.wrap(tiny_clip(), name, **kw)
    torch.manual_seed(0)
    with context():
        got = method(images.clone())
    assert torch.equal(expected, got)


@pytest.mark.parametrize("name, option", [("tpt", "steps"), ("rlcf", "ema_every")])
def test_counts_given_as_booleans_are_refused(name, option):
    """True is an int to Python: steps=True ran as one step where a switch was meant."""
    with pytest.raises(ValueError, match=f"{option} must be a positive integer, got True"):
        tta.wrap(tiny_clip(), name, **{option: True})
