"""Pack a folder of training images into one compact file that travels with the repository.

The pack is an .npz holding each file's original encoded bytes (JPEG/PNG) under its file name, so that
decoding it gives exactly the pixels of the folder; `circatt train` accepts the pack as its DATA argument.

    python scripts/pack_data.py ../shared/data/CBSD432 data_cache/CBSD432.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from circatt_cli.paths import image_files


def pack(folder: Path, out: Path) -> int:
    """Write every image of `folder` into the .npz `out`; returns the bytes written."""
    files = image_files(folder)
    if not files:
        raise SystemExit(f"no images found in {folder}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **{p.name: np.frombuffer(p.read_bytes(), dtype=np.uint8) for p in files})
    except OSError as err:
        raise SystemExit(f"cannot write {out}: {err}") from None
    return out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("../shared/data/CBSD432"))
    parser.add_argument("out", type=Path, nargs="?", default=Path("data_cache/CBSD432.npz"))
    args = parser.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"not a folder: {args.folder}")
    if args.out.suffix != ".npz":  # np.savez would add .npz to any other name, and train reads only .npz packs
        parser.error(f"{args.out}: the pack must end in .npz")
    size = pack(args.folder, args.out)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
