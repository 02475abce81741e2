"""Training data: images held in memory as uint8, random crops with flips and 90-degree rotations, and
fresh white Gaussian noise per sample; everything drawn from one torch.Generator so a run can resume exactly."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .imageio import ImageData, decode_image, quantize, read_image, to_channels
from .paths import image_files


class DataError(Exception):
    """Training or evaluation input (images, a pack, a checkpoint) that cannot be used; one line for the user."""


def to_uint8(image: ImageData, channels: int) -> np.ndarray:
    """(H, W, channels) uint8 of a read image, the field's 8-bit convention: 16-bit samples rounded to 8 bits,
    alpha dropped, channels matched to the model by `imageio.to_channels` (RGB -> 8-bit luma for gray)."""
    return quantize(to_channels(image.pixels, channels), 8)


def read_pack(path: Path) -> dict[str, bytes]:
    """A pack written by scripts/pack_data.py: file name -> the file's original encoded bytes."""
    if path.suffix != ".npz":
        raise DataError(f"{path}: give a folder of images or an .npz pack from scripts/pack_data.py")
    try:
        with np.load(path, allow_pickle=False) as pack:
            return {name: pack[name].tobytes() for name in sorted(pack.files)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz pack ({err or type(err).__name__})") from None


def load_images(source: Path, channels: int) -> list[Tensor]:
    """Every image of a folder or of a .npz pack as a (channels, H, W) uint8 tensor; raises ImageError for
    an unreadable image and DataError for no images."""
    if source.is_file():
        images = [decode_image(data, f"{source}:{name}") for name, data in read_pack(source).items()]
    else:
        images = [read_image(path) for path in image_files(source)]
    if not images:
        raise DataError(f"no images found in {source}")
    return [torch.from_numpy(to_uint8(image, channels)).permute(2, 0, 1).contiguous() for image in images]


def augment(crop: Tensor, code: int) -> Tensor:
    """One of the 8 flips/rotations of a (C, h, w) square crop: code in 0..7."""
    if code & 4:
        crop = crop.flip(-1)
    return torch.rot90(crop, code & 3, dims=(-2, -1))


def sigma_quantile(u: Tensor, lo: float, hi: float, low_share: float = 0.5) -> Tensor:
    """Sigmas for uniform draws u in [0, 1): uniform on each half of [lo, hi], with `low_share` of them in the
    lower half (0.5: uniform on the whole range), so that training can dwell on the low noise levels."""
    if low_share == 0.5:  # the plain formula, so that runs from before the option draw the same sigmas
        return lo + (hi - lo) * u
    mid = (lo + hi) / 2
    low = lo + (mid - lo) * (u / low_share)
    high = mid + (hi - mid) * ((u - low_share) / (1.0 - low_share))
    return torch.where(u < low_share, low, high)


class CropSampler:
    """Draws batches of (noisy, clean, sigma) crops from in-memory uint8 images.

    Sigma is drawn in [sigma_min, sigma_max] on the [0, 1] scale by `sigma_quantile`, the noise is fresh
    every sample, and the generator's state is the whole sampler state (`state_dict` / `load_state_dict`).
    """

    def __init__(
        self, images: list[Tensor], crop: int, sigma_range: tuple[float, float], seed: int, low_share: float = 0.5
    ) -> None:
        small = [tuple(img.shape[-2:]) for img in images if min(img.shape[-2:]) < crop]
        if small:
            raise DataError(f"crop {crop} is larger than {len(small)} image(s), e.g. one of size {small[0]}; use a smaller --crop")
        self.images = images
        self.crop = crop
        self.sigma_range = sigma_range
        self.low_share = low_share
        self.generator = torch.Generator().manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def _crop(self) -> Tensor:
        img = self.images[self._randint(len(self.images))]
        H, W = img.shape[-2:]
        i, j = self._randint(H - self.crop + 1), self._randint(W - self.crop + 1)
        return augment(img[:, i : i + self.crop, j : j + self.crop], self._randint(8))

    def batch(self, size: int) -> tuple[Tensor, Tensor, Tensor]:
        """noisy (B, C, crop, crop) float32, clean likewise, sigma (B,) -- all on the CPU."""
        clean = torch.stack([self._crop() for _ in range(size)]).float().div_(255.0)
        lo, hi = self.sigma_range
        sigma = sigma_quantile(torch.rand(size, generator=self.generator), lo, hi, self.low_share)
        noise = torch.randn(clean.shape, generator=self.generator) * sigma[:, None, None, None]
        return clean + noise, clean, sigma

    def reseed(self, seed: int) -> None:
        """Start a new stream of batches (after a backtrack, so that the same batches are not replayed)."""
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
