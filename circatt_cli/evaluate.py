"""`circatt eval`: PSNR and SSIM of a GroupCDL model (and optional classical peers) on folders of clean
images, with the field's convention: fixed per-image noise, noisy input not clipped, output clipped."""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from .console import escape, make_console, print_error, print_note
from .data import to_uint8
from .devices import resolve_device
from .ensemble import self_ensemble
from .imageio import ImageError, quantize, read_image
from .metrics import psnr, ssim
from .model import DEFAULT_PRESET, PRESETS, GroupCDL
from .noise import add_noise, estimate_sigma
from .paths import check_result_file, image_files
from .weights import WeightsError, load_model

PEERS = ("nlm", "bm3d")


@dataclass
class Result:
    """One denoised image: the method, where the image came from, the noise, and the scores."""

    dataset: str
    image: str
    sigma: float
    method: str
    sigma_used: float
    psnr: float
    ssim: float


def load_image(path: Path, channels: int) -> Tensor:
    """(1, channels, H, W) float in [0, 1] at 8 bits; RGB files become 8-bit luma for a gray model, gray files
    RGB copies (data.to_uint8)."""
    return _from_uint8(to_uint8(read_image(path), channels))


def _from_uint8(array: np.ndarray) -> Tensor:
    """(H, W, C) uint8 -> (1, C, H, W) float in [0, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


@torch.no_grad()
def run_model(model: GroupCDL, noisy: Tensor, sigma: float, ensemble: bool = False) -> Tensor:
    """The model's output for one noisy image (sigma on the 0-255 scale), clipped to [0, 1], on the CPU;
    with `ensemble`, the mean over the image's 8 flips and quarter-turns (clipped after averaging)."""
    device = next(model.parameters()).device
    s = torch.tensor([sigma / 255.0], device=device)

    def run(x: Tensor) -> Tensor:
        return model(x, s)

    return (self_ensemble(run) if ensemble else run)(noisy.to(device)).clamp(0.0, 1.0).cpu()


def nlm(noisy: Tensor, sigma: float) -> Tensor:
    """OpenCV non-local means (on the clipped, 8-bit noisy image, as OpenCV requires), h = 0.8 sigma."""
    import cv2

    img = quantize(noisy[0].permute(1, 2, 0).numpy(), 8)
    h = 0.8 * sigma
    if img.shape[-1] == 1:
        out = cv2.fastNlMeansDenoising(img[..., 0], None, h, 7, 21)[..., None]
    else:
        out = cv2.fastNlMeansDenoisingColored(img, None, h, h, 7, 21)
    return _from_uint8(out)


def bm3d_peer(noisy: Tensor, sigma: float) -> Tensor:
    """BM3D from the `bm3d` package with the true sigma (bm3d_rgb for color)."""
    import bm3d

    img = noisy[0].permute(1, 2, 0).double().numpy()
    if img.shape[-1] == 1:
        out = bm3d.bm3d(img[..., 0], sigma_psd=sigma / 255.0)[..., None]
    else:
        out = bm3d.bm3d_rgb(img, sigma_psd=sigma / 255.0)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None].float().clamp(0.0, 1.0)


def available_peers(names: list[str]) -> tuple[dict[str, Callable[[Tensor, float], Tensor]], list[str]]:
    """The peers that can run here, and one note per requested peer that cannot."""
    modules = {"nlm": ("cv2", nlm, "opencv-python-headless"), "bm3d": ("bm3d", bm3d_peer, "bm3d")}
    found, notes = {}, []
    for name in names:
        module, fn, package = modules[name]
        try:
            __import__(module)
        except ImportError:
            notes.append(f"peer {name!r} skipped: `{module}` is not installed (pip install {package})")
            continue
        found[name] = fn
    return found, notes


