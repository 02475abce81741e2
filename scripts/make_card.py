"""Ship exported weights: copy them into weights/ and build or update their model card.

    python scripts/make_card.py runs/export/groupcdl-gray.safetensors eval-gray.json \
        --without Set12/04.png --crosscheck cpu-gray.json \
        --set status="..." --set gpu_hours=1.62 --append commands="..."

The weights (made by scripts/export_weights.py, whose card beside them holds the steps and the sha256)
go to weights/NAME.safetensors and the `circatt eval --json` output to weights/NAME.eval.json. The card
weights/NAME.json gets the steps, config and sha256 of the weights and the eval means, computed from
the per-image results (--without DATASET/IMAGE adds rows with that image left out). Every other field
of an existing card (recipe, hardware, commands, throughput, eval.peers, ...) is kept as written;
--set and --append edit such fields (dotted keys reach nested ones, a value that parses as JSON is
stored as JSON). --crosscheck compares a smaller `circatt eval --device cpu --json` run with the
eval's per-image results and records the largest difference as eval.cpu_crosscheck. The new card
is checked by loading the weights through circatt's loader.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from circatt_cli.evaluate import Result
from circatt_cli.weights import WeightsError, card_path, load_model, sha256

LABELS = {"groupcdl": "true sigma", "groupcdl-est": "estimated sigma"}
RESULT_KEYS = {f.name for f in dataclasses.fields(Result)}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"cannot read {path}: {err}") from None


def read_results(path: Path) -> dict[str, Any]:
    """A `circatt eval --json` output: its per-image results are checked here, not met as a KeyError later."""
    results = read_json(path)
    images = results.get("images") if isinstance(results, dict) else None
    if not isinstance(images, list) or not all(isinstance(r, dict) and RESULT_KEYS <= set(r) for r in images):
        raise SystemExit(f"{path} is not the output of `circatt eval --json` (no per-image results under 'images')")
    return results


def mean_rows(images: list[dict[str, Any]], without: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """'DATASET sigma S' -> method label -> mean PSNR (2 decimals), SSIM (4) and image count; one more set of
    rows 'DATASET without IMAGE sigma S' per --without entry."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in images:
        groups[f"{r['dataset']} sigma {r['sigma']:g}"][LABELS.get(r["method"], r["method"])].append(r)
    for entry in without:
        dataset, _, image = entry.partition("/")
        kept = [r for r in images if r["dataset"] == dataset and r["image"] != image]
        if len(kept) == sum(r["dataset"] == dataset for r in images):
            raise SystemExit(f"--without {entry}: no such image in the eval results")
        for r in kept:
            groups[f"{dataset} without {image} sigma {r['sigma']:g}"][LABELS.get(r["method"], r["method"])].append(r)
    return {
        row: {
            label: {
                "psnr": round(statistics.fmean(r["psnr"] for r in rs), 2),
                "ssim": round(statistics.fmean(r["ssim"] for r in rs), 4),
                "images": len(rs),
            }
            for label, rs in methods.items()
        }
        for row, methods in groups.items()
    }


def crosscheck(small: dict[str, Any], full: dict[str, Any]) -> str:
    """One line: which results the smaller run repeated and the largest per-image difference to the full run."""
    key = ("dataset", "image", "sigma", "method")
    reference = {tuple(r[k] for k in key): r for r in full["images"]}
    pairs = [(r, reference.get(tuple(r[k] for k in key))) for r in small["images"]]
    missing = [r["image"] for r, ref in pairs if ref is None]
    if missing or not pairs:
        raise SystemExit(f"--crosscheck: results not in the eval JSON: {missing or 'none given'}")
    dpsnr = max(abs(r["psnr"] - ref["psnr"]) for r, ref in pairs)
    dssim = max(abs(r["ssim"] - ref["ssim"]) for r, ref in pairs)
    names = ", ".join(dict.fromkeys(f"{r['dataset']}/{r['image']}" for r, _ in pairs))
    sigmas = ", ".join(dict.fromkeys(f"{r['sigma']:g}" for r, _ in pairs))
    methods = " and ".join(dict.fromkeys(LABELS.get(r["method"], r["method"]) for r, _ in pairs))
    return (
        f"{names} at sigma {sigmas} ({methods}) re-run by `circatt eval --device cpu`: per-image "
        f"PSNR within {dpsnr:.1e} dB and SSIM within {dssim:.1e} of this table's run ({len(pairs)} results)"
    )


