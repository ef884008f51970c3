"""The method's commands of `cdsp`: the dataset tools (`data_app`, `cdsp data ...`), `predict`, and
`run_here` (what `cdsp run` does without `--ray`).

Heavy modules (torch, OpenCV) are imported inside the commands so that `cdsp --help` and the
REST client verbs start quickly. The command tree itself is built in one place, `service/cli.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from cdsp_core.spec import ExperimentSpec

# No markup parsing of what we print: paths and messages are text ("[a]" in a path stays).
console = Console(markup=False, soft_wrap=True)
err = Console(stderr=True, markup=False, soft_wrap=True)

data_app = typer.Typer(
    help="Dataset tools: synthetic data, scribble variants, distance maps, converters.",
    no_args_is_help=True,
)

RootOpt = Annotated[Path, typer.Option("--root", help="Dataset root (VOC/ScribbleSup layout).")]


def error_line(message: str) -> None:
    """One `error:` line on stderr, the message as plain text (never read as rich markup)."""
    err.print("[red]error:[/red] " + escape(message), markup=True)


def fail(message: str) -> None:
    """Print a one-line error and exit 2."""
    error_line(message)
    raise typer.Exit(2)


@data_app.command("synth")
def data_synth(
    root: RootOpt = Path("data/synthetic"),
    train: Annotated[int, typer.Option(help="Training images.")] = 400,
    val: Annotated[int, typer.Option(help="Validation images.")] = 60,
    size: Annotated[
        int, typer.Option(help="Image side in pixels (65 = 8 x 8 + 1: features line up with pixels).")
    ] = 65,
    classes: Annotated[int, typer.Option("--classes", help="Classes including background.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes used to render.")] = 2,
    objects: Annotated[str, typer.Option(help="Objects per image: N, or MIN-MAX.")] = "2-3",
    preview: Annotated[bool, typer.Option(help="Write preview.png (image, truth, scribble, d_s, d_c).")] = True,
) -> None:
    """Generate the synthetic dataset (deterministic per seed) and a preview figure."""
    from cdsp_core.data.synthetic import generate
    from cdsp_core.figures import dataset_preview

    low, _, high = objects.partition("-")
    try:
        counts = (int(low), int(high or low))
    except ValueError:
        fail(f"--objects must be N or MIN-MAX (e.g. 1 or 2-3), got {objects!r}")
    try:
        stats = generate(root, train, val, size, classes, seed, workers=workers, objects=counts)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    console.print(
        f"wrote {stats['num_train']} train + {stats['num_val']} val images of {size} px, "
        f"{classes} classes ({', '.join(stats['classes'][1:])}), "
        f"{stats['scribbled_percent']:.1f}% of train pixels scribbled, in {stats['seconds']:.1f} s -> {root}"
    )
    if preview:
        path = dataset_preview(root, classes, root / "preview.png")
        console.print(f"preview: {path}")


@data_app.command("variants")
def data_variants(
    root: RootOpt = Path("data/synthetic"),
    shrink: Annotated[float, typer.Option(help="Shrink ratio r in [0, 1].")] = 0.0,
    drop: Annotated[float, typer.Option(help="Drop ratio r in [0, 1].")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the drop variant.")] = 0,
    num_classes: Annotated[int, typer.Option(help="Classes including background.")] = 5,
    scribble_dir: Annotated[str, typer.Option(help="Base scribble folder under the root.")] = "pascal_2012_scribble",
    train_list: Annotated[
        str, typer.Option(help="Split list whose ids get variants.")
    ] = "ImageSets/SegmentationAug/train.txt",
) -> None:
    """Write (or reuse) a cached shrink/drop variant of the scribbles."""
    from cdsp_core.data.scribbles import make_variant
    from cdsp_core.spec import DataSpec

    if not shrink and not drop:
        fail("give --shrink and/or --drop (both are 0)")
    try:
        data = DataSpec(
            root=str(root),
            num_classes=num_classes,
            scribble_dir=scribble_dir,
            train_list=train_list,
        )
        folder = make_variant(data, shrink, drop, seed)
    except (ValueError, OSError) as exc:  # DatasetError is a ValueError; a file where a folder goes...
        fail(str(exc))
    console.print(f"variant: {folder}")


@data_app.command("distance-maps")
def data_distance_maps(
    root: RootOpt = Path("data/synthetic"),
    out: Annotated[Path, typer.Option(help="Cache folder (relative paths are under the root).")] = Path(
        "distance_maps"
    ),
    lambda_s: Annotated[float, typer.Option(help="Exponent lambda_s of Eq. 16.")] = 1.0,
    lambda_c: Annotated[float, typer.Option(help="Exponent lambda_c of Eq. 14.")] = 6.0,
    num_classes: Annotated[int, typer.Option(help="Classes including background.")] = 5,
    scribble_dir: Annotated[str, typer.Option(help="Scribble folder under the root.")] = "pascal_2012_scribble",
    pseudo_dir: Annotated[str | None, typer.Option(help="Pseudo-label folder (absolute or under the root).")] = None,
    train_list: Annotated[str, typer.Option(help="Split list.")] = "ImageSets/SegmentationAug/train.txt",
) -> None:
    """Precompute the scribble (and pseudo-label boundary) distance maps of every training image."""
    from cdsp_core.data.distance_maps import write_distance_maps
    from cdsp_core.spec import DataSpec

    try:
        data = DataSpec(
            root=str(root),
            num_classes=num_classes,
            scribble_dir=scribble_dir,
            pseudo_label_dir=pseudo_dir,
            train_list=train_list,
        )
        folder, n, seconds = write_distance_maps(data, out, lambda_s, lambda_c)
    except (ValueError, OSError) as exc:  # DatasetError is a ValueError; a file where a folder goes...
        fail(str(exc))
    console.print(
        f"wrote {n} images' distance maps in {seconds:.1f} s ({1000 * seconds / max(n, 1):.2f} ms each) -> {folder}"
    )


@data_app.command("scribblesup-xml")
def data_scribblesup_xml(
    xml_dir: Annotated[Path, typer.Argument(help="Folder of ScribbleSup XML files.")],
    out: Annotated[Path, typer.Option(help="Output folder of scribble PNGs.")],
    images: Annotated[Path | None, typer.Option(help="Image folder, for XML files without <size>.")] = None,
    width: Annotated[int, typer.Option(help="Stroke width in pixels.")] = 3,
) -> None:
    """Convert the original ScribbleSup XML annotations to scribble PNGs."""
    from cdsp_core.data.scribblesup import convert

    try:
        n = convert(xml_dir, out, images, width)
    except (ValueError, OSError) as exc:  # DatasetError is a ValueError; a file where a folder goes...
        fail(str(exc))
    console.print(f"converted {n} annotations -> {out}")


@data_app.command("degrade")
def data_degrade(
    root: RootOpt = Path("data/synthetic"),
    level: Annotated[float, typer.Option(help="Error strength in [0, 1]: 0 is the ground truth.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed (with each image id).")] = 0,
    num_classes: Annotated[int, typer.Option(help="Classes including background.")] = 5,
    out: Annotated[str | None, typer.Option(help="Output folder name under the root.")] = None,
    scribbles: Annotated[
        bool,
        typer.Option(
            help="Classes named by the scribble and its pixels kept, as stage 1 does (the study's "
            "labels); --no-scribbles: classes from the ground truth, no scribble pixel."
        ),
    ] = True,
) -> None:
    """Pseudo-labels of controlled quality: ground truth with CAM-like errors (for the Table 3 study)."""
    from cdsp_core.data.degrade import write_degraded
    from cdsp_core.spec import DataSpec

    try:
        data = DataSpec(root=str(root), num_classes=num_classes)
        name, miou = write_degraded(data, level, seed, out, use_scribbles=scribbles)
    except (ValueError, OSError) as exc:  # DatasetError is a ValueError; a file where a folder goes...
        fail(str(exc))
    console.print(f"pseudo-labels at level {level:g}: {miou:.2f} mIoU against ground truth -> {root / name}")
    console.print(f"use them with: --set data.pseudo_label_dir={name}")


@data_app.command("trivial")
def data_trivial(
    root: RootOpt = Path("data/synthetic"),
    num_classes: Annotated[int, typer.Option(help="Classes including background.")] = 5,
    out: Annotated[str, typer.Option(help="Output folder name under the root.")] = "pseudo_trivial",
) -> None:
    """The trivial label as pseudo-labels (scribbled pixels keep their class, the rest is background):
    the baseline a stage 1 must beat."""
    from cdsp_core.data.degrade import write_trivial
    from cdsp_core.spec import DataSpec

    try:
        name = write_trivial(DataSpec(root=str(root), num_classes=num_classes), out)
    except (ValueError, OSError) as exc:  # DatasetError is a ValueError; a file where a folder goes...
        fail(str(exc))
    console.print(f"trivial labels -> {root / name}")
    console.print(f"use them with: --set data.pseudo_label_dir={name}")


def run_here(spec: ExperimentSpec, out: str, progress: bool = True) -> None:
    """`cdsp run` without `--ray`: the pipeline in this process (`InProcess`), then its summary line."""
    import torch

    from cdsp_core import runs
    from cdsp_core.data.layout import DatasetError
    from cdsp_core.pipeline import run_pipeline
    from cdsp_core.runner import Runner, default_device

    if spec.resources.use_gpu and not torch.cuda.is_available():
        fail("resources.use_gpu is true but no CUDA device is visible")
    runner = Runner(run=out, device=default_device(spec.resources.use_gpu), progress=progress)
    from cdsp_core.engine import TrainingDiverged

    try:
        result = run_pipeline(spec, out, runner)
    except (DatasetError, ValueError, TrainingDiverged) as exc:
        fail(str(exc))
    console.print(runs.summary(result, out), highlight=False, soft_wrap=True)


def predict(
    checkpoint: Annotated[str, typer.Argument(help="A stage-2 checkpoint (.pt, local path or URI).")],
    images: Annotated[list[Path], typer.Argument(help="Images to segment.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    raw: Annotated[bool, typer.Option(help="Also write the label map (<name>_label.png, class indices).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Write colour-coded masks (<name>.png) for images with a trained stage-2 checkpoint."""
    from cdsp_core.data.layout import DatasetError
    from cdsp_core.predict import predict_files

    try:
        written = predict_files(checkpoint, images, out, device=device, raw=raw)
    except (DatasetError, ValueError, OSError) as exc:
        fail(str(exc))
    for path in written:
        console.print(str(path))
