"""circatt: image denoising with GroupCDL on circulant-sparse attention."""

__version__ = "0.1.0"