def evaluate_image(
    model: GroupCDL, clean: Tensor, dataset: str, name: str, sigma: float, estimate: bool, peers: dict,
    ensemble: bool = False,
) -> Iterator[Result]:
    """Score the model (true sigma; estimated sigma and the x8 self-ensemble when asked) and each peer on
    one noisy image, whose noise is seeded by the file name and sigma."""
    noisy = add_noise(clean, name, sigma)

    def score(method: str, out: Tensor, used: float) -> Result:
        return Result(dataset, name, sigma, method, used, float(psnr(out, clean)), float(ssim(out, clean)))

    yield score("groupcdl", run_model(model, noisy, sigma), sigma)
    if estimate:
        guess = float(estimate_sigma(noisy)) * 255.0
        yield score("groupcdl-est", run_model(model, noisy, guess), guess)
    if ensemble:
        yield score("groupcdl-x8", run_model(model, noisy, sigma, ensemble=True), sigma)
    for peer, fn in peers.items():
        yield score(peer, fn(noisy, sigma), sigma)


def mean_table(results: list[Result]) -> dict[tuple[str, float, str], tuple[float, float, int]]:
    """(dataset, sigma, method) -> (mean PSNR, mean SSIM, images)."""
    groups: dict[tuple[str, float, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.sigma, r.method), []).append(r)
    return {
        key: (statistics.fmean(r.psnr for r in rs), statistics.fmean(r.ssim for r in rs), len(rs))
        for key, rs in groups.items()
    }


def render_means(results: list[Result], title: str) -> Table:
    """A rich table: one row per (dataset, sigma), PSNR / SSIM columns per method."""
    means = mean_table(results)
    methods = list(dict.fromkeys(r.method for r in results))
    table = Table(title=escape(title))
    table.add_column("dataset")
    table.add_column("sigma", justify="right")
    table.add_column("images", justify="right")
    for m in methods:
        table.add_column(f"{m} PSNR / SSIM", justify="right")
    for dataset, sigma in dict.fromkeys((r.dataset, r.sigma) for r in results):
        cells = [means.get((dataset, sigma, m)) for m in methods]
        count = next(c[2] for c in cells if c)
        table.add_row(escape(dataset), f"{sigma:g}", str(count), *(f"{c[0]:.2f} / {c[1]:.4f}" if c else "-" for c in cells))
    return table


def render_images(results: list[Result]) -> Table:
    table = Table(title="per image")
    for name in ("dataset", "image", "sigma", "method", "sigma used", "PSNR", "SSIM"):
        table.add_column(name)
    for r in results:
        table.add_row(escape(r.dataset), escape(r.image), f"{r.sigma:g}", r.method, f"{r.sigma_used:.2f}", f"{r.psnr:.2f}", f"{r.ssim:.4f}")
    return table


def write_json(path: Path, results: list[Result], meta: dict) -> None:
    means = [
        {"dataset": d, "sigma": s, "method": m, "psnr": p, "ssim": q, "images": n}
        for (d, s, m), (p, q, n) in mean_table(results).items()
    ]
    path.write_text(json.dumps({**meta, "means": means, "images": [asdict(r) for r in results]}, indent=2) + "\n")


def write_csv(path: Path, results: list[Result]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Result.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)


def dataset_name(folder: Path) -> str:
    """The name results are grouped under: the folder's name as given, made absolute for `.` or `..`
    (not resolved: a link keeps its own name)."""
    return Path(os.path.abspath(folder)).name


def check_image_folders(folders: list[Path], option: str) -> None:
    """Every folder exists and holds images; a usage error for `option` if not (eval's --data, train's --val-dir)."""
    for folder in folders:
        if not folder.is_dir():
            raise typer.BadParameter(f"not a folder: {folder}", param_hint=option)
        if not image_files(folder):
            raise typer.BadParameter(f"no images in {folder}", param_hint=option)


def _parse_peers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PEERS]
    if bad:
        raise typer.BadParameter(f"unknown peer(s) {bad}; choose from {list(PEERS)}", param_hint="--peers")
    return names


def _parse_sigmas(values: list[str]) -> list[float]:
    try:
        sigmas = [float(v) for text in values for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"noise levels must be numbers, got {values}", param_hint="--sigma") from None
    if not sigmas or min(sigmas) < 0:
        raise typer.BadParameter("give one or more noise levels >= 0", param_hint="--sigma")
    return sigmas


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),  # file names as they are
        BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
    )


