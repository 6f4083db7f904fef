"""What only a CUDA GPU can check: methods on the GPU against the CPU, fp16 autocast
with its gradient scaler, and a tta-bench run whose batches come from the tensor
cache on the GPU or through DataLoader workers and pinned memory.

Every test is marked ``cuda``: skipped without a GPU (tests/conftest.py),
selected by ``pytest -m cuda``, run by ``benchmarks/gpu_check.py`` on a GPU
machine. They use the shared ResNet-20 and CIFAR-10 images (seconds each).
"""

from __future__ import annotations

import pytest
import torch

import tta

pytestmark = pytest.mark.cuda


def _logits(method: str, x: torch.Tensor, steps: int = 2, **options) -> torch.Tensor:
    torch.manual_seed(0)
    adapted = tta.wrap(tta.load_model("cifar10_resnet20").to(x.device), method, preset="cifar10", **options)
    for _ in range(steps):
        out = adapted(x)
    return out.float().cpu()


@pytest.mark.parametrize("method", ["norm", "tent", "eta", "sar"])
def test_a_method_on_the_gpu_adapts_as_on_the_cpu(method, noisy_batch):
    """The same steps on both devices: the second step's logits agree (cuDNN's and
    oneDNN's float32 arithmetic differ in the last bits only)."""
    cpu, gpu = _logits(method, noisy_batch), _logits(method, noisy_batch.cuda())
    assert (cpu.argmax(1) == gpu.argmax(1)).float().mean() > 0.95
    assert torch.allclose(cpu, gpu, atol=0.05 * cpu.abs().max().item())


@pytest.mark.parametrize("method", ["tent", "sar", "deyo"])
def test_fp16_autocast_with_its_gradient_scaler_adapts_like_float32(method, noisy_batch):
    x = noisy_batch.cuda()
    full = _logits(method, x, steps=3, lr=1e-2)
    torch.manual_seed(0)
    half_method = tta.wrap(tta.load_model("cifar10_resnet20").cuda(), method, preset="cifar10", lr=1e-2, amp="fp16")
    for _ in range(3):
        half = half_method(x)
    assert half_method.scaler is not None and half.dtype == torch.float32
    assert (full.argmax(1) == half.float().cpu().argmax(1)).float().mean() > 0.85


@pytest.mark.parametrize("method", ["tent", "deyo"])
def test_bf16_and_channels_last_on_the_gpu(method, noisy_batch):
    x = noisy_batch.cuda()
    full = _logits(method, x, lr=1e-2)
    fast = _logits(method, x, lr=1e-2, amp="bf16", channels_last=True)
    assert (full.argmax(1) == fast.argmax(1)).float().mean() > 0.85


def test_bench_on_the_gpu_gives_the_cpu_errors_from_cache_and_dataloader(tmp_path):
    """A tta-bench run on cuda reads the same batches from the tensor cache (on the
    GPU) and from DataLoader workers with pinned memory, and scores as on the CPU."""
    from benchmarks.upsampled_images import write_imagenet_c_tree
    from tta.bench import compose_config, run_benchmark

    root = tmp_path / "ImageNet-C"
    write_imagenet_c_tree(root, ["fog", "contrast"], per_class=4, size=32, wnids=False)
    base = ["data=imagenetc", f"data.root={root}", "data.corruptions=[fog,contrast]", "data.num_images=null",
            "data.class_index=folder", "method=norm", "run.batch_size=8", "run.progress=false", "run.plot=false"]
    runs = {
        "cpu": ["run.device=cpu"],
        "cuda_cache": ["run.device=cuda"],
        "cuda_dataloader": ["run.device=cuda", "data.cache_mb=0", "data.num_workers=2"],
    }
    results = {name: run_benchmark(compose_config(base + extra), tmp_path / name) for name, extra in runs.items()}
    assert [results[k]["loader"] for k in runs] == ["tensor_cache", "tensor_cache", "dataloader"]
    assert results["cuda_cache"]["error"] == results["cuda_dataloader"]["error"]
    # 40 images per domain: the devices may disagree on an image whose top two
    # logits tie to float32 precision, not more.
    for domain, err in results["cpu"]["error"].items():
        assert abs(results["cuda_cache"]["error"][domain] - err) <= 100 / 40 + 1e-6
    assert results["cuda_cache"]["mean_error"] < 90  # the shared ResNet-20 sees the classes it knows
