"""circatt_ops: circulant-sparse attention -- attention over a square window that wraps around the
image edges -- with C++ and CUDA kernels, autograd, and a compact `Circulant` matrix object.

    import circatt_ops as ca
    y = ca.attention(q, k, v, window=7)          # fused, (B, C, H, W)
    A = ca.adjacency(q, k, window=7)             # a Circulant, K = 49 values per row
    y = A @ v
"""

from .bccb import BCCB, bccb_attention
from .circulant import Circulant, cat, key_indices
from .functional import adjacency, attention, similarity

__version__ = "0.1.0"
__all__ = ["BCCB", "Circulant", "adjacency", "attention", "bccb_attention", "cat", "key_indices", "similarity"]
