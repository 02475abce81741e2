"""Regenerate the example images of the README.

    python examples/make_example.py            # examples/astronaut_clean.png and astronaut_noisy.png
    python examples/make_example.py --compare  # + astronaut_before_after.png, with the shipped color model

The picture is a 256x256 crop of scikit-image's public-domain astronaut (`pip install scikit-image`,
only to run this script); without scikit-image a synthetic test card is drawn instead. The noisy
version has white Gaussian noise of sigma 25 (0-255 scale), seed 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from circatt_cli.imageio import ImageData, read_image, write_image

HERE = Path(__file__).resolve().parent
SIGMA = 25.0
SEED = 0


def clean_image() -> np.ndarray:
    """(256, 256, 3) float32 in [0, 1]."""
    try:
        from skimage import data

        return data.astronaut()[30:286, 120:376].astype(np.float32) / 255
    except ImportError:
        yy, xx = np.mgrid[:256, :256] / 256
        rings = 0.5 + 0.5 * np.cos(40 * np.hypot(xx - 0.5, yy - 0.5))
        bars = ((xx * 12).astype(int) % 2).astype(float)
        return np.stack([rings, np.where(yy < 0.5, bars, xx), yy], -1).astype(np.float32)


def save(pixels: np.ndarray, name: str) -> Path:
    path = HERE / name
    write_image(ImageData(pixels=pixels, alpha=None, bits=8, format="PNG"), path, overwrite=True)
    return path


def before_after(noisy: Path, clean: Path, out: Path) -> None:
    """Denoise with the shipped color model and draw noisy | denoised | clean with PSNRs."""
    import torch
    from matplotlib.figure import Figure

    from circatt_cli.denoise import to_pixels, to_tensor
    from circatt_cli.metrics import psnr
    from circatt_cli.weights import load_model

    y, x = read_image(noisy).pixels, read_image(clean).pixels
    model = load_model("color")
    with torch.inference_mode():
        d = np.clip(to_pixels(model(to_tensor(y, torch.device("cpu")), SIGMA / 255)), 0, 1)
    ref = to_tensor(x, torch.device("cpu"))
    fig = Figure(figsize=(12, 4.4), dpi=100)
    for ax, (title, img) in zip(fig.subplots(1, 3), (("noisy", np.clip(y, 0, 1)), ("circatt denoise", d), ("clean", x))):
        score = "" if title == "clean" else f"  {float(psnr(to_tensor(img, torch.device('cpu')), ref)[0]):.2f} dB"
        ax.imshow(img)
        ax.set_title(f"{title}{score}")
        ax.axis("off")
    fig.suptitle(f"sigma {SIGMA:g}, GroupCDL color model")
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="also draw the before/after picture")
    args = parser.parse_args()
    clean = clean_image()
    noise = np.random.default_rng(SEED).standard_normal(clean.shape).astype(np.float32) * SIGMA / 255
    clean_path = save(clean, "astronaut_clean.png")
    noisy_path = save(np.clip(clean + noise, 0, 1), "astronaut_noisy.png")
    print(f"wrote {clean_path} and {noisy_path}")
    if args.compare:
        out = HERE / "astronaut_before_after.png"
        before_after(noisy_path, clean_path, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
