"""`circatt inspect-attention IMAGE`: pictures of what GroupCDL attends to at one layer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.table import Table

import circatt_ops as ca

from . import attention_plots as plots
from .console import escape, make_console, print_error
from .denoise import Models, estimate, to_tensor
from .devices import resolve_device
from .imageio import ImageError, read_image, to_channels
from .model import PRESETS
from .paths import check_result_file
from .weights import WeightsError


def parse_pixel(text: str) -> tuple[int, int]:
    """'Y,X' -> (y, x)."""
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not Y,X (two integers, e.g. 120,64)", param_hint="--pixel") from None
    return y, x


def chosen_pixels(texts: list[str], gray: np.ndarray) -> dict[str, tuple[int, int]]:
    """The --pixel list (checked against the image size), or an edge, a texture and a flat pixel."""
    if not texts:
        return plots.pick_pixels(gray)
    H, W = gray.shape
    pixels = {}
    for text in texts:
        y, x = parse_pixel(text)
        if not (0 <= y < H and 0 <= x < W):
            raise typer.BadParameter(f"pixel ({y}, {x}) is outside the {H}x{W} image", param_hint="--pixel")
        pixels[f"{y},{x}"] = (y, x)
    return pixels


def export(G: ca.Circulant, path: Path, layer: int, image_size: tuple[int, int]) -> None:
    """torch.save a dict with the stored values, the pattern facts and the sparse CSR matrix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse")
        csr = G.detach().to("cpu").to_sparse_csr()
    with open(path, "wb") as handle:  # so that an unwritable path is an OSError, not torch.save's RuntimeError
        torch.save(
            {
                "values": G.values.detach().cpu(),
                "window": G.window,
                "latent_size": G.spatial_size,
                "image_size": image_size,
                "layer": layer,
                "csr": csr,
                "layout": "values[b, head, i, j, a, c]: query (i, j), key ((i+a-r) mod h, (j+c-r) mod w), r = window//2",
            },
            handle,
        )


def summary(G: ca.Circulant, layer: int, eff: np.ndarray, image_size: tuple[int, int], sigma: float) -> Table:
    """Layer, window, sizes, stored entries, sparsity and mean effective neighbours."""
    h, w = G.spatial_size
    n, K = h * w, G.window**2
    table = Table(show_header=False, box=None)
    table.add_row("layer", str(layer))
    table.add_row("image", f"{image_size[1]}x{image_size[0]} pixels -> latent {w}x{h} (stride 2: attention is at half resolution)")
    table.add_row("window", f"{G.window}x{G.window} latent pixels, wrapping around the edges ({K} keys per query)")
    table.add_row("matrix", f"{n:,} x {n:,}, {G.nnz:,} stored entries, sparsity {100 * (1 - K / n):.3f}%" if n > K else f"{n} x {n}")
    table.add_row("sigma", f"{sigma * 255:.2f} (0-255 scale)")
    table.add_row("effective neighbours", f"mean {eff.mean():.1f}, min {eff.min():.1f}, max {eff.max():.1f} of {K}")
    return table


def bccb_picture(theta: torch.Tensor, phi: torch.Tensor, path: Path) -> None:
    """The BCCB kernel that circatt_ops.bccb builds from the same theta, phi features."""
    from circatt_ops.bccb import bccb_attention

    _, op = bccb_attention(theta.float(), phi.float(), theta.float(), return_kernel=True)
    plots.save_kernel(op.kernel[0, 0], path)


def inspect_attention(
    image_path: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image to look at.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs (created).", show_default=False)],
    layer: Annotated[Optional[int], typer.Option(min=1, help="Iteration whose adjacency to show (1-based). Default: the last.")] = None,
    pixel: Annotated[Optional[list[str]], typer.Option(help="Y,X of a pixel to show (repeatable). Default: an edge, a texture and a flat pixel.")] = None,
    export_path: Annotated[Optional[Path], typer.Option("--export", help="Save the adjacency (values and torch sparse CSR) to this file.")] = None,
    model: Annotated[Optional[str], typer.Option(help=f"{', '.join(PRESETS)}, or a weights file. Default: chosen from the image. A gray model sees a colour image's 8-bit luma, as in eval.")] = None,
    sigma: Annotated[Optional[float], typer.Option(min=0, max=255, help="Noise level on the 0-255 scale. Default: estimated.")] = None,
    bccb: Annotated[bool, typer.Option("--bccb", help="Also draw the global BCCB kernel of the same features.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Draw the layer's circulant adjacency: sparsity pattern, pixel attention maps, effective neighbours."""
    console = make_console()
    torch_device, device_line = resolve_device(device)
    check_result_file(export_path, "--export")  # now, not after the model ran
    models = Models(model, torch_device)
    models.preload()
    try:
        image = read_image(image_path)
        net = models.get(image.channels)
        pixels_in = to_channels(image.pixels, net.config.channels)
        gray = to_channels(image.pixels, 1)[..., 0]
        picks = chosen_pixels(pixel or [], gray)
        layer = layer or net.config.iterations
        if layer > net.config.iterations:
            raise typer.BadParameter(f"the model has {net.config.iterations} layers", param_hint="--layer")
        x = to_tensor(pixels_in, torch_device)
        s = sigma / 255.0 if sigma is not None else estimate(x)
        G, theta, phi = net.attention_at(x, torch.tensor([s], device=torch_device), layer)
    except (ImageError, WeightsError) as err:
        print_error(console, err)
        raise typer.Exit(code=1) from None
    except typer.BadParameter:
        raise
    except Exception as err:  # e.g. out of memory on a large image: one line, as in denoise; the traceback with --debug
        print_error(console, f"{image_path}: {type(err).__name__}: {err}")
        if debug:
            console.print_exception()
        raise typer.Exit(code=1) from None
    console.print(device_line)
    written = [out / "adjacency_pattern.png", out / "attention_pixels.png", out / "effective_neighbours.png"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        plots.save_pattern(G, written[0])
        plots.save_pixel_maps(G, gray, picks, written[1])
        eff = plots.save_neighbours(G, gray, written[2])
        if bccb:
            written.append(out / "bccb_kernel.png")
            bccb_picture(theta, phi, written[-1])
        if export_path is not None:
            export(G, export_path, layer, image.size)
            written.append(export_path)
    except OSError as err:
        print_error(console, f"cannot write the results: {err}")
        if debug:
            console.print_exception()
        raise typer.Exit(code=1) from None
    console.print(G.detach().spy(width=32))
    console.print(summary(G, layer, eff, image.size, s))
    for name, (y, x) in picks.items():
        console.print(f"pixel {name}: ({y}, {x}) -> latent {plots.to_latent(y, x, image.size)}")
    for path in written:
        console.print(f"wrote {escape(str(path))}")


def register(app: typer.Typer) -> None:
    app.command("inspect-attention", no_args_is_help=True)(inspect_attention)
