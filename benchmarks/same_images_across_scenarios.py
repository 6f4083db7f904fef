"""Source error of a batch-independent model (GroupNorm `zoo:resnet26_gn`) in each
tta-bench scenario: with the same corrupted images everywhere the numbers must be
equal, whatever the order, mixing or batch size.

    TTA_HOME=../shared python -m benchmarks.same_images_across_scenarios --num-images 1000
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from tta.bench import compose_config, run_benchmark

CORRUPTIONS = "[gaussian_noise,shot_noise,impulse_noise,defocus_blur,fog,contrast,pixelate,jpeg_compression]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo_resnet26_gn")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--scenarios", default="continual,label_shift,mixed_domains")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = [f"model={args.model}", "method=source", f"data.num_images={args.num_images}", "run.device=cpu",
            "run.progress=false", "run.plot=false", f"run.num_threads={args.threads}",
            f"data.corruptions={CORRUPTIONS}"]
    rows = []
    for scenario in args.scenarios.split(","):
        with tempfile.TemporaryDirectory() as out:
            res = run_benchmark(compose_config([*over, f"scenario={scenario}"]), out)
        if not rows:
            print("| scenario | " + " | ".join(res["error"]) + " | mean |")
            print("|---|" + "---:|" * (len(res["error"]) + 1))
        rows.append(res["error"])
        print(f"| {scenario} | " + " | ".join(f"{v:.1f}" for v in res["error"].values())
              + f" | {res['mean_error']:.2f} |", flush=True)
    print("identical in every scenario:", all(r == rows[0] for r in rows))


if __name__ == "__main__":
    main()
