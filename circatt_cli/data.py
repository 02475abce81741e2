"""Training data: images held in memory as uint8, random crops with flips and 90-degree rotations, and
fresh white Gaussian noise per sample; everything drawn from one torch.Generator so a run can resume exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .imageio import is_supported

LUMA = (0.299, 0.587, 0.114)


def to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an (H, W, 3) uint8 image, rounded back to uint8 (as BSD68 was made from CBSD68)."""
    y = rgb.astype(np.float64) @ np.asarray(LUMA)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def decode(data: bytes | Path, channels: int) -> np.ndarray:
    """Read one image (file path or encoded bytes) as (H, W, channels) uint8; gray -> luma, gray -> RGB copies."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as img:
        rgb = np.array(img.convert("RGB"))
    if channels == 1:
        return to_luma(rgb)[..., None]
    return rgb


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_supported(p))


def read_pack(path: Path) -> dict[str, bytes]:
    """A pack written by scripts/pack_data.py: file name -> the file's original encoded bytes."""
    with np.load(path, allow_pickle=False) as pack:
        return {name: pack[name].tobytes() for name in sorted(pack.files)}


def load_images(source: Path, channels: int) -> list[Tensor]:
    """Every image of a folder or of a .npz pack as a (channels, H, W) uint8 tensor."""
    if source.is_file():
        encoded = list(read_pack(source).values())
    else:
        encoded = [p.read_bytes() for p in image_files(source)]
    if not encoded:
        raise ValueError(f"no images found in {source}")
    return [torch.from_numpy(decode(data, channels)).permute(2, 0, 1).contiguous() for data in encoded]


def augment(crop: Tensor, code: int) -> Tensor:
    """One of the 8 flips/rotations of a (C, h, w) square crop: code in 0..7."""
    if code & 4:
        crop = crop.flip(-1)
    return torch.rot90(crop, code & 3, dims=(-2, -1))


class CropSampler:
    """Draws batches of (noisy, clean, sigma) crops from in-memory uint8 images.

    Sigma is uniform in [sigma_min, sigma_max] on the [0, 1] scale, the noise is fresh every sample,
    and the generator's state is the whole sampler state (`state_dict` / `load_state_dict`).
    """

    def __init__(self, images: list[Tensor], crop: int, sigma_range: tuple[float, float], seed: int) -> None:
        small = [tuple(img.shape[-2:]) for img in images if min(img.shape[-2:]) < crop]
        if small:
            raise ValueError(f"crop {crop} is larger than {len(small)} image(s), e.g. one of size {small[0]}")
        self.images = images
        self.crop = crop
        self.sigma_range = sigma_range
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
        sigma = lo + (hi - lo) * torch.rand(size, generator=self.generator)
        noise = torch.randn(clean.shape, generator=self.generator) * sigma[:, None, None, None]
        return clean + noise, clean, sigma

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
