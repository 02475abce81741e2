"""Whether a kernel change moved the denoiser's output: run the shipped gray and color models on fixed
random images (sigma 25) and save the outputs, or compare them with a saved run (the issue's bar: 1e-4).

    python3 scripts/model_diff.py save old.pt            # with the old build first on the path
    python3 scripts/model_diff.py compare old.pt         # with the new build
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

from circatt_cli.denoise import denoiser
from circatt_cli.weights import WeightsError, load_model

SIZES = {"gray": "512x512", "color": "1080x1920"}  # H x W, as a 1920x1080 photo


def outputs(device: torch.device, sizes: dict[str, str]) -> dict[str, torch.Tensor]:
    """{preset: denoised image on the CPU} for a seeded random image of each size."""
    result = {}
    for preset, size in sizes.items():
        model = load_model(preset, device)
        h, w = (int(p) for p in size.split("x"))
        y = torch.rand(1, model.config.channels, h, w, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.inference_mode():
            result[preset] = denoiser(model, y, 25 / 255)(y).cpu()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("file", type=Path, help="the saved outputs (written by save, read by compare)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="64x64 images (a quick check, e.g. on the CPU)")
    args = parser.parse_args()
    sizes = {preset: "64x64" for preset in SIZES} if args.small else SIZES
    if args.action == "compare":
        try:
            saved = torch.load(args.file)
            saved_sizes = saved["sizes"]
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as err:
            parser.error(f"cannot read {args.file} as `model_diff.py save` output ({type(err).__name__})")
        if saved_sizes != sizes:
            parser.error(f"{args.file} holds sizes {saved_sizes}, this run {sizes}")
    try:
        now = outputs(torch.device(args.device), sizes)
    except WeightsError as err:
        parser.error(str(err))
    if args.action == "save":
        torch.save({"sizes": sizes, "outputs": now}, args.file)
        print(f"saved the outputs for {', '.join(f'{p} {s}' for p, s in sizes.items())} to {args.file}")
        return
    worst = 0.0
    for preset, out in now.items():
        diff = (out - saved["outputs"][preset]).abs().max().item()
        worst = max(worst, diff)
        print(f"{preset} {sizes[preset]}: largest |now - saved| = {diff:.3e}")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
