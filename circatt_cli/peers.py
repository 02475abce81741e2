"""The implementations `circatt bench` times: ours, the plain-PyTorch reference, and the peers.

Each implementation is a plain function on the op's inputs. A `Peer` wraps one for the bench:
which ops and devices it serves, the constants it builds once per shape (a CSR pattern, a block
mask, an N x N mask), and the layout it natively works in. Inputs are converted to that layout
before timing and outputs back to ours (B, C, H, W) / (B, G, H, W, K) afterwards, so no peer pays
for our layout inside the timed region.

Ops and their inputs (roles: "image" is (B, C, H, W), "weights" is (B, G, H, W, K)):
similarity(q, k), softmax(S), adjacency(q, k), apply(A, x), attention(q, k, v).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as flex

import circatt_ops as ca
from circatt_ops.circulant import Circulant, key_indices

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

OPS = ("similarity", "softmax", "adjacency", "apply", "attention", "step")
STEP_APPLIES = 5  # GroupCDL applies each adjacency in five iterations before refreshing it
INPUT_ROLES = {
    "similarity": ("image", "image"),
    "softmax": ("weights",),
    "adjacency": ("image", "image"),
    "apply": ("weights", "image"),
    "attention": ("image", "image", "image"),
    "step": ("image", "image", "image"),
}
OUTPUT_ROLE = {
    "similarity": "weights",
    "softmax": "weights",
    "adjacency": "weights",
    "apply": "image",
    "attention": "image",
    "step": "image",
}


@dataclass(frozen=True)
class Case:
    """One problem: B images of C channels on an H x W grid, a wrapped window, heads, similarity kind."""

    label: str
    batch: int
    channels: int
    height: int
    width: int
    window: int
    heads: int = 1
    kind: str = "dot"

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def slots(self) -> int:
        """K, the stored entries per row."""
        return self.window * self.window

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def describe(self) -> str:
        return (
            f"B={self.batch} C={self.channels} {self.height}x{self.width} ws={self.window} "
            f"h={self.heads} {self.kind}"
        )


# ----- the implementations, as plain functions --------------------------------------------------
def circulant_similarity(q: Tensor, k: Tensor, *, case: Case, backend: str) -> Tensor:
    """Our windowed similarity through `backend`: (B, G, H, W, K) values."""
    return ca.similarity(q, k, case.window, case.kind, case.heads, backend=backend).flat_values


def circulant_softmax(s: Tensor, *, case: Case, backend: str) -> Tensor:
    """Row softmax of a Circulant's stored values (torch.softmax over K, the same for every backend)."""
    return Circulant(s, case.window).softmax().flat_values


def circulant_adjacency(q: Tensor, k: Tensor, *, case: Case, backend: str) -> Tensor:
    """similarity then softmax: the adjacency GroupCDL materialises."""
    return ca.adjacency(q, k, case.window, case.kind, case.heads, backend=backend).flat_values


def circulant_apply(a: Tensor, x: Tensor, *, case: Case, backend: str) -> Tensor:
    """y = A x for the stored weights `a`."""
    return Circulant(a, case.window).apply(x, backend=backend)


def circulant_attention(q: Tensor, k: Tensor, v: Tensor, *, case: Case, backend: str) -> Tensor:
    """Fused softmax(S / sqrt(d)) v; the weights are never stored."""
    return ca.attention(q, k, v, case.window, case.kind, case.heads, backend=backend)


def circulant_unfused_attention(q: Tensor, k: Tensor, v: Tensor, *, case: Case, backend: str) -> Tensor:
    """The same attention composed from our unfused ops: similarity, scaled, softmax, apply (K values per row stored)."""
    S = ca.similarity(q, k, case.window, case.kind, case.heads, backend=backend)
    return (S * case.scale).softmax().apply(v, backend=backend)


def circulant_step(q: Tensor, k: Tensor, x: Tensor, *, case: Case, backend: str) -> Tensor:
    """GroupCDL's work per adjacency refresh: one adjacency, then five applies of it (chained here)."""
    A = ca.adjacency(q, k, case.window, case.kind, case.heads, backend=backend)
    for _ in range(STEP_APPLIES):
        x = A.apply(x, backend=backend)
    return x


