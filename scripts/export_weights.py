"""Export a `circatt train` checkpoint as weights: a .safetensors file and, beside it, the small export
card (steps, config, sha256) that scripts/make_card.py reads when it ships the weights and builds their
model card.

    python scripts/export_weights.py runs/gray/last.pt runs/export/groupcdl-gray.safetensors
    python scripts/make_card.py runs/export/groupcdl-gray.safetensors eval-gray.json ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from circatt_cli.data import DataError
from circatt_cli.train import load_checkpoint_model
from circatt_cli.weights import card_path, save_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (RUN/last.pt)")
    parser.add_argument("out", type=Path, help="the .safetensors file to write; its export card goes beside it")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        parser.error(f"{args.checkpoint}: no such file")
    if args.out.suffix != ".safetensors":
        parser.error(f"{args.out}: the weights file must end in .safetensors")
    try:
        model, step = load_checkpoint_model(args.checkpoint)
    except DataError as err:
        raise SystemExit(str(err)) from None
    try:
        card = save_model(model, args.out, {"steps": step})
    except OSError as err:
        raise SystemExit(f"cannot write {args.out}: {err}") from None
    print(f"wrote {args.out} (step {step}, sha256 {card['sha256'][:16]}...) and {card_path(args.out)}; "
          "ship them with scripts/make_card.py")


if __name__ == "__main__":
    main()
