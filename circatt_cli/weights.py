"""GroupCDL weights on disk: a safetensors file whose metadata holds the config, and a JSON model card
beside it (same name, .json) that records how the weights were made and their sha256."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .model import PRESETS, GroupCDL, GroupCDLConfig

FORMAT = "circatt-groupcdl-1"


class WeightsError(ValueError):
    """A weights file that is missing, corrupted or not a GroupCDL file."""


def weights_dir() -> Path:
    """$CIRCATT_WEIGHTS, else the repository's top-level weights/ folder."""
    env = os.environ.get("CIRCATT_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "weights"


def preset_weights(name: str, folder: Path | None = None) -> Path:
    """The weights file of a preset in `folder` (default: weights_dir()): groupcdl-NAME.safetensors."""
    return (folder or weights_dir()) / f"groupcdl-{name}.safetensors"


def card_path(path: Path) -> Path:
    """The model card that sits beside a weights file."""
    return Path(path).with_suffix(".json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: GroupCDL, path: Path, card: dict | None = None) -> dict:
    """Write the weights (config in the metadata) and the model card with the file's sha256; returns the card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(config)})
    path.chmod(0o644)
    full = {**(card or {}), "config": config, "weights": path.name, "sha256": sha256(path)}
    card_path(path).write_text(json.dumps(full, indent=2) + "\n")
    return full


def _check_sha(path: Path) -> None:
    card = card_path(path)
    if not card.exists():
        warnings.warn(f"no model card {card.name} beside {path}: its sha256 is not checked", stacklevel=3)
        return
    try:
        expected = json.loads(card.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError) as err:
        raise WeightsError(f"model card {card} is unreadable or has no sha256 ({err})") from None
    actual = sha256(path)
    if actual != expected:
        raise WeightsError(
            f"{path} is corrupted or was changed: sha256 {actual[:16]}... does not match "
            f"{expected[:16]}... in {card.name}; restore the file or retrain"
        )


def _read(path: Path) -> tuple[GroupCDLConfig, dict[str, torch.Tensor]]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise WeightsError(f"{path} is a safetensors file but not GroupCDL weights (format {meta.get('format')!r})")
    return GroupCDLConfig.from_dict(json.loads(meta["config"])), tensors


def resolve_spec(spec: str | Path) -> Path:
    """A preset name (PRESETS) -> its shipped weights; anything else is a path."""
    return preset_weights(str(spec)) if str(spec) in PRESETS else Path(spec)


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> GroupCDL:
    """A GroupCDL in eval mode from a preset name or a .safetensors path, after checking its sha256."""
    path = resolve_spec(spec)
    choices = f"give a preset ({' or '.join(PRESETS)}) or a .safetensors file"
    if not path.is_file():
        hint = "train one with `circatt train`, or set CIRCATT_WEIGHTS" if str(spec) in PRESETS else choices
        raise WeightsError(f"no weights file at {path} ({hint})")
    if path.suffix != ".safetensors":  # e.g. the model card, or a training checkpoint
        raise WeightsError(f"{path} is not a weights file: {choices} (scripts/export_weights.py makes one of a checkpoint)")
    _check_sha(path)
    config, tensors = _read(path)
    model = GroupCDL(config, init=False)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise WeightsError(f"{path} does not match its own config: {err}") from None
    return model.to(device).eval()