def csr_apply(values: Tensor, x: Tensor, *, crow: Tensor, col: Tensor) -> Tensor:
    """The Julia package's apply: per (batch, head), an (N x N CSR) @ (N x Ch) product by torch.sparse.mm.

    `values` is (B, G, N*K) in sorted-column order, `x` and the result are (B, G, N, Ch).
    """
    n = crow.numel() - 1
    B, G = values.shape[:2]
    products = [
        torch.sparse.mm(torch.sparse_csr_tensor(crow, col, values[b, g], size=(n, n), check_invariants=False), x[b, g])
        for b in range(B)
        for g in range(G)
    ]
    return torch.stack(products).unflatten(0, (B, G))


def circular_window(height: int, width: int, window: int) -> Callable:
    """A FlexAttention mask_mod: key kv_idx lies in the wrapped window of query q_idx (row-major pixels)."""
    r = (window - 1) // 2

    def mask_mod(b, h, q_idx, kv_idx):
        di = (kv_idx // width - q_idx // width) % height
        dj = (kv_idx % width - q_idx % width) % width
        return (torch.minimum(di, height - di) <= r) & (torch.minimum(dj, width - dj) <= r)

    return mask_mod


def _distance_bias(k: Tensor, scale: float) -> Tensor:
    """-scale/2 |k_m|^2 per key, (B, G, N): with it, scaled dot logits equal the distance logits up to a row constant."""
    return k.float().square().sum(-1).mul(-0.5 * scale)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor, kind: str) -> Tensor:
    """Dense masked scaled_dot_product_attention on (B, G, N, d); `mask` is the (N, N) window pattern.

    For the distance kind, q and k gain one channel (1 and -|k|^2 / 2), so q'.k' = q.k - |k|^2 / 2.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kind == "distance":
        q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
        k = torch.cat([k, k.float().square().sum(-1, keepdim=True).mul(-0.5).to(k.dtype)], dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, bias: Tensor | None) -> Tensor:
    """flex_attention with the block mask, plus a per-key logit bias (B, G, N) when given; compiled once."""
    if bias is None:
        return flex(q, k, v, block_mask=block_mask)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx]

    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


def flex_circular_attention(q: Tensor, k: Tensor, v: Tensor, *, block_mask: BlockMask, kind: str) -> Tensor:
    """Compiled FlexAttention on (B, G, N, d) with the circular block mask; for distance, the per-key
    bias -|k|^2 / (2 sqrt(d)) turns the scaled dot logits into the distance logits (up to a row constant)."""
    bias = _distance_bias(k, 1.0 / math.sqrt(q.shape[-1])) if kind == "distance" else None
    # Each shape, dtype and grad mode is its own compilation (dynamic=False); past dynamo's default
    # recompile limit (8) a bench run of several groups would silently fall back to eager Flex, tens
    # of times slower. Allow more, and fail loudly rather than fall back.
    with torch._dynamo.config.patch(recompile_limit=256, fail_on_recompile_limit_hit=True):
        return _compiled_flex()(q, k, v, block_mask, bias)


def bccb_attention(q: Tensor, k: Tensor, v: Tensor, *, case: Case) -> Tensor:
    """Global BCCB attention by 2-D FFT (a different op: every pixel sees every offset)."""
    from circatt_ops.bccb import bccb_attention as bccb

    return bccb(q, k, v, heads=case.heads)


# ----- layouts ------------------------------------------------------------------------------------
def to_heads(x: Tensor, case: Case) -> Tensor:
    """(B, C, H, W) -> (B, G, N, d), contiguous: the layout of SDPA, Flex and a CSR product."""
    B, C, H, W = x.shape
    return x.reshape(B, case.heads, C // case.heads, H * W).transpose(-1, -2).contiguous()


def from_heads(x: Tensor, case: Case) -> Tensor:
    """(B, G, N, d) -> (B, C, H, W)."""
    B, G, N, d = x.shape
    return x.transpose(-1, -2).reshape(B, G * d, case.height, case.width)


def latest_shape_only(build: Callable) -> Callable:
    """Cache what `build` returns for the latest arguments only. The bench runs shape by shape, so a
    previous shape's constant (an N x N mask, N*K CSR indices) would only hold memory through the rest of
    the run, and shrink the memory budget of every later row; it is dropped before the next is built."""
    held: dict[tuple, object] = {}

    @functools.wraps(build)
    def get(*key):
        if key not in held:
            held.clear()
            held[key] = build(*key)
        return held[key]

    return get


@latest_shape_only
def csr_pattern(height: int, width: int, window: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(crow, col, order): the shared CSR structure and, per row, the slot order that sorts its columns."""
    cols, order = key_indices(height, width, window, device).sort(dim=-1)
    n, K = cols.shape
    crow = torch.arange(0, n * K + 1, K, device=device)
    return crow, cols.reshape(-1).contiguous(), order


