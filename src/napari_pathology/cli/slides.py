"""Sub-commands about one slide: ``info``, ``synth``, ``demo``, ``tissue`` and ``nuclei``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from napari_pathology.cli.errors import CommandError, refuse_existing
from napari_pathology.cli.options import CHUNK_PX, MASK_MPP, SLIDE_SIZE, SYNTH_MPP, mpp_option, seed_int
from napari_pathology.cli.progress_bars import run_with_progress
from napari_pathology.fileio import ensure_writable_dir, require_finite

# --------------------------------------------------------------------------- info


def format_info(info: dict[str, Any]) -> str:
    """Plain-text slide facts, one per line."""
    mpp = (
        f"{info['mpp_x']:.4g} x {info['mpp_y']:.4g} um/px ({info['mpp_source']})"
        if info["mpp_x"]
        else f"unknown ({info['mpp_note']})"
    )
    size_mm = (
        f"{info['width'] * info['mpp_x'] / 1000:.2f} x {info['height'] * info['mpp_y'] / 1000:.2f} mm"
        if info["mpp_x"]
        else "unknown"
    )
    power = f"{info['objective_power']:g}x" if info["objective_power"] else "unknown"
    levels = ", ".join(
        f"{w}x{h} (/{d:g})"
        for (w, h), d in zip(info["level_dimensions"], info["level_downsamples"], strict=True)
    )
    lines = [
        f"file:          {info['path']}",
        f"vendor:        {info['vendor']} (read by {info['backend']})",
        f"size:          {info['width']} x {info['height']} px, {size_mm}",
        f"um/px:         {mpp}",
        f"objective:     {power}",
        f"levels:        {info['levels']}: {levels}",
        f"associated:    {', '.join(info['associated_images']) or 'none'}",
    ]
    if info.get("brightfield") is False:
        lines.append("stain:         fluorescence (dark-field): the H&E models and tissue masks do not apply")
    lines += [f"warning:       {warning}" for warning in info.get("warnings", ())]
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_pathology.slide import open_slide

    slide = open_slide(args.slide, mpp=args.mpp)
    slide.validate()
    info = slide.info().as_dict()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# --------------------------------------------------------------------------- synth


def tumour_type_option(text: str) -> str:
    """``--tumour-type``: ``A`` or ``B`` (either case), see ``slide.synthetic.TUMOUR_TYPES``."""
    from napari_pathology.slide.synthetic import TUMOUR_TYPES

    value = text.strip().upper()
    if value not in TUMOUR_TYPES:
        raise argparse.ArgumentTypeError(f"must be {' or '.join(TUMOUR_TYPES)}, got {text!r}")
    return value


def _cmd_synth(args: argparse.Namespace) -> int:
    from napari_pathology.slide.synthetic import generate_synthetic_slide, truth_paths

    if args.negative and args.tumour_type is not None:
        raise CommandError(
            f"--tumour-type {args.tumour_type} needs a slide with tumour; a --negative slide has none"
        )
    out = Path(args.out)
    if out.suffix.lower() not in {".tif", ".tiff"}:
        raise CommandError(f"output must end in .tif or .tiff, got {out.name}")
    if out.is_dir():
        raise CommandError(f"output {out} is a folder; give a .tif file name")
    refuse_existing(list(truth_paths(out).values()), args.overwrite, "output name")
    ensure_writable_dir(out.parent)  # before minutes of rendering
    job = generate_synthetic_slide(
        out,
        size=args.size,
        seed=args.seed,
        negative=args.negative,
        tumour_size="micro" if args.micro else "macro",
        mpp=args.mpp,
        pen_mark=args.pen_mark,
        blurred_patch=args.blurred_patch,
        tumour_type=args.tumour_type,
    )
    truth = run_with_progress(job, f"writing {out.name}", quiet=args.quiet)
    kind = f" (type {truth.tumour_type})" if truth.tumour_type else ""
    print(
        f"{truth.slide_path}: {truth.width}x{truth.height} px at {truth.mpp} um/px, "
        f"label {truth.label}{kind}, tumour {truth.tumour_area_um2 / 1e6:.3f} mm^2, "
        f"{truth.n_nuclei} nuclei; ground truth in {truth.truth_json.name}"
    )
    return 0


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from napari_pathology.demo import cache_dir, ensure_demo_slide
    from napari_pathology.slide import open_slide
    from napari_pathology.slide.synthetic import load_truth

    ensure_writable_dir(args.cache_dir or cache_dir())
    path = run_with_progress(
        ensure_demo_slide(args.size, args.seed, folder=args.cache_dir),
        "making the demo slide (once)",
    )
    if args.headless:
        slide = open_slide(path)
        slide.validate()
        truth = load_truth(path)
        print(format_info(slide.info().as_dict()))
        print(
            f"truth:         label {truth['label']}, tumour {truth['tumour_area_mm2']:.3f} mm^2, "
            f"tissue {truth['tissue_area_mm2']:.2f} mm^2, {truth['n_nuclei']} nuclei "
            f"({truth['n_tumour_nuclei']} tumour)"
        )
        _demo_models(slide, path, args)
        return 0
    from napari_pathology._viewer import open_demo_viewer

    open_demo_viewer(path)
    return 0


def _demo_models(slide, path: Path, args: argparse.Namespace) -> None:
    """Run the shipped models on the demo slide and say what they found against the truth."""
    from napari_pathology.analysis import RunSettings, result_folder, run_analysis
    from napari_pathology.cohort import SlideEntry
    from napari_pathology.demo import cache_dir
    from napari_pathology.geometry import rasterize_polygons
    from napari_pathology.models import ModelError, resolve_model
    from napari_pathology.slide.synthetic import truth_paths
    from napari_pathology.tissue import TissueParams, detect_tissue

    tissue = run_with_progress(detect_tissue(slide, TissueParams()), "tissue mask")
    print(f"tissue:        {tissue.area_mm2:.2f} mm^2 found (CLAM-style saturation threshold)")
    polygons = SlideEntry(path, None, truth_paths(path)["tumour_geojson"]).tumour_polygons_um(slide.mpp)
    from napari_pathology.families import list_families

    for name in [n for f in list_families() if f.input_kind == "tile" for n in f.demo_weights]:
        try:
            model = resolve_model(name)
        except ModelError as error:
            print(f"{name}:    not available ({error})")
            continue
        out = result_folder((args.cache_dir or cache_dir()) / "results", slide, name)
        result = run_with_progress(
            run_analysis(slide, model, tissue=tissue, settings=RunSettings(), out_dir=out), name
        )
        line = f"{name + ':':<15}{result.summary()}"
        if len(result.detections):
            hits = sum(
                bool(rasterize_polygons(polygons, (1, 1), offset=(x - 0.5, y - 0.5))[0, 0])
                for x, y, _ in result.detections
            )
            line += f"; {hits}/{len(result.detections)} detections inside the planted tumour"
        print(line)
    _demo_nuclei(slide, path, polygons)
    print(f"results:       {(args.cache_dir or cache_dir()) / 'results'}")


def _demo_nuclei(slide, path: Path, polygons: list, side_um: float = 300.0) -> None:
    """Detect and classify the nuclei of a box on the tumour's edge; compare purity with the truth."""
    import numpy as np

    from napari_pathology.models import ModelError, resolve_model
    from napari_pathology.nuclei import NucleusPoints, read_csv, region_summaries
    from napari_pathology.nuclei.classify import classify_nuclei
    from napari_pathology.nuclei.run import detect_in_slide
    from napari_pathology.slide.synthetic import truth_paths

    if not polygons:
        return
    from napari_pathology.families import list_families

    names = [n for f in list_families() if f.input_kind == "nucleus" for n in f.demo_weights]
    try:
        if not names:
            raise ModelError("no nucleus classifier ships with this installation")
        model = resolve_model(names[0])
    except ModelError as error:
        print(f"nuclei:        purity model not available ({error})")
        return
    ring = np.asarray(polygons[0][0])
    x, y = ring[np.argmin(ring[:, 0])] - side_um / 2  # the tumour's leftmost point: tumour and normal
    width, height = (d * m for d, m in zip(slide.dimensions, slide.require_mpp(), strict=True))
    x, y = float(np.clip(x, 0, max(0.0, width - side_um))), float(np.clip(y, 0, max(0.0, height - side_um)))
    box = (x, y, min(side_um, width), min(side_um, height))
    table = run_with_progress(detect_in_slide(slide, region_um=box), "nuclei")
    found = NucleusPoints.from_table(table)
    probability = run_with_progress(classify_nuclei(slide, found.xy_um(), model), "purity")
    found = found.with_probabilities(probability)
    corners = np.array([[x, y], [x + box[2], y], [x + box[2], y + box[3]], [x, y + box[3]]])
    [truth] = region_summaries(read_csv(truth_paths(path)["nuclei_csv"]), [[corners]])
    print(
        f"nuclei:        {len(found)} found in a {box[2]:.0f} um box on the tumour's edge; predicted purity "
        f"{found.predicted_purity() or 0:.2f} ({model.spec.name}), true {truth.purity or 0:.2f} "
        f"({truth.counts['tumour']}/{truth.n} rendered nuclei are tumour)"
    )