def edit(card: dict[str, Any], assignment: str, append: bool) -> None:
    """Apply one --set / --append KEY=VALUE to the card."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise SystemExit(f"expected KEY=VALUE, got {assignment!r}")
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, last = key.split(".")
    node = card
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SystemExit(f"{assignment!r}: card field {part!r} is not an object")
    if append:
        target = node.setdefault(last, [])
        if not isinstance(target, list):
            raise SystemExit(f"--append {assignment!r}: card field {last!r} is not a list; use --set")
        target.append(value)
    else:
        node[last] = value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("weights", type=Path, help="exported .safetensors, with its export card beside it")
    parser.add_argument("eval", type=Path, help="`circatt eval --json` output for these weights")
    parser.add_argument("--into", type=Path, default=Path("weights"), help="where the weights ship (weights/)")
    parser.add_argument("--without", action="append", default=[], metavar="DATASET/IMAGE",
                        help="also the means with this image left out")
    parser.add_argument("--crosscheck", type=Path, help="a smaller `circatt eval --device cpu --json` run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="set a card field")
    parser.add_argument("--append", action="append", default=[], metavar="KEY=VALUE", dest="appends",
                        help="append to a list field")
    args = parser.parse_args()

    export = read_json(card_path(args.weights))
    digest = sha256(args.weights)
    if export.get("sha256") != digest or "steps" not in export:
        raise SystemExit(f"{args.weights} does not match {card_path(args.weights)} (sha256 or steps): pass the file "
                         "that scripts/export_weights.py wrote, with its card")
    results = read_results(args.eval)
    if results.get("config") != export["config"]:
        raise SystemExit(f"{args.eval} evaluated a model of another config than {args.weights}")

    dest = args.into / args.weights.name
    old = read_json(card_path(dest)) if card_path(dest).exists() and dest.resolve() != args.weights.resolve() else {}
    card = {"name": dest.stem, **old}
    card.update(steps=export["steps"], config=export["config"], weights=dest.name, sha256=digest)
    card.setdefault("eval", {})["means"] = mean_rows(results["images"], args.without)
    if args.crosscheck:
        card["eval"]["cpu_crosscheck"] = crosscheck(read_results(args.crosscheck), results)
    for assignment in args.sets:
        edit(card, assignment, append=False)
    for assignment in args.appends:
        edit(card, assignment, append=True)
    if old and old.get("steps") != card["steps"] and not any(s.startswith("status=") for s in args.sets):
        print(f"note: the status still describes step {old['steps']}; give --set status=...")

    try:
        args.into.mkdir(parents=True, exist_ok=True)
        if dest.resolve() != args.weights.resolve():
            shutil.copyfile(args.weights, dest)
        shutil.copyfile(args.eval, dest.with_name(f"{dest.stem}.eval.json"))
        card_path(dest).write_text(json.dumps(card, indent=2) + "\n")
    except OSError as err:
        raise SystemExit(f"cannot write into {args.into}: {err}") from None
    try:
        load_model(dest)  # the loader's own sha256 and config checks
    except WeightsError as err:
        raise SystemExit(f"the shipped weights do not load: {err}") from None
    print(f"wrote {dest} (step {card['steps']}, sha256 {digest[:16]}...), {card_path(dest)} and "
          f"{dest.stem}.eval.json")


if __name__ == "__main__":
    main()