@latest_shape_only
def dense_mask(height: int, width: int, window: int, device: torch.device) -> Tensor:
    """The (N, N) boolean window pattern, from the same mask_mod as Flex's."""
    idx = torch.arange(height * width, device=device)
    return circular_window(height, width, window)(None, None, idx[:, None], idx[None, :])


@functools.lru_cache(maxsize=8)
def flex_block_mask(height: int, width: int, window: int, device: torch.device) -> BlockMask:
    """Flex's block mask, built by the compiled create_block_mask: no N x N mask is materialised."""
    n = height * width
    build = torch.compile(create_block_mask)
    return build(circular_window(height, width, window), None, None, n, n, device=str(device))


@functools.cache
def _compiled_flex() -> Callable:
    return torch.compile(_flex, dynamic=False)


# ----- the bench's view of each implementation ----------------------------------------------------
class Peer:
    """One implementation as the bench sees it; subclasses set the ops, layout and run function."""

    name = "peer"
    ops: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")
    comparable = True  # its outputs equal the reference's and are checked

    def unavailable(self, op: str, case: Case, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this implementation cannot run the op here, or None."""
        if op not in self.ops:
            return f"{self.name} does not implement {op}"
        if device.type not in self.devices:
            return f"{self.name} runs on {' / '.join(self.devices)} only"
        return None

    def prepare(self, op: str, case: Case, device: torch.device) -> None:
        """Build per-shape constants once, outside the timed region."""

    def note(self, case: Case, device: torch.device) -> str:
        """Anything the report should say about how this peer was set up for the case."""
        return ""

    def native(self, t: Tensor, role: str, case: Case) -> Tensor:
        return t

    def standard(self, t: Tensor, role: str, case: Case) -> Tensor:
        return t

    def run(self, op: str, case: Case, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_bytes(self, op: str, case: Case, itemsize: int, backward: bool) -> int:
        """Memory beyond the inputs and outputs (a rough upper estimate, to skip what cannot fit)."""
        return 0


class CirculantPeer(Peer):
    """Our ops through one backend: "cuda", "cpu" (ours) or "reference" (plain PyTorch)."""

    ops = OPS
    _functions = {
        "similarity": circulant_similarity,
        "softmax": circulant_softmax,
        "adjacency": circulant_adjacency,
        "apply": circulant_apply,
        "attention": circulant_attention,
        "step": circulant_step,
    }

    def __init__(self, backend: str) -> None:
        self.name = backend
        self.backend = backend
        self.devices = ("cpu", "cuda") if backend == "reference" else (backend,)
        if backend == "reference":  # softmax is torch.softmax over K for every backend: timed once, as ours
            self.ops = tuple(op for op in OPS if op != "softmax")

    def run(self, op, case, *inputs):
        return self._functions[op](*inputs, case=case, backend=self.backend)

    def extra_bytes(self, op, case, itemsize, backward):
        weights32 = case.batch * case.heads * case.pixels * case.slots * 4
        if op == "attention" and not self._fused(case):
            return 3 * weights32 * (2 if backward else 1)
        return weights32 if op != "attention" else 0

    def _fused(self, case: Case) -> bool:
        """Whether this backend has a fused attention kernel (else attention materialises the logits)."""
        if self.backend == "reference":
            return False
        from circatt_ops import backends

        return hasattr(backends.resolve(self.backend, torch.device(self.backend)), "attention_forward")


class UnfusedPeer(CirculantPeer):
    """Our kernels without the fusion: the attention weights materialised as a Circulant, then applied."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.name, self.ops = "unfused", ("attention",)

    def run(self, op, case, q, k, v):
        return circulant_unfused_attention(q, k, v, case=case, backend=self.backend)

    def extra_bytes(self, op, case, itemsize, backward):
        weights = case.batch * case.heads * case.pixels * case.slots * itemsize
        return weights * (4 if backward else 2)


class CsrPeer(Peer):
    """The Julia package's algorithm: the adjacency as a CSR matrix, applied by cuSPARSE / MKL."""

    name = "csr"
    ops = ("apply",)

    def unavailable(self, op, case, device, dtype):
        if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
            return "torch.sparse.mm on the CPU takes float32/float64"
        return super().unavailable(op, case, device, dtype)

    def prepare(self, op, case, device):
        csr_pattern(case.height, case.width, case.window, device)

    def native(self, t, role, case):
        if role == "image":
            return to_heads(t, case)
        _, _, order = csr_pattern(case.height, case.width, case.window, t.device)
        B, G = t.shape[:2]
        return t.reshape(B, G, case.pixels, case.slots).gather(-1, order.expand(B, G, -1, -1)).reshape(B, G, -1)

    def standard(self, t, role, case):
        if role == "image":
            return from_heads(t, case)
        _, _, order = csr_pattern(case.height, case.width, case.window, t.device)
        B, G = t.shape[:2]
        sorted_vals = t.reshape(B, G, case.pixels, case.slots)
        out = torch.empty_like(sorted_vals).scatter_(-1, order.expand(B, G, -1, -1), sorted_vals)
        return out.reshape(B, G, case.height, case.width, case.slots)

    def run(self, op, case, values, x):
        crow, col, _ = csr_pattern(case.height, case.width, case.window, values.device)
        return csr_apply(values, x, crow=crow, col=col)

    def extra_bytes(self, op, case, itemsize, backward):
        entries = case.pixels * case.slots  # the pattern: int64 columns and slot order per entry
        return entries * 16 + case.batch * case.heads * entries * itemsize * (3 if backward else 1)


class SdpaPeer(Peer):
    """Dense scaled_dot_product_attention with the (N, N) window pattern as its boolean mask."""

    name = "sdpa"
    ops = ("attention",)

    def prepare(self, op, case, device):
        dense_mask(case.height, case.width, case.window, device)

    def native(self, t, role, case):
        return to_heads(t, case)

    def standard(self, t, role, case):
        return from_heads(t, case)

    def run(self, op, case, q, k, v):
        return sdpa_attention(q, k, v, mask=dense_mask(case.height, case.width, case.window, q.device), kind=case.kind)

    def extra_bytes(self, op, case, itemsize, backward):
        n2 = case.pixels**2
        scores = case.batch * case.heads * n2 * 4
        return 5 * n2 + 3 * scores * (2 if backward else 1)


class FlexPeer(SdpaPeer):
    """Compiled FlexAttention with the circular mask_mod and its block mask (CUDA only)."""

    name = "flex"
    devices = ("cuda",)

    def __init__(self) -> None:
        self._build_s: dict[tuple, float] = {}

    def prepare(self, op, case, device):
        key = (case.height, case.width, case.window, device)
        if key not in self._build_s:
            t0 = time.perf_counter()
            flex_block_mask(*key)
            self._build_s[key] = time.perf_counter() - t0

    def note(self, case, device):
        seconds = self._build_s.get((case.height, case.width, case.window, device))
        return "" if seconds is None else f"block mask built in {seconds:.1f} s (compiled, not timed)"

    def run(self, op, case, q, k, v):
        block_mask = flex_block_mask(case.height, case.width, case.window, q.device)
        return flex_circular_attention(q, k, v, block_mask=block_mask, kind=case.kind)

    def extra_bytes(self, op, case, itemsize, backward):
        return case.batch * case.heads * case.pixels * 8


class BccbPeer(Peer):
    """Global BCCB attention by FFT: the O(N log N) companion, timed beside the windowed op, not checked."""

    name = "bccb"
    ops = ("attention",)
    comparable = False

    def unavailable(self, op, case, device, dtype):
        if importlib.util.find_spec("circatt_ops.bccb") is None:
            return "circatt_ops.bccb is not available"
        return super().unavailable(op, case, device, dtype)

    def run(self, op, case, q, k, v):
        return bccb_attention(q, k, v, case=case)

    def extra_bytes(self, op, case, itemsize, backward):
        spectra = case.batch * (3 * case.channels + 2 * case.heads) * case.pixels * 8
        return spectra * (3 if backward else 1)


class Unavailable(Peer):
    """A peer that cannot run at all here (e.g. its kernels failed to build): every row says why."""

    def __init__(self, peer: Peer, reason: str) -> None:
        self.name, self.ops, self.devices, self.reason = peer.name, peer.ops, peer.devices, reason

    def unavailable(self, op, case, device, dtype):
        return self.reason


def all_peers(device: torch.device) -> list[Peer]:
    """Ours for the device first, then the reference and the peers."""
    ours = CirculantPeer("cuda" if device.type == "cuda" else "cpu")
    return [ours, CirculantPeer("reference"), UnfusedPeer(ours.backend), CsrPeer(), FlexPeer(), SdpaPeer(), BccbPeer()]