def run_eval(
    model: GroupCDL,
    folders: list[Path],
    sigmas: list[float],
    estimate: bool = False,
    peers: dict | None = None,
    limit: int | None = None,
    console: Console | None = None,
    on_error: Callable[[str], None] | None = None,
    ensemble: bool = False,
) -> list[Result]:
    """Evaluate on every (folder, image, sigma) with a rich progress bar; returns the per-image results.

    An unreadable image raises ImageError, or with `on_error` is reported to it and skipped."""
    console = console or make_console(stderr=True)
    jobs = [(dataset_name(folder), path) for folder in folders for path in image_files(folder)[:limit]]
    results: list[Result] = []
    with _progress(console) as bar:
        task = bar.add_task("eval", total=len(jobs) * len(sigmas))
        for dataset, path in jobs:
            try:
                clean = load_image(path, model.config.channels)
            except ImageError as err:
                if on_error is None:
                    raise
                on_error(str(err))
                bar.advance(task, len(sigmas))
                continue
            for sigma in sigmas:
                bar.update(task, description=f"{dataset}/{path.name} sigma {sigma:g}")
                results.extend(evaluate_image(model, clean, dataset, path.name, sigma, estimate, peers or {}, ensemble))
                bar.advance(task)
    return results


def eval_command(
    model: str = typer.Option(DEFAULT_PRESET, "--model", help=f"{', '.join(PRESETS)}, or a .safetensors path. A gray model is scored on the 8-bit luma of colour images."),
    data: list[Path] = typer.Option(..., "--data", help="A folder of clean images; repeat --data for more."),
    sigma: list[str] = typer.Option(["15,25,50"], "--sigma", help="Noise levels on the 0-255 scale: repeat, or 15,25,50."),
    estimate_sigma_: bool = typer.Option(False, "--estimate-sigma", help="Also run with the estimated sigma (MAD)."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Also run the x8 self-ensemble (the 8 flips and quarter-turns, averaged; true sigma): the groupcdl-x8 column."),
    peers: str = typer.Option("", "--peers", help="Comma-separated classical peers: nlm, bm3d."),
    json_path: Path | None = typer.Option(None, "--json", help="Write every result and the means as JSON."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write the per-image results as CSV."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N images (by name) of each folder."),
    per_image: bool = typer.Option(False, "--per-image", help="Also print the per-image table."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """PSNR / SSIM of a model on folders of clean images, with fixed-seed noise per image (the noise that
    `circatt denoise FILE --add-noise SIGMA` adds)."""
    check_image_folders(data, "--data")
    names = [dataset_name(folder) for folder in data]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # results are keyed by the folder's name: two such folders would be scored as one dataset
        raise typer.BadParameter(f"two --data folders are named {twice[0]!r}; results are grouped by folder name", param_hint="--data")
    for option, path in (("--json", json_path), ("--csv", csv_path)):
        check_result_file(path, option)
    sigmas = _parse_sigmas(sigma)
    torch_device, _ = resolve_device(device)
    peer_fns, notes = available_peers(_parse_peers(peers))
    console = make_console()
    for note in notes:
        print_note(console, note)
    try:
        net = load_model(model, torch_device)
    except WeightsError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
    errors: list[str] = []
    results = run_eval(net, data, sigmas, estimate_sigma_, peer_fns, limit, on_error=errors.append, ensemble=ensemble)
    if per_image:
        console.print(render_images(results))
    console.print(render_means(results, f"circatt eval -- model {model}"))
    meta = {"model": str(model), "config": net.config.to_dict(), "sigmas": sigmas, "limit": limit}
    try:
        if json_path:
            write_json(json_path, results, meta)
        if csv_path:
            write_csv(csv_path, results)
    except OSError as err:
        print_error(console, f"cannot write the results: {err}")
        raise typer.Exit(1) from None
    for error in errors:
        print_error(console, f"{error} (left out)")
    if errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
