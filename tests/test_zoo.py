"""The offline model zoo: ``tta.load_model("zoo:<name>")``, checksums, clear errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tta
from tta.models import zoo
from tta.paths import sha256_of

NAME = "resnet20_bn_jpeg"
BUNDLED_CKPT = zoo.bundled_dir() / f"{NAME}.pt"
needs_checkpoint = pytest.mark.skipif(
    not BUNDLED_CKPT.is_file(), reason=f"{BUNDLED_CKPT} not trained yet (benchmarks/zoo/train.py)"
)


@needs_checkpoint
def test_zoo_resnet20_loads_with_manifest_sha_and_scores(cifar_test_images):
    info = zoo.zoo_info(NAME)
    assert sha256_of(BUNDLED_CKPT) == info["sha256"]
    assert info["architecture"] == "cifar_resnet20" and info["clean_accuracy"] >= 88
    assert BUNDLED_CKPT.stat().st_size < 8e6
    model = tta.load_model(f"zoo:{NAME}")
    assert not model.training and model.num_classes == 10 and model.input_size == (32, 32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x, y = cifar_test_images
    with torch.no_grad():
        acc = (model(x[:1000]).argmax(1) == y[:1000]).float().mean().item()
    assert acc >= 0.87  # 88.4% measured; a margin for other BLAS builds
    assert f"zoo:{NAME}" in tta.list_models("zoo:*")


@needs_checkpoint
def test_tampered_checkpoint_is_refused_by_checksum(tmp_path):
    data = bytearray(BUNDLED_CKPT.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor data
    bad = tmp_path / f"{NAME}.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        tta.load_model(f"zoo:{NAME}", weights=bad)


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(KeyError, match=NAME):
        tta.load_model("zoo:resnet20_bn_jepg")


def test_missing_checkpoint_says_where_it_looked(fake_home):
    with pytest.raises(FileNotFoundError) as err:
        tta.load_model(f"zoo:{NAME}")
    msg = str(err.value)
    assert str(fake_home / "models" / "zoo" / f"{NAME}.pt") in msg
    assert str(fake_home / "no-bundled-zoo" / f"{NAME}.pt") in msg and NAME in msg


@pytest.fixture(scope="module")
def shared_resnet20():
    return tta.load_model("cifar10_resnet20")  # before fake_home changes TTA_HOME


def test_tta_home_checkpoint_with_manifest(shared_resnet20, fake_home, cifar_test_images):
    """Self-contained: an fp16 export of the shared ResNet-20 under $TTA_HOME/models/zoo
    (as the training script writes it) loads as float32, checked against its manifest."""
    home = fake_home / "models" / "zoo"
    home.mkdir(parents=True)
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in shared_resnet20.backbone.state_dict().items()}
    path = home / f"{NAME}.pt"
    torch.save(state, path)
    manifest = {"format": 1, "models": {NAME: {
        "file": path.name, "sha256": sha256_of(path), "architecture": "cifar_resnet20"}}}
    (home / "manifest.json").write_text(json.dumps(manifest))
    assert f"zoo:{NAME}" in tta.list_models("zoo:*")
    model = tta.load_model(f"zoo:{NAME}")
    x = cifar_test_images[0][:64]
    with torch.no_grad():
        assert torch.allclose(model(x), shared_resnet20(x), atol=0.05)
    # the same file, one flipped bit: refused unless verify=False
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = fake_home / "tampered.pt"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        tta.load_model(f"zoo:{NAME}", weights=tampered)
    shutil.copy(path, fake_home / "copy.pt")
    tta.load_model(f"zoo:{NAME}", weights=fake_home / "copy.pt")


def test_manifest_names_every_input_by_a_sha_from_its_history():
    """Zoo models start from (or distil from) one another; each record names those
    inputs by sha256, which must be a version the zoo has had: the input's current
    checkpoint or one of its earlier stages, or the shared CIFAR ResNet file."""
    models = json.loads((zoo.bundled_dir() / "manifest.json").read_text())["models"]

    def versions(name: str) -> set[str]:
        info = models[name]
        return {info["sha256"]} | {stage["sha256"] for stage in info.get("previous_stages", [])}

    for name, info in models.items():
        for record in [info, *info.get("previous_stages", [])]:
            assert record.get("inputs"), f"{name}: no inputs recorded"
            for source, sha in record["inputs"].items():
                if source.startswith("zoo:"):
                    assert sha in versions(source.removeprefix("zoo:")), (name, source)
                else:
                    depth = int(source.removeprefix("cifar10_resnet"))
                    assert sha == sha256_of(tta.models.cifar_resnet_weights(depth)), (name, source)


REPO = Path(__file__).resolve().parents[1]


def test_train_options_override_add_to_or_are_refused_by_an_entry():
    from benchmarks.zoo import train  # the repository root is on pytest's pythonpath

    def hp(*argv: str) -> dict:
        return train.resolve_hparams(argv[0], train.make_parser().parse_args(argv))

    assert hp("resnet26_gn") == train.ZOO["resnet26_gn"].defaults
    assert hp("resnet26_gn", "--lr", "0.01")["lr"] == 0.01
    gn = hp("resnet26_gn", "--teacher", "zoo:resnet20_bn_jpeg", "--label-smoothing", "0.1")
    assert gn["teacher"] == "zoo:resnet20_bn_jpeg" and gn["distill_weight"] == 0.5
    assert gn["label_smoothing"] == 0.1
    assert hp("resnet26_gn", "--teacher", "zoo:x", "--distill-weight", "0.8")["distill_weight"] == 0.8
    with pytest.raises(SystemExit, match="--patch-drop does not apply to resnet26_gn") as refused:
        hp("resnet26_gn", "--patch-drop", "0.5")
    assert "--teacher, --teacher-targets, --label-smoothing" in str(refused.value)  # what it does take
    with pytest.raises(SystemExit, match="--distill-weight does not apply"):
        hp("resnet20_bn_jpeg", "--distill-weight", "0.5")  # no teacher to weigh
    with pytest.raises(SystemExit, match="clip_small trains contrastively"):
        hp("clip_small", "--teacher", "zoo:resnet20_bn_jpeg")
    ensemble = hp("resnet20_bn_jpeg", "--teacher", "zoo:a", "zoo:b", "--teacher-targets", "fixed")
    assert ensemble["teacher"] == ["zoo:a", "zoo:b"] and ensemble["teacher_targets"] == "fixed"
    assert train.teacher_names(ensemble["teacher"]) == ["zoo:a", "zoo:b"]
    assert train.teacher_names(gn["teacher"]) == ["zoo:resnet20_bn_jpeg"]
    assert hp("vit_tiny_ln", "--teacher-targets", "fixed")["teacher_targets"] == "fixed"  # its own teacher
    with pytest.raises(SystemExit, match="resnet26_gn has no teacher"):
        hp("resnet26_gn", "--teacher-targets", "fixed")


def test_fixed_teacher_targets_are_flip_averaged_probabilities():
    from benchmarks.zoo import train  # the repository root is on pytest's pythonpath
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))

    class Teacher(torch.nn.Module):
        def forward(self, x):
            return linear(x).softmax(1)

    x = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        targets = train.fixed_teacher_targets(Teacher(), x, batch_size=3)  # batches of 3, 3, 1
        xf = x.float() / 255
        expected = (linear(xf).softmax(1) + linear(xf.flip(3)).softmax(1)) / 2
        assert torch.allclose(targets, expected, atol=1e-6)
        assert torch.allclose(train.fixed_teacher_targets(Teacher(), x.flip(3)), targets, atol=1e-6)
        assert not torch.allclose(linear(xf).softmax(1), expected, atol=1e-3)  # the flip matters


@needs_checkpoint
def test_mean_softmax_teacher_averages_its_members(cifar_test_images):
    from benchmarks.zoo import train  # the repository root is on pytest's pythonpath
    x = cifar_test_images[0][:16]
    one = train.MeanSoftmax([f"zoo:{NAME}"])
    both = train.MeanSoftmax([f"zoo:{NAME}", "cifar10_resnet20"])
    with torch.no_grad():
        p20 = tta.load_model("cifar10_resnet20").eval()(x).softmax(1)
        assert torch.allclose(one(x).sum(1), torch.ones(16), atol=1e-5)
        assert torch.allclose(both(x), (one(x) + p20) / 2, atol=1e-5)
    assert not both(x).requires_grad  # a target, never a path for the student's gradient


def test_ensemble_table_scores_every_subset_alone_and_flip_averaged():
    from benchmarks.zoo import ensemble

    y = torch.tensor([0, 1, 0, 1])
    t = torch.tensor
    table = {  # name -> (softmax on the images, softmax on their mirror images)
        "a": (t([[.9, .1], [.1, .9], [.4, .6], [.6, .4]]),) * 2,  # right on images 0 and 1
        "b": (t([[.3, .7], [.7, .3], [.8, .2], [.6, .4]]),  # right on image 2 ...
              t([[.3, .7], [.7, .3], [.8, .2], [.1, .9]])),  # ... and on image 3's mirror
        "c": (t([[.55, .45]] * 4),) * 2,  # always class 0
    }
    rows = {names: (alone, flipped) for names, alone, flipped in ensemble.ensemble_table(table, y)}
    assert list(rows)[:3] == [("a",), ("b",), ("c",)] and len(rows) == 7
    assert rows[("a",)] == (50.0, 50.0)
    assert rows[("b",)] == (25.0, 50.0)
    assert rows[("c",)] == (50.0, 50.0)
    assert rows[("a", "b")] == (75.0, 100.0)  # image 3: a [.6, .4] with b's flip average [.35, .65]
    md = ensemble.markdown(ensemble.ensemble_table(table, y))
    assert "| `a` + `b` |" in md and "| all 3 |" in md and md.count("\n") == 8


def test_train_refuses_an_inapplicable_option_before_any_work():
    out = subprocess.run([sys.executable, "-m", "benchmarks.zoo.train", "vit_tiny_ln", "--image-lr", "1e-4"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode != 0 and "--image-lr does not apply to vit_tiny_ln" in out.stderr


def test_swa_schedule_holds_its_lr_after_the_cosine():
    from benchmarks.zoo.optim import make_scheduler

    def lrs(total: int, warmup: int, **kw) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, total, warmup, **kw)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    plain = lrs(20, 4)
    assert plain[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and plain[-1] < 0.01  # warm-up, cosine to 0
    swa = lrs(20, 4, hold_from=12, hold=0.3)
    assert swa[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(swa[4:12], swa[5:12])) and swa[11] > 0.3  # cosine down towards 0.3 ...
    assert swa[12:] == pytest.approx([0.3] * 8)  # ... held there while the weights are averaged
    assert lrs(10, 4, hold_from=0, hold=0.5)[:5] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])


def test_swa_model_is_the_mean_of_its_snapshots_with_fresh_batchnorm_statistics():
    from torch.optim.swa_utils import AveragedModel

    from benchmarks.zoo.optim import swa_model
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    average = AveragedModel(net)
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append([p.detach().clone() for p in net.parameters()])
        average.update_parameters(net)
    batches = [torch.randn(8, 3, 5, 5) * 2 + 1 for _ in range(3)]
    model = swa_model(average, batches)
    for p, *seen in zip(model.parameters(), *snapshots):
        torch.testing.assert_close(p, torch.stack(seen).mean(0))
    assert not model.training
    with torch.no_grad():
        features = [model[0](b) for b in batches]  # the averaged conv's output on each batch
    # an equal-weight mean over the batches, of their means and their (unbiased) variances
    torch.testing.assert_close(model[1].running_mean, torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack([f.var((0, 2, 3)) for f in features]).mean(0))


def test_swa_options_are_checked_and_default_to_half_the_lr():
    from benchmarks.zoo import train  # the repository root is on pytest's pythonpath

    def hp(*argv: str) -> dict:
        return train.resolve_hparams(argv[0], train.make_parser().parse_args(argv))

    swa = hp("resnet20_bn_jpeg", "--epochs", "12", "--lr", "0.04", "--swa-epochs", "12")
    assert swa["swa_epochs"] == 12 and swa["swa_lr"] == 0.02
    assert hp("resnet26_gn", "--swa-epochs", "3", "--swa-lr", "0.01")["swa_lr"] == 0.01
    with pytest.raises(SystemExit, match="give --swa-epochs too"):
        hp("resnet20_bn_jpeg", "--swa-lr", "0.01")
    with pytest.raises(SystemExit, match="between 1 and the run's 10 epochs"):
        hp("resnet20_bn_jpeg", "--swa-epochs", "11")
    with pytest.raises(SystemExit, match="clip_base trains contrastively"):
        hp("clip_base", "--swa-epochs", "2")
