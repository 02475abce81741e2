"""Turn a training checkpoint into release weights: a .safetensors file and its JSON model card.

    python scripts/export_weights.py runs/gray/last.pt weights/groupcdl-gray.safetensors \
        --card card.json --eval eval-bsd68.json --eval eval-set12.json

--card: a JSON object of card fields (training data, hardware, hours, commands, notes);
--eval: JSON files written by `circatt eval --json`, whose mean tables go into the card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circatt_cli.train import load_checkpoint_model
from circatt_cli.weights import save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--card", type=Path, help="JSON object of model-card fields")
    parser.add_argument("--eval", type=Path, action="append", default=[], help="`circatt eval --json` output")
    args = parser.parse_args()
    model, step = load_checkpoint_model(args.checkpoint)
    card = json.loads(args.card.read_text()) if args.card else {}
    card.setdefault("steps", step)
    evals = [json.loads(p.read_text()) for p in args.eval]
    if evals:
        card["eval"] = [{"model": e.get("model"), "limit": e.get("limit"), "means": e["means"]} for e in evals]
    card = save_model(model, args.out, card)
    print(f"wrote {args.out} (sha256 {card['sha256'][:16]}...) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
