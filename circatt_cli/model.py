"""GroupCDL: an unrolled convolutional dictionary learning denoiser whose sparse codes are group-thresholded
over a circulant-sparse (wrapped sliding-window) attention graph, after Janjusevic et al. (2025)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import circatt_ops as ca


@dataclass(frozen=True)
class GroupCDLConfig:
    """Every hyper-parameter of a GroupCDL network; saved with the weights and restored from them."""

    channels: int = 1
    iterations: int = 30
    filters: int = 169
    attn_channels: int = 64
    kernel_size: int = 7
    stride: int = 2
    window: int = 35
    update_period: int = 5
    similarity: str = "distance"
    tau0: float = 1e-3
    rho0: float = 1.0
    gamma0: float = 0.8
    gamma_range: tuple[float, float] = (0.05, 0.95)
    rho_min: float = 0.1

    @classmethod
    def preset(cls, name: str) -> GroupCDLConfig:
        """The config of a preset of PRESETS, by name."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GroupCDLConfig:
        """Inverse of to_dict; unknown keys are an error so that a mismatched file is caught."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown GroupCDL config keys: {sorted(unknown)}")
        data = dict(data)
        if "gamma_range" in data:
            data["gamma_range"] = tuple(data["gamma_range"])
        return cls(**data)

    def update_layers(self) -> list[int]:
        """1-based iterations at which the adjacency is computed (1) or refreshed (multiples of the period)."""
        return [1] + [k for k in range(2, self.iterations + 1) if k % self.update_period == 0]


# The authors' networks by name: the one list of presets, from which the commands' choices, the shipped
# weights' file names, the bench and train take theirs.
PRESETS: dict[str, GroupCDLConfig] = {
    "gray": GroupCDLConfig(channels=1, iterations=30, filters=169, attn_channels=64),
    "color": GroupCDLConfig(channels=3, iterations=24, filters=96, attn_channels=48),
}


def preset_for(channels: int) -> str:
    """The name of the preset whose network takes images of this many channels (1 or 3)."""
    for name, config in PRESETS.items():
        if config.channels == channels:
            return name
    raise ValueError(f"no preset takes {channels}-channel images")


# The preset that eval and train use unless told otherwise: the gray network of the gray benchmarks.
DEFAULT_PRESET = preset_for(1)


def fit_window(window: int, height: int, width: int) -> int:
    """The largest odd window <= `window` that fits an (height, width) latent image."""
    side = min(window, height, width)
    return side if side % 2 == 1 else side - 1


def _unit_ball_(weight: Tensor) -> None:
    """Project every 2-D filter of a (M, C, k, k) kernel onto the unit l2 ball, in place."""
    norms = weight.flatten(2).norm(dim=-1).clamp_min(1.0)
    weight.div_(norms[..., None, None])


class GroupCDL(nn.Module):
    """GroupCDL denoiser: y (B, C, H, W) in [0, 1] and a noise level sigma on the [0, 1] scale -> x^.

    Images of any size H, W >= 1 work: they are reflect-padded to even sizes, and where the latent image
    (H/2, W/2) is smaller than the configured window, the window shrinks to the largest odd size that fits
    that image (the learned weights do not depend on the window). `init=False` skips the initialisation
    (for loading weights); `backend` is passed to circatt_ops.
    """

    def __init__(self, config: GroupCDLConfig, backend: str | None = None, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        c = config
        k, updates = c.iterations, len(c.update_layers())
        shape = (c.filters, c.channels, c.kernel_size, c.kernel_size)
        self.analysis = nn.Parameter(torch.empty(k, *shape))
        self.synthesis = nn.Parameter(torch.empty(k, *shape))
        self.dictionary = nn.Parameter(torch.empty(shape))
        self.w_alpha = nn.Parameter(torch.empty(c.attn_channels, c.filters))
        self.w_beta = nn.Parameter(torch.empty(c.filters, c.attn_channels))
        self.w_theta = nn.Parameter(torch.empty(c.attn_channels, c.filters))
        self.w_phi = nn.Parameter(torch.empty(c.attn_channels, c.filters))
        self.tau = nn.Parameter(torch.empty(k, 2, c.filters))
        self.rho = nn.Parameter(torch.empty(updates, 3, c.attn_channels))
        self.gamma = nn.Parameter(torch.empty(()))
        if init:
            self.reset_parameters()

    # ----- initialisation and constraints ------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, power_iterations: int = 100, generator: torch.Generator | None = None) -> None:
        """The authors' initialisation: one random dictionary with ||A B|| = 1 shared by every A_k, B_k and D."""
        c = self.config
        kernel = torch.empty_like(self.dictionary)
        fan = c.kernel_size * c.kernel_size
        bound = math.sqrt(6.0 / (fan * (c.channels + c.filters)))
        kernel.uniform_(-bound, bound, generator=generator)
        kernel /= self._gram_norm(kernel, power_iterations, generator).sqrt()
        self.analysis.copy_(kernel.expand_as(self.analysis))
        self.synthesis.copy_(kernel.expand_as(self.synthesis))
        self.dictionary.copy_(kernel)
        alpha = torch.rand(self.w_alpha.shape, generator=generator)
        self.w_alpha.copy_(alpha / torch.linalg.matrix_norm(alpha, ord=2))
        self.w_beta.copy_(self.w_alpha.T)
        bound = math.sqrt(6.0 / (c.filters + c.attn_channels))
        self.w_theta.uniform_(-bound, bound, generator=generator)
        self.w_phi.copy_(self.w_theta)
        self.tau.zero_()
        self.tau[:, 0] = c.tau0
        self.rho.zero_()
        self.rho[:, 0] = c.rho0
        self.gamma.fill_(c.gamma0)

    def _gram_norm(self, kernel: Tensor, iterations: int, generator: torch.Generator | None) -> Tensor:
        """Largest eigenvalue of A(B(.)) for one kernel, by power iteration on a 64x64 latent image."""
        z = torch.randn(1, self.config.filters, 64, 64, generator=generator)
        value = z.new_tensor(0.0)
        for _ in range(iterations):
            z = z / z.norm()
            w = self._analyse(self._synthesise(z, kernel), kernel)
            value, previous = (z * w).sum(), value
            z = w
            if (value - previous).abs() <= 1e-6 * value:
                break
        return value

    @torch.no_grad()
    def project_(self) -> None:
        """The constraints, applied after every optimiser step: unit-ball filters, tau >= 0,
        gamma in its range, W_beta >= 0, rho_0 >= rho_min."""
        c = self.config
        for kernel in (*self.analysis, *self.synthesis, self.dictionary):
            _unit_ball_(kernel)
        self.tau.clamp_(min=0.0)
        self.gamma.clamp_(*c.gamma_range)
        self.w_beta.clamp_(min=0.0)
        self.rho[:, 0].clamp_(min=c.rho_min)

    # ----- operators ---------------------------------------------------------------------------
    def _pads(self) -> tuple[int, int]:
        before = (self.config.kernel_size - 1) // 2
        return before, self.config.kernel_size - self.config.stride - before

    def _analyse(self, x: Tensor, kernel: Tensor) -> Tensor:
        """A: conv C -> M, stride 2, zero padding 3 before / 2 after (for 7x7)."""
        before, after = self._pads()
        return F.conv2d(F.pad(x, (before, after, before, after)), kernel, stride=self.config.stride)

    def _synthesise(self, z: Tensor, kernel: Tensor) -> Tensor:
        """B = A^T: transposed conv M -> C, cropped to the image size."""
        before, _ = self._pads()
        x = F.conv_transpose2d(z, kernel, stride=self.config.stride)
        h, w = z.shape[-2] * self.config.stride, z.shape[-1] * self.config.stride
        return x[..., before : before + h, before : before + w]

    @staticmethod
    def _pointwise(x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight[..., None, None])

    def _adjacency(self, r: Tensor, sigma: Tensor, update: int, window: int) -> tuple[ca.Circulant, Tensor, Tensor]:
        """G = softmax over the window of -1/2 ||theta_i - phi_j||^2, with theta, phi scaled by 1/sqrt(rho(sigma))."""
        coef = self.rho[update]
        rho = (coef[0] + sigma * coef[1] + sigma.square() * coef[2]).clamp_min(self.config.rho_min)
        scale = rho.rsqrt()[..., None, None]
        theta = self._pointwise(r, self.w_theta) * scale
        phi = self._pointwise(r, self.w_phi) * scale
        return ca.adjacency(theta, phi, window, kind=self.config.similarity, backend=self.backend), theta, phi

    def _threshold(self, u: Tensor, G: ca.Circulant, sigma: Tensor, k: int) -> Tensor:
        """Group thresholding GT_k(u; G): shrink u by tau_k(sigma) over the neighbourhood energy xi."""
        a = self._pointwise(u, self.w_alpha)
        q = torch.sqrt(G.apply(a.square(), backend=self.backend) + 1e-8)
        xi = self._pointwise(q, self.w_beta)
        tau = (self.tau[k, 0] + sigma * self.tau[k, 1])[..., None, None]
        return u * F.relu(1.0 - tau / (xi + 1e-8))

    # ----- the network -------------------------------------------------------------------------
    def _prepare(
        self, y: Tensor, sigma: Tensor | float, mean: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int, int]]:
        """Reflect-pad to even sizes (the odd pixel before), subtract the mean (y's own unless given);
        sigma -> (B, 1)."""
        if y.dim() != 4 or y.shape[1] != self.config.channels:
            raise ValueError(f"expected y of shape (B, {self.config.channels}, H, W), got {tuple(y.shape)}")
        H, W = y.shape[-2:]
        pad = ((-W) % 2, 0, (-H) % 2, 0)
        if any(pad):
            mode = "reflect" if min(H, W) > 1 else "replicate"
            y = F.pad(y, pad, mode=mode)
        if mean is None:
            mean = y.mean(dim=(1, 2, 3), keepdim=True)
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device).reshape(-1, 1).expand(y.shape[0], 1)
        return y - mean, mean, sigma, pad

    def _unroll(self, y: Tensor, sigma: Tensor, stop: int | None = None) -> tuple[Tensor, ca.Circulant, Tensor, Tensor]:
        """Run iterations 1..stop (default all): returns z, the adjacency in force, and its latest (theta, phi)."""
        c = self.config
        stop = c.iterations if stop is None else stop
        window = fit_window(c.window, math.ceil(y.shape[-2] / c.stride), math.ceil(y.shape[-1] / c.stride))
        r = self._analyse(y, self.analysis[0])
        G, theta, phi = self._adjacency(r, sigma, 0, window)
        z = self._threshold(r, G, sigma, 0)
        update = 0
        for k in range(2, stop + 1):
            residual = self._synthesise(z, self.synthesis[k - 1]) - y
            r = z - self._analyse(residual, self.analysis[k - 1])
            if k % c.update_period == 0:
                update += 1
                G_new, theta, phi = self._adjacency(r, sigma, update, window)
                G = G.lerp(G_new, self.gamma)  # G + gamma (G_new - G), one pass
            z = self._threshold(r, G, sigma, k - 1)
        return z, G, theta, phi

    def forward(self, y: Tensor, sigma: Tensor | float, mean: Tensor | None = None) -> Tensor:
        """Denoise y (B, C, H, W) in [0, 1] at noise level sigma ((B,) or a float, [0, 1] scale); no clamp.

        `mean` ((B, 1, 1, 1)) replaces y's own mean: tiles of one image pass the whole image's mean so
        that they are processed alike.
        """
        yt, mean, s, pad = self._prepare(y, sigma, mean)
        z, *_ = self._unroll(yt, s)
        x = self._synthesise(z, self.dictionary) + mean
        return x[..., pad[2] :, pad[0] :]

    @torch.no_grad()
    def attention_at(self, y: Tensor, sigma: Tensor | float, layer: int) -> tuple[ca.Circulant, Tensor, Tensor]:
        """The adjacency G in force at iteration `layer` (1-based), and the scaled (theta, phi) features of
        the latest refresh at or before it; all on the padded latent grid (H/2, W/2)."""
        if not 1 <= layer <= self.config.iterations:
            raise ValueError(f"layer must be in 1..{self.config.iterations}, got {layer}")
        yt, _, s, _ = self._prepare(y, sigma)
        _, G, theta, phi = self._unroll(yt, s, stop=layer)
        return G, theta, phi

    @property
    def receptive_field(self) -> int:
        """Upper bound of the receptive field radius in input pixels: every iteration's A B conv pair
        and every use of the window (when building G and when applying it) widen it."""
        c = self.config
        conv = c.kernel_size // 2
        reach = c.stride * (c.window // 2)
        r_code = conv
        r_graph = r_code + reach
        r_code = max(r_code, r_graph + reach)
        for k in range(2, c.iterations + 1):
            r_code += 2 * conv
            if k % c.update_period == 0:
                r_graph = max(r_graph, r_code + reach)
            r_code = max(r_code, r_graph + reach)
        return r_code + conv
