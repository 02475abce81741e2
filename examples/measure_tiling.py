"""Measure how far tiled GroupCDL output is from the untiled one, as a function of the tile margin.

    python examples/measure_tiling.py [--preset gray|color|tiny] [--weights FILE] [--size 384] [--tile 128]

Prints one line per margin: the max and mean absolute difference on the [0, 1] scale, and the max
in 8-bit levels. The image is scikit-image's astronaut (gray for gray models) with AWGN of sigma 25.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from circatt_cli.model import GroupCDL, GroupCDLConfig
from circatt_cli.tiling import run_tiled

TINY = GroupCDLConfig(channels=1, iterations=5, filters=16, attn_channels=8, window=7)


def test_image(channels: int, size: int, sigma: float, seed: int = 0) -> torch.Tensor:
    """(1, C, size, size) noisy crop of the astronaut (or a synthetic pattern without scikit-image)."""
    try:
        from skimage import data

        rgb = data.astronaut()[:size, 100 : 100 + size].astype(np.float32) / 255
    except ImportError:
        yy, xx = np.mgrid[:size, :size] / size
        rgb = np.stack([np.sin(9 * xx) * 0.4 + 0.5, (xx + yy) / 2, ((xx * 8).astype(int) % 2) * 0.6 + 0.2], -1)
    img = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float()
    if channels == 1:
        img = (img * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    return img + torch.randn(img.shape, generator=g) * sigma / 255


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--weights")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--margins", default="0,8,16,32,48,64,96,128")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.weights:
        from circatt_cli.weights import load_model

        model = load_model(args.weights, args.device)
    else:
        torch.manual_seed(0)
        model = GroupCDL(TINY if args.preset == "tiny" else GroupCDLConfig.preset(args.preset)).to(args.device)
    model.eval()
    y = test_image(model.config.channels, args.size, 25.0).to(args.device)
    sigma = torch.tensor([25 / 255], device=args.device)
    print(f"model {args.weights or args.preset}: receptive field bound {model.receptive_field} px; "
          f"image {args.size}x{args.size}, tile {args.tile}, device {args.device}")
    with torch.inference_mode():
        start = time.perf_counter()
        ref = model(y, sigma)
        print(f"untiled: {time.perf_counter() - start:.2f} s, output range [{ref.min():.3f}, {ref.max():.3f}]")
        for margin in (int(m) for m in args.margins.split(",")):
            start = time.perf_counter()
            mean = y.mean(dim=(1, 2, 3), keepdim=True)
            out = run_tiled(lambda t: model(t, sigma, mean=mean), y, args.tile, margin)
            d = (out - ref).abs()
            print(f"margin {margin:4d}: max {d.max():.2e}  mean {d.mean():.2e}  max {255 * d.max():.3f} / 255  "
                  f"({time.perf_counter() - start:.2f} s)")


if __name__ == "__main__":
    main()
