"""Does a C++ error raised inside the CUDA extension reach Python as a RuntimeError (docs/kernels.md, open problem 1)?

    python -X faulthandler scripts/throw_check.py
"""

import torch

from circatt_ops import _extension

kernels = _extension.load("cuda")
q = torch.randn(1, 1, 4, 8, 8, device="cuda")
k = torch.randn(1, 1, 4, 8, 9, device="cuda")
for attempt in range(3):
    try:
        kernels.similarity(q, k, 3, False)
    except RuntimeError as err:
        print(f"attempt {attempt}: RuntimeError reached Python: {str(err).splitlines()[0]}")
    else:
        raise SystemExit("the kernel accepted mismatched q and k: its input check is missing")
print("the process survived its kernel-side errors")