# --------------------------------------------------------------------------- tissue


def _tissue_params(args: argparse.Namespace):
    from napari_pathology.tissue import TissueParams

    return TissueParams(method=args.method, mask_mpp=args.mask_mpp, exclude_pen=args.exclude_pen)


def _cmd_tissue(args: argparse.Namespace) -> int:
    from napari_pathology.tissue import write_tissue_outputs

    refuse_existing([Path(args.out) / "tissue.json"], args.overwrite, "--out folder")
    ensure_writable_dir(args.out)  # before reading the slide
    paths = run_with_progress(
        write_tissue_outputs(args.slide, args.out, _tissue_params(args), mpp=args.mpp),
        "tissue mask",
        args.quiet,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# --------------------------------------------------------------------------- nuclei


def parse_roi(
    text: str, mpp: tuple[float, float], extent_um: tuple[float, float] | None = None
) -> tuple[float, float, float, float]:
    """``--roi x,y,w,h`` in micrometres, or in level-0 pixels with a ``px`` suffix, as um.

    Parameters
    ----------
    text : str
        The option's value.
    mpp : tuple of float
        Level-0 um/px ``(x, y)``, for the ``px`` form.
    extent_um : tuple of float, optional
        The slide's ``(width, height)`` in um; a region entirely outside it is refused.

    Raises
    ------
    CommandError
        Not four finite numbers, a negative corner, an empty region, or off the slide.
    """
    raw = text.strip().lower()
    in_px = raw.endswith("px")
    raw = raw.removesuffix("px").removesuffix("um").strip()
    usage = "--roi must be x,y,w,h in um (or in level-0 pixels ending in px)"
    try:
        values = [require_finite(v, "--roi") for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise CommandError(f"{usage}, four finite numbers; got {text!r}")
    if values[0] < 0 or values[1] < 0 or values[2] <= 0 or values[3] <= 0:
        raise CommandError(f"{usage}, with x, y >= 0 and w, h > 0; got {text!r}")
    if in_px:
        values = [values[0] * mpp[0], values[1] * mpp[1], values[2] * mpp[0], values[3] * mpp[1]]
    if extent_um is not None and (values[0] >= extent_um[0] or values[1] >= extent_um[1]):
        raise CommandError(
            f"--roi {text!r} starts outside the slide ({extent_um[0]:g} x {extent_um[1]:g} um); "
            "give x,y inside it"
        )
    return values[0], values[1], values[2], values[3]


def _cmd_nuclei(args: argparse.Namespace) -> int:
    from napari_pathology.nuclei import NucleusPoints, write_geojson
    from napari_pathology.nuclei.run import detect_in_slide
    from napari_pathology.slide import open_slide
    from napari_pathology.tissue import TissueParams, detect_tissue

    for option, target in (("--out", args.out), ("--geojson", args.geojson)):
        if target is not None and Path(target).is_dir():
            raise CommandError(f"{option} {target} is a folder; give a file name")
        if target is not None:
            refuse_existing([Path(target)], args.overwrite, option)
            ensure_writable_dir(Path(target).parent)  # before reading the slide
    slide = open_slide(args.slide, mpp=args.mpp)
    slide.validate()
    mpp = slide.require_mpp()
    extent = (slide.dimensions[0] * mpp[0], slide.dimensions[1] * mpp[1])
    roi = parse_roi(args.roi, mpp, extent) if args.roi else None
    use_tissue = args.tissue if args.tissue is not None else (roi is None and slide.level_count > 1)
    tissue = None
    if use_tissue:
        tissue = run_with_progress(detect_tissue(slide, TissueParams()), "tissue mask", args.quiet)
        if tissue.is_empty:
            raise CommandError(f"no tissue found in {slide.name}; use --no-tissue to search everywhere")
    job = detect_in_slide(slide, region_um=roi, tissue=tissue, chunk_px=args.chunk_px)
    table = run_with_progress(job, f"nuclei in {slide.name}", args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out)
    where = "x={:g} y={:g} w={:g} h={:g} um".format(*roi) if roi else "the whole slide"
    where += " (tissue only)" if tissue is not None else ""
    print(f"{len(table)} nuclei in {where} of {slide.name}")
    print(f"csv: {args.out}")
    if args.geojson:
        args.geojson.parent.mkdir(parents=True, exist_ok=True)
        # detections: QuPath stays fluid with 10^5+ of them (annotations are for hand-made labels)
        write_geojson(NucleusPoints.from_table(table), args.geojson, mpp, object_type="detection")
        print(f"geojson: {args.geojson}")
    return 0


# --------------------------------------------------------------------------- parsers


def add_parsers(sub: Any) -> None:
    """Add ``demo``, ``info``, ``synth``, ``tissue`` and ``nuclei`` to the sub-command set ``sub``."""
    demo = sub.add_parser("demo", help="open napari on a synthetic demo slide (made once, cached)")
    demo.add_argument("--headless", action="store_true", help="print a summary instead of a GUI")
    demo.add_argument("--size", type=SLIDE_SIZE, default=None, help="slide side in pixels")
    demo.add_argument("--seed", type=seed_int, default=None, help="random seed of the demo slide")
    demo.add_argument("--cache-dir", type=Path, default=None, help="where demo slides are kept")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="print a slide's facts")
    info.add_argument("slide", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--mpp", type=mpp_option, default=None, help="um/px to use instead of the file's")
    info.set_defaults(func=_cmd_info)

    synth = sub.add_parser("synth", help="write a synthetic H&E slide with ground truth")
    synth.add_argument("out", type=Path, help="output .tif path")
    synth.add_argument("--size", type=SLIDE_SIZE, default=20_000, help="side in pixels (default 20000)")
    synth.add_argument("--seed", type=seed_int, default=0)
    synth.add_argument("--negative", action="store_true", help="no tumour (a normal slide)")
    synth.add_argument("--micro", action="store_true", help="one small lesion (micro-metastasis)")
    synth.add_argument(
        "--tumour-type",
        type=tumour_type_option,
        default=None,
        metavar="A|B",
        help="A: crowded dark nuclei in nests (default); B: solid sheets of large vesicular nuclei "
        "with prominent nucleoli (not with --negative)",
    )
    synth.add_argument("--mpp", type=SYNTH_MPP, default=0.5, help="um/px at level 0 (default 0.5)")
    synth.add_argument("--pen-mark", action="store_true", help="add a pen-ink stroke")
    synth.add_argument("--blurred-patch", action="store_true", help="add an out-of-focus patch")
    synth.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_cmd_synth)

    tissue = sub.add_parser("tissue", help="detect tissue; write mask PNG + JSON and GeoJSON polygons")
    tissue.add_argument("slide", type=Path)
    tissue.add_argument("--out", type=Path, required=True, help="output folder")
    tissue.add_argument("--method", choices=["saturation", "otsu", "gray"], default="saturation")
    tissue.add_argument("--mask-mpp", type=MASK_MPP, default=8.0, help="um/px of the mask (default 8)")
    tissue.add_argument("--exclude-pen", action="store_true", help="remove green/blue/red pen ink")
    tissue.add_argument("--mpp", type=mpp_option, default=None, help="um/px for slides that lack it")
    tissue.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    tissue.add_argument("--quiet", action="store_true", help="no progress bar")
    tissue.set_defaults(func=_cmd_tissue)

    nuclei = sub.add_parser("nuclei", help="detect nuclei at full resolution; CSV of centroids in um")
    nuclei.add_argument("slide", type=Path, help="whole-slide image or plain image (PNG, JPEG, TIFF)")
    nuclei.add_argument(
        "--out",
        type=Path,
        required=True,
        help="CSV: x_um,y_um,area_um2,hematoxylin,eccentricity (um from the top-left)",
    )
    nuclei.add_argument(
        "--roi",
        default=None,
        help="region x,y,w,h in um from the slide's top-left corner (level 0); "
        "end with px for level-0 pixels, e.g. 0,0,2048,2048px",
    )
    nuclei.add_argument("--mpp", type=mpp_option, default=None, help="um/px for images that lack it")
    nuclei.add_argument(
        "--geojson",
        type=Path,
        default=None,
        help="also write QuPath GeoJSON detections (points in level-0 px; File > Import objects)",
    )
    nuclei.add_argument(
        "--tissue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip chunks without tissue (default: on for a whole multi-level slide, "
        "off with --roi or for a single-level image)",
    )
    nuclei.add_argument("--chunk-px", type=CHUNK_PX, default=1024, help="chunk side in level-0 px")
    nuclei.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    nuclei.add_argument("--quiet", action="store_true", help="no progress bar")
    nuclei.set_defaults(func=_cmd_nuclei)
