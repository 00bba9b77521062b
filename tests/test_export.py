"""`cxr export`: ONNX (checked, dynamic batch, agrees with PyTorch on ONNX Runtime) and
TorchScript; `cxr predict --backend onnx` runs from the export folder alone."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.data.transforms import ModelInput
from cxrkit.export import export_model, export_onnx
from cxrkit.models import create_model, weights_digest
from cxrkit.onnx_backend import model_input, read_sidecar
from cxrkit.predict import Predictor
from cxrkit.runs import (
    Calibration,
    load_model,
    read_calibration,
    save_model,
    write_calibration,
)
from cxrkit.spec import ModelSpec
from tests.conftest import REAL_DATA, pretrained_run, requires_real_data, synthetic_film
from tests.test_predict import flat

runner = CliRunner()


@pytest.fixture(scope="module")
def lite0_export(tmp_path_factory):
    """A Lite0 run (threshold 0.35, temperature 1.7, bias +0.8 on PNEUMONIA) exported to
    ONNX by the CLI."""
    run = pretrained_run(tmp_path_factory.mktemp("export") / "run", threshold=0.35,
                         temperature=1.7, bias=[0.0, 0.8])
    result = runner.invoke(app, ["export", str(run), "--opset", "19"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("model.onnx")
    return run


@pytest.fixture(scope="module")
def lite0_predictors(lite0_export):
    """Loaded once: the run on PyTorch, and its export folder alone on ONNX Runtime, both on
    the CPU (a GPU's TF32 convolutions differ from ONNX Runtime by more than 1e-4)."""
    return Predictor.load(lite0_export, device="cpu"), Predictor.load(lite0_export / "export")


@pytest.fixture(scope="module")
def generated_films(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    for i, label in enumerate(["NORMAL", "PNEUMONIA"] * 3):
        size = (96, 80) if i % 2 else (300, 360)  # upscaled and downscaled to 224
        synthetic_film(label, 100 + i, size).save(folder / f"film_{i}.png")
    return sorted(str(p) for p in folder.iterdir())[:5]


def real_films():
    return sorted(str(p) for p in (REAL_DATA / "test").rglob("*.jpeg"))[::120][:5]


@pytest.mark.parametrize("source", ["generated", pytest.param("real", marks=requires_real_data)])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnx_runtime_agrees_with_pytorch(lite0_predictors, generated_films, source,
                                          batch_size):
    files = generated_films if source == "generated" else real_films()
    assert len(files) == 5
    eager, onnx_export = lite0_predictors
    assert (eager.backend, onnx_export.backend) == ("torch", "onnx")
    for a, b in zip(eager.predict(files, batch_size), onnx_export.predict(files, batch_size),
                    strict=True):
        p, q = list(a.probabilities.values()), list(b.probabilities.values())
        assert np.abs(np.subtract(p, q)).max() < 1e-4
        assert a.label == b.label and a.threshold == b.threshold == 0.35


@pytest.mark.parametrize("channels", [1, 3])
def test_the_onnx_backend_scales_and_normalises_as_the_pytorch_models_do(channels):
    spec = ModelSpec("any", 2, input_size=8, in_chans=channels, mean=(0.485, 0.456, 0.406)[
        :channels], std=(0.229, 0.224, 0.225)[:channels])
    pixels = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    expected = ModelInput(spec)(torch.from_numpy(pixels)).numpy()
    assert model_input(pixels, spec).shape == (4, channels, 8, 8)
    np.testing.assert_array_equal(model_input(pixels, spec), expected)  # to the last bit


def test_an_onnx_export_predicts_and_serves_without_importing_pytorch(
        lite0_export, lite0_predictors, generated_films, tmp_path):
    """Importing PyTorch, torchvision and timm takes seconds, most of a one-film `cxr predict`:
    an export runs without them, with the run's numbers, failures and warnings."""
    (tmp_path / "broken.png").write_bytes(b"not a png")
    synthetic_film("NORMAL", 7, (40, 40)).save(tmp_path / "thumbnail.png")  # doubtful
    films = [*generated_films, str(tmp_path / "broken.png"), str(tmp_path / "thumbnail.png")]
    export = str(lite0_export / "export")
    code = ("import json, sys; from cxrkit.predict import predict; "
            "from cxrkit.serve import create_app; "
            f"ps = predict({export!r}, {films!r}, batch_size=3, num_workers=2); "
            f"create_app({export!r}); "
            "print(json.dumps([[p.label, p.probabilities, p.error, p.warning] for p in ps])); "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'lightning') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    *_, printed, loaded = out.stdout.splitlines()
    assert loaded == "[]"
    eager = lite0_predictors[0].predict(films)
    for (label, probabilities, error, warning), p in zip(json.loads(printed), eager,
                                                         strict=True):
        assert (label, error, warning) == (p.label, p.error, p.warning)
        if p.ok:
            np.testing.assert_allclose(list(probabilities.values()),
                                       list(p.probabilities.values()), atol=1e-4)
    assert eager[-2].error and eager[-1].warning  # both kinds were there to compare


def test_the_onnx_path_reads_a_lazy_image_on_several_threads_and_checks_its_arguments(
        lite0_predictors, generated_films):
    """One not-yet-loaded PIL image passed several times, read by 4 threads: each copy is
    read (two threads loading one lazy image at once failed in one of them)."""
    eager, onnx_export = lite0_predictors
    for film in generated_films:
        lazy = Image.open(film)
        predictions = onnx_export.predict([lazy] * 8, batch_size=8, num_workers=4)
        assert all(p.ok for p in predictions), [p.error for p in predictions]
    for predictor in (eager, onnx_export):
        for batch_size, num_workers in ((0, 0), (-3, 0), (2, -1)):
            with pytest.raises(ValueError, match=r"a batch holds 1 film or more"):
                predictor.predict(generated_films, batch_size, num_workers=num_workers)


def test_export_folder_is_self_describing(lite0_export):
    folder = lite0_export / "export"
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    [image], [logits] = model.graph.input, model.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    batch = image.type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a named, dynamic batch axis
    assert [d.dim_value for d in image.type.tensor_type.shape.dim[1:]] == [3, 224, 224]
    sidecar = json.loads((folder / "model.json").read_text())
    assert sidecar["labels"] == ["NORMAL", "PNEUMONIA"]
    assert (sidecar["threshold"], sidecar["temperature"], sidecar["bias"]) == (0.35, 1.7,
                                                                              [0.0, 0.8])
    assert (sidecar["input_size"], sidecar["in_chans"], sidecar["equalize"]) == (224, 3, False)
    assert len(sidecar["mean"]) == len(sidecar["std"]) == 3
    assert "softmax(logits / temperature + bias)" in sidecar["preprocess"]
    assert sidecar["positive_label"] == "PNEUMONIA"
    assert "Not a medical device" in sidecar["intended_use"]  # it travels without the report
    assert {o.domain: o.version for o in model.opset_import}[""] == 19  # --opset
    # model.onnx alone carries the same facts, as ONNX Runtime reads them
    meta = ort.InferenceSession(str(folder / "model.onnx"), providers=[
        "CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert {key: json.loads(value) for key, value in meta.items()} == sidecar


def test_the_sidecar_recipe_alone_reproduces_predictions(lite0_export, lite0_predictors,
                                                         generated_films):
    """Follow model.json's words with PIL, NumPy and ONNX Runtime only: same probabilities."""
    folder = lite0_export / "export"
    meta = json.loads((folder / "model.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    path = generated_films[1]  # a 96 x 80 film: enlarged
    size = meta["input_size"]
    gray = Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(gray, np.float32)[None] / 255.0
    x = np.repeat(x, meta["in_chans"], axis=0)
    x = (x - np.array(meta["mean"])[:, None, None]) / np.array(meta["std"])[:, None, None]
    [logits] = session.run([meta["output"]], {meta["input"]: x[None].astype(np.float32)})
    z = logits[0] / meta["temperature"] + np.array(meta["bias"])
    probabilities = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    [expected] = lite0_predictors[0].predict([path])
    np.testing.assert_allclose(probabilities, list(expected.probabilities.values()), atol=1e-4)


def test_the_fallback_exporter_gives_a_dynamic_batch(trained_run, tmp_path):
    """The TorchScript-based ONNX exporter, used when torch.export cannot capture a model."""
    model = load_model(trained_run)
    path = export_onnx(model, tmp_path / "model.onnx", opset=17, dynamo=False)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 1, 64, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        [logits] = session.run(None, {"image": x.numpy()})
        assert logits.shape == (batch, 2)
        np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_an_old_opset_is_honoured_or_refused_and_out_is_a_folder(trained_run, tmp_path,
                                                                 capfd):
    path = export_model(trained_run, out=tmp_path / "op16", opset=16)  # torch.export: >= 18
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 16
    capfd.readouterr()
    for opset in (1, 3, 99):  # older than any exporter writes; newer than onnx knows
        with pytest.raises(ValueError, match=rf"ONNX opset {opset}: this torch and onnx export "
                                             rf"opsets 7 to {onnx.defs.onnx_opset_version()};"):
            export_model(trained_run, out=tmp_path / f"op{opset}", opset=opset)
        assert not list((tmp_path / f"op{opset}").iterdir())  # nothing half written
    # the TorchScript exporter printed its whole graph (178 KB for Lite0) to the process's
    # stdout, where a script reads the export's path alone
    assert capfd.readouterr().out == ""
    with pytest.raises(ValueError, match=r"give a folder.*--out .*/mine\)"):
        export_model(trained_run, out=tmp_path / "mine.onnx")


def test_torchscript_export_matches_eager(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    result = runner.invoke(app, ["export", str(run), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    scripted = torch.jit.load(str(run / "export" / "model.pt"))
    model = load_model(run)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-4)
    sidecar = json.loads((run / "export" / "model.json").read_text())
    assert sidecar["input_size"] == 64
    extra = {"model.json": ""}  # the file alone carries the sidecar too
    torch.jit.load(str(run / "export" / "model.pt"), _extra_files=extra)
    assert json.loads(extra["model.json"]) == sidecar


def test_one_export_folder_holds_one_model_and_one_current_sidecar(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    onnx_file = export_model(run)
    site = "/home/someone/hospital_b/films"  # recalibrated since, on a site's films
    write_calibration(run, Calibration(0.77, 1.3, f"{site}: Youden's J",
                                       {"calibrate_on": site}))
    export_model(run, format="torchscript")  # same weights, same folder
    sidecar = json.loads((run / "export" / "model.json").read_text())
    assert (sidecar["threshold"], sidecar["temperature"]) == (0.77, 1.3)
    assert sidecar["bias"] == [0.0, 0.0]  # none: one number per class all the same
    assert sidecar["threshold_chosen_on"] == "films: Youden's J"  # not this machine's folders
    assert read_sidecar(run / "export")[1].decides_as(read_calibration(run))
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_file)).metadata_props}
    assert meta == sidecar  # model.onnx follows the new sidecar

    other = shutil.copytree(trained_run, tmp_path / "other")
    weights = load_file(other / "model.safetensors")  # another model: other weights
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
              other / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.onnx holds other weights .* export to another "
                                         r"folder \(--out\), or delete .*model.onnx first"):
        export_model(other, format="torchscript", out=run / "export")
    assert json.loads((run / "export" / "model.json").read_text()) == sidecar  # untouched
    (run / "export" / "model.pt").write_bytes(b"not a TorchScript archive")  # any other file
    with pytest.raises(ValueError, match="model.pt holds other weights"):
        export_model(run, out=run / "export")
    spec = (other / "model.json").read_text()
    for folder in (run, other):  # a run folder's model.json is the run's own
        with pytest.raises(ValueError, match=rf"--out \(out=\) {folder} is a run folder: the "
                                             r"export's model.json would replace the run's own"):
            export_model(run, format="torchscript", out=folder)
    assert (other / "model.json").read_text() == spec and not (other / "model.pt").exists()


class RunsCodeWhenLoaded(torch.nn.Module):
    """TorchScript whose loading runs its own code: a received run's export/model.pt."""

    def __init__(self):
        super().__init__()
        self.state = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return self.state, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        raise RuntimeError("code from the received model.pt ran")


def test_exporting_a_received_run_never_loads_its_torchscript(trained_run, tmp_path):
    """`cxr export RUN` gives RUN/export/model.pt today's sidecar too: written anew from the
    run's weights, never by loading the file there (TorchScript runs code when loaded)."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "export").mkdir()
    digest = weights_digest(load_model(run))  # the file claims the run's weights
    torch.jit.script(RunsCodeWhenLoaded()).save(
        str(run / "export" / "model.pt"),
        _extra_files={"model.json": json.dumps({"weights_sha256": digest})})
    export_model(run)  # onnx
    traced = torch.jit.load(str(run / "export" / "model.pt"), map_location="cpu")
    model = load_model(run)
    size = model.spec.input_size
    x = torch.rand(2, model.spec.in_chans, size, size)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_onnx_on_a_run_follows_its_calibration_after_the_export(lite0_export, tmp_path,
                                                                 caplog):
    """A later `cxr evaluate` may move the run's threshold; its export keeps the old one."""
    run = shutil.copytree(lite0_export, tmp_path / "run")
    write_calibration(run, Calibration(0.6, 1.2, "validation: sensitivity >= 0.99"))
    predictor = Predictor.load(run, backend="onnx")
    assert (predictor.calibration.threshold, predictor.calibration.temperature) == (0.6, 1.2)
    assert ("holds an earlier calibration (threshold 0.3500, temperature 1.70, bias (+0.00, "
            "+0.80)); using the run's calibration.json (threshold 0.6000, temperature 1.20)"
            ) in caplog.text
    assert Predictor.load(run / "export").calibration.threshold == 0.35  # the export alone
    with pytest.raises(FileNotFoundError, match="nosuchrun does not exist"):
        Predictor.load(tmp_path / "nosuchrun")


def test_predict_cli_on_onnx_and_its_usage_errors(lite0_export, generated_films, tmp_path):
    out = tmp_path / "preds.json"
    result = runner.invoke(app, ["predict", str(lite0_export), *generated_films[:2],
                                 "--backend", "onnx", "--out", str(out)])  # RUN/export
    assert result.exit_code == 0, result.output
    assert [p["threshold"] for p in json.loads(out.read_text())] == [0.35, 0.35]
    export = str(lite0_export / "export")
    cam = runner.invoke(app, ["predict", export, generated_films[0], "--cam", str(tmp_path)])
    assert cam.exit_code == 2 and "Grad-CAM needs the PyTorch model" in flat(cam.output)
    torch_on_onnx = runner.invoke(app, ["predict", export, generated_films[0],
                                        "--backend", "torch"])
    assert torch_on_onnx.exit_code == 2 and "is an ONNX export" in flat(torch_on_onnx.output)
    for args in (["export", str(tmp_path)], ["export", str(lite0_export), "--format", "tflite"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output


def test_a_run_never_evaluated_is_exported_and_loaded_with_a_warning(trained_run, tmp_path,
                                                                     caplog):
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "calibration.json").unlink(missing_ok=True)
    export_model(run)
    said = f"{run} has no calibration.json (it was never evaluated): using threshold 0.5"
    assert said in caplog.text
    assert json.loads((run / "export" / "model.json").read_text())["threshold"] == 0.5
    caplog.clear()
    Predictor.load(run, device="cpu")
    assert said in caplog.text


def test_a_runs_export_older_than_its_calibration_is_said_when_used_alone(trained_run, tmp_path,
                                                                         caplog):
    run = shutil.copytree(trained_run, tmp_path / "run")
    write_calibration(run, Calibration(0.4, 1.0, "validation: Youden's J"))
    export_model(run)
    Predictor.load(run / "export")
    assert "holds an earlier calibration" not in caplog.text
    write_calibration(run, Calibration(0.6, 1.2, "site_b: Youden's J"))
    assert Predictor.load(run / "export").calibration.threshold == 0.4  # the export's own
    assert ("export holds an earlier calibration (threshold 0.4000, temperature 1.00) than its "
            "run's deployed one (threshold 0.6000, temperature 1.20)") in caplog.text


def test_an_onnx_export_leaves_the_callers_logging_alone(tmp_path):
    """It set the onnxscript and onnx_ir loggers to WARNING for the rest of the session."""
    run = tmp_path / "run"
    save_model(create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]), run)
    logging.getLogger("onnxscript").setLevel(logging.INFO)
    try:
        export_model(run)
        assert logging.getLogger("onnxscript").level == logging.INFO
        assert logging.getLogger("onnx_ir").level == logging.NOTSET
    finally:
        logging.getLogger("onnxscript").setLevel(logging.NOTSET)
