"""Export a trained run so that it runs without cxrkit: ONNX (main) or TorchScript.

    OUT/model.onnx   float32 "image" [N, C, S, S] -> float32 "logits" [N, K], N dynamic
    OUT/model.pt     the same network as TorchScript (`--format torchscript`)
    OUT/model.json   the sidecar: preprocessing, labels, threshold, temperature, bias

Each model file also carries the sidecar (ONNX metadata; a TorchScript extra file), with a
digest of the weights: a folder holding both formats keeps them of one model, and a new
sidecar (after recalibration) is written into both.

The graph outputs *logits*, not probabilities: temperature and bias are then numbers
in the sidecar that recalibration can change without a new export, and every
consumer (cxrkit's own `predict --backend onnx` included) applies the same
`softmax(logits / temperature + bias)`. The sidecar repeats the preprocessing facts in
words (`preprocess`) so that the file is usable from any language.

`cxrkit.onnx_backend` runs an ONNX export with ONNX Runtime and no PyTorch, with the
preprocessing every model shares (`cxrkit.data.io.at_input_size`).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch

from cxrkit.labels import positive_label
from cxrkit.models import Classifier, ModelSpec, weights_digest
from cxrkit.onnx_backend import FILE_NAMES, INPUT_NAME, OUTPUT_NAME, SIDECAR
from cxrkit.runs import (
    MODEL_WEIGHTS,
    Calibration,
    deployed_calibration,
    load_model,
    model_folder,
)
from cxrkit.spec import INTENDED_USE

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")

PREPROCESS = (
    "Read the film as 8-bit grayscale: turn it upright by its EXIF orientation; composite "
    "transparency on black; colour -> luminance (PIL convert('L')). A film that is not 8-bit "
    "(16-bit PNG or TIFF, float TIFF) is stretched to 0..255 in float32 between lo and hi, "
    "numpy's 0.1th and 99.9th percentiles of its pixels x with q1 - 3 (q3 - q1) <= x <= q3 + "
    "3 (q3 - q1), q1 and q3 its 25th and 75th percentiles (if then hi <= lo: those "
    "percentiles of all its pixels; if still, its minimum and maximum): "
    "round(clip((x - lo) * (255 / (hi - lo)), 0, 255)) with numpy's round half to even. A "
    "DICOM of 8 unsigned bits with no rescale (slope 1, intercept 0), window, modality LUT "
    "or VOI LUT is taken as stored (colour: PIL convert('L')); any other goes through "
    "pydicom's apply_modality_lut, then (one channel) apply_voi_lut(prefer_lut=True) with "
    "its defaults (a VOI LUT before a window, the first window, its VOILUTFunction), colour "
    "to the mean of its channels, then that stretch. A DICOM shown inverted, MONOCHROME1 or "
    "MONOCHROME2 with PresentationLUTShape INVERSE, is then inverted (255 - x). If `equalize`, "
    "histogram-equalise it (PIL ImageOps.equalize). Resize the whole film, squashed to a "
    "square and never cropped, to input_size x input_size with PIL: img.resize((s, s), "
    "Image.BILINEAR, reducing_gap=3.0), which antialiases; a plain bilinear interpolation of "
    "a large film (most non-PIL resizers) gives other probabilities. Scale to [0, 1], repeat "
    "the gray channel to `in_chans`, then per channel (x - mean) / std. Feed float32 NCHW as "
    "`image`. The output `logits` [N, classes] has column i for labels[i]: probabilities = "
    "softmax(logits / temperature + bias), bias one number per class added to each row. With "
    "two labels the prediction is `positive_label` when its probability >= threshold, else "
    "the other; with more, the most probable. model.onnx's metadata holds these same fields, "
    "each value JSON-encoded."
)


DYNAMO_MIN_OPSET = 18
# The oldest opset torch's exporters write. Outside it, and past the newest the installed
# onnx knows, the TorchScript exporter fails after printing its whole graph to the process's
# stdout (from C++, past sys.stdout): refused before it runs.
MIN_OPSET = 7


def export_model(run: str | Path, format: str = "onnx", out: str | Path | None = None,
                 opset: int | None = None) -> Path:
    """Write RUN's model as `format` into `out` (default RUN/export) with its sidecar;
    returns the model file (OUT/model.onnx or OUT/model.pt). Its folder is what `predict`
    and `create_app` take (the file works too)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if out is not None and Path(out).suffix.lower() in (".onnx", ".pt", ".json"):
        raise ValueError(f"--out (out=) {out}: give a folder; it gets {FILE_NAMES[format]} and "
                         f"model.json (e.g. --out {Path(out).with_suffix('')})")
    if out is not None and (Path(out) / MODEL_WEIGHTS).is_file():  # its model.json is the run's
        raise ValueError(f"--out (out=) {out} is a run folder: the export's model.json would "
                         "replace the run's own. Export to a folder of its own (default: "
                         "RUN/export)")
    model = load_model(run).cpu()
    out = Path(out) if out else model_folder(run) / "export"
    digest = weights_digest(model)
    sidecar = sidecar_entries(model.spec, deployed_calibration(run, digest)) | {
        "weights_sha256": digest}
    others = [out / FILE_NAMES[f] for f in FORMATS if f != format]
    for other in others:
        refuse_other_weights(other, sidecar["weights_sha256"])
    out.mkdir(parents=True, exist_ok=True)
    path = _write(model, format, out, sidecar, opset)
    write_sidecar(out, sidecar)
    for other in others:  # the other format's file, if any, gets today's sidecar too
        if other.suffix == ".onnx" and other.is_file():
            embed_onnx_sidecar(other, sidecar)  # metadata only: parsing ONNX runs nothing
        elif other.is_file():  # loading TorchScript would run its code: written anew instead
            _write(model, "torchscript", out, sidecar)
    return path


def _write(model: Classifier, format: str, out: Path, sidecar: dict,
           opset: int | None = None) -> Path:
    """OUT/model.onnx or OUT/model.pt carrying `sidecar`, written beside and then moved into
    place: a failed export leaves the folder as it was."""
    path = out / FILE_NAMES[format]
    partial = path.with_name(f"partial-{path.name}")
    try:
        if format == "onnx":
            export_onnx(model, partial, opset)
            embed_onnx_sidecar(partial, sidecar)
        else:
            export_torchscript(model, partial, sidecar)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def embedded_sidecar(path: Path) -> dict:
    """The sidecar a model file carries ({} when none: an export by an older cxrkit, another
    tool's file, or one that does not parse)."""
    try:
        if path.suffix == ".onnx":
            props = onnx.load(str(path), load_external_data=False).metadata_props
            return {p.key: json.loads(p.value) for p in props}
        with zipfile.ZipFile(path) as archive:  # TorchScript: a zip with extra/<name> entries
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{SIDECAR}")]
            return json.loads(archive.read(names[0])) if names else {}
    except Exception:  # protobuf, zip or JSON errors alike: no sidecar of ours to read
        return {}


def refuse_other_weights(path: Path, digest: str) -> None:
    """An export folder has one model.json: refuse to write it beside a model file of
    other (or unknown) weights, which it would then describe wrongly."""
    if path.is_file() and embedded_sidecar(path).get("weights_sha256") != digest:
        raise ValueError(f"{path} holds other weights (another run, or an export by an older "
                         f"cxrkit) and shares model.json with this export: export to another "
                         f"folder (--out), or delete {path} first")


def embed_onnx_sidecar(path: Path, sidecar: dict) -> None:
    """The sidecar's entries also inside model.onnx, as metadata with JSON values, so that
    the file alone still says its labels, preprocessing and threshold (Netron shows them;
    `onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map` reads them)."""
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {key: json.dumps(value) for key, value in sidecar.items()})
    onnx.save(graph, str(path))


def _example_batch(spec: ModelSpec) -> torch.Tensor:
    # Batch 2, not 1: torch.export specialises a dimension of size 1 to a constant.
    return torch.randn(2, spec.in_chans, spec.input_size, spec.input_size)


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """These loggers at WARNING for a while, then as the caller had them."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(model: Classifier, path: str | Path, opset: int | None = None,
                dynamo: bool = True) -> Path:
    """ONNX with a dynamic batch axis, checked by `onnx.checker`.

    The torch.export-based exporter (`dynamo=True`, torch's default) is tried
    first; a model it cannot capture falls back to the TorchScript-based one.
    """
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise ValueError(f"ONNX opset {opset}: this torch and onnx export opsets {MIN_OPSET} to "
                         f"{newest}; choose one of those, or leave --opset out")
    model = model.eval()
    example = _example_batch(model.spec)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if opset is not None and opset < DYNAMO_MIN_OPSET:
        dynamo = False  # torch.export's exporter writes opset 18 or later, whatever is asked
    if dynamo:
        try:
            with _quiet("onnxscript", "onnx_ir"):  # their optimiser logs every pass at INFO
                torch.onnx.export(model, (example,), str(path), dynamo=True,
                                  external_data=False, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                  **names)
        except Exception as e:  # an op torch.export cannot trace: use the older exporter
            log.warning("dynamo ONNX export failed (%s: %s); using the TorchScript-based exporter",
                        type(e).__name__, e)
            dynamo = False
    if not dynamo:
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              **names)
        except Exception as e:  # an opset too old (or too new) for some operator
            if opset is None:
                raise
            raise ValueError(f"ONNX opset {opset}: the exporter cannot write this model at it "
                             f"({type(e).__name__}: {str(e).splitlines()[0]}); choose another "
                             "opset, or leave --opset out") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        if opset is None:
            raise
        raise ValueError(f"ONNX opset {opset}: the exporter wrote an invalid model ({e}); "
                         "choose a later opset, or leave --opset out") from e
    written = {o.domain: o.version for o in onnx.load(str(path)).opset_import}.get("")
    if opset is not None and written != opset:
        raise ValueError(f"asked for ONNX opset {opset}, the exporter wrote opset {written}: "
                         "choose an opset this torch can export to, or leave --opset out")
    return Path(path)


def export_torchscript(model: Classifier, path: str | Path, sidecar: dict | None = None) -> Path:
    """A traced TorchScript module (`torch.jit.load` runs it without cxrkit or timm), with
    `sidecar` as its extra file model.json (`torch.jit.load(path, _extra_files={"model.json":
    ""})` fills it in).

    PyTorch now marks TorchScript deprecated; it stays here for runtimes that
    still load it (LibTorch C++, older mobile stacks). ONNX is the format to prefer.
    """
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation notice, said above
        traced = torch.jit.trace(model, _example_batch(model.spec))
    traced.save(str(path), _extra_files={SIDECAR: json.dumps(sidecar, indent=2)} if sidecar
                else {})
    return Path(path)



def sidecar_entries(spec: ModelSpec, calibration: Calibration) -> dict:
    """What model.json (and model.onnx's metadata) says: enough to use the model elsewhere."""
    return {
        "intended_use": INTENDED_USE,
        **spec.to_dict(),
        # on P(positive_label); null with more classes, each film its most probable one
        "threshold": calibration.threshold if spec.num_classes == 2 else None,
        "temperature": calibration.temperature,
        "bias": calibration.bias or [0.0] * spec.num_classes,
        "positive_label": positive_label(spec.labels, spec.positive_label),
        "threshold_chosen_on": _without_local_folders(calibration),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "preprocess": PREPROCESS,
    }


def _without_local_folders(calibration: Calibration) -> str:
    """Where the threshold was chosen, each folder named by its last part only ("/home/ann/
    site_b/films: ..." -> "films: ..."): an export travels, and the folders above are this
    machine's business."""
    return re.sub(r"(?<![\w.])/(?:[^/\s:]+/)+", "", calibration.chosen_on)


def write_sidecar(folder: str | Path, sidecar: dict) -> Path:
    path = Path(folder) / SIDECAR
    path.write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    return path
