"""`cxr serve`: the JSON API over a real socket (uvicorn on 127.0.0.1), bad input, limits,
and concurrent requests answered exactly like single ones."""

from __future__ import annotations

import base64
import io
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.export import export_onnx, sidecar_entries, write_sidecar
from cxrkit.models import weights_digest
from cxrkit.predict import predict
from cxrkit.runs import Calibration, load_model, write_calibration
from cxrkit.serve import create_app
from cxrkit.serve.app import LOOPBACK_HOSTS
from tests.conftest import running_server, synthetic_film
from tests.test_io import tiny_png_claiming, write_dicom

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """PNG, JPEG, 16-bit PNG and an extensionless MONOCHROME1 DICOM, of both classes."""
    folder = tmp_path_factory.mktemp("serve")
    synthetic_film("NORMAL", 1).save(folder / "normal.png")
    synthetic_film("PNEUMONIA", 2).save(folder / "pneumonia.jpg", quality=95)
    pixels = np.asarray(synthetic_film("PNEUMONIA", 3), np.uint16)
    Image.fromarray(pixels * 257).save(folder / "pneumonia16.png")
    write_dicom(folder / "normal.dcm", (255 - np.asarray(synthetic_film("NORMAL", 4))) * 16,
                "MONOCHROME1")
    shutil.move(folder / "normal.dcm", folder / "normal_dicom")
    return {p.name: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def server(trained_run):
    with running_server(create_app(trained_run, max_upload_mb=MAX_UPLOAD_MB)) as url:
        yield url


def post(url, name, content, params=None, field="file"):
    return requests.post(f"{url}/predict", files={field: (name, content)}, params=params,
                         timeout=60)


def test_health_answers_while_every_worker_waits_for_the_model(trained_run, films):
    """A liveness probe must not wait behind predictions: with the model busy and every
    thread of the pool (40) holding a /predict, /health still answers at once."""
    app = create_app(trained_run)
    content = films["normal.png"].read_bytes()
    with running_server(app) as url, ThreadPoolExecutor(45) as pool:
        threads = threading.active_count()
        with app.state.predictor._lock:  # the model is busy: each /predict waits for it
            waiting = [pool.submit(post, url, "normal.png", content) for _ in range(45)]
            deadline = time.monotonic() + 60  # until they hold the server's 40 threads
            while threading.active_count() < threads + 45 + 40:  # (and the 45 clients)
                assert time.monotonic() < deadline, "the requests never filled the pool"
                time.sleep(0.05)
            assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
            assert requests.get(f"{url}/model", timeout=5).json()["labels"]
        assert [f.result().status_code for f in waiting] == [200] * 45


def test_health_model_and_schema(server, trained_run):
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    info = requests.get(f"{server}/model", timeout=10).json()
    assert info["name"] == "simple_cnn" and info["labels"] == ["NORMAL", "PNEUMONIA"]
    assert (info["input_size"], info["threshold"], info["temperature"]) == (64, 0.5, 1.0)
    assert info["backend"] == "torch" and info["gradcam"] is True
    assert (info["positive_label"], info["bias"]) == ("PNEUMONIA", [])
    # which model answers, and what for: a clinician's tool meets neither the run nor its report
    assert info["weights_sha256"] == weights_digest(load_model(trained_run))
    assert info["intended_use"].startswith("Research and education. Not a medical device")
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert "Not a medical device" in schema["info"]["description"]
    assert {"/predict", "/model", "/health"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    page = requests.get(server, timeout=10)
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert "http" not in page.text.split("<script>")[1]  # self-contained: no CDN
    docs = requests.get(f"{server}/docs", timeout=10).text
    assert "cdn" not in docs and "/static-offline-docs/swagger-ui-bundle.js" in docs
    assert requests.get(f"{server}/static-offline-docs/swagger-ui-bundle.js",
                        timeout=10).status_code == 200


def test_png_jpeg_and_dicom_predicted_like_the_python_api(server, trained_run, films):
    expected = {p.path.rsplit("/", 1)[1]: p for p in predict(trained_run, films.values())}
    for name, path in films.items():
        response = post(server, name, path.read_bytes())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["filename"] == name and body["cam_png"] is None
        assert body["label"] == expected[name].label
        assert (body["threshold"], body["positive_label"]) == (0.5, "PNEUMONIA")
        assert body["weights_sha256"] == expected[name].weights_sha256 is not None
        # atol: a GPU's kernels for a batch of one and of three differ in the last digits
        np.testing.assert_allclose(list(body["probabilities"].values()),
                                   list(expected[name].probabilities.values()), atol=1e-5)


def test_gradcam_overlay_comes_back_as_png(server, films):
    body = post(server, "x.png", films["pneumonia.jpg"].read_bytes(), {"cam": "true"}).json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["cam_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (96, 80)


@pytest.mark.parametrize("name, content, status, words", [
    ("notes.png", b"patient 12: follow-up in 2 weeks\n" * 20, 415, "not an image"),
    ("film.dcm", b"\x00" * 128 + b"DICM" + b"\x00" * 64, 415, "PNG, JPEG or DICOM"),
    ("cut.png", None, 415, "PNG, JPEG or DICOM"),  # truncated
    ("bomb.png", tiny_png_claiming(9_000, 9_000), 413, "too many pixels"),
    ("empty.png", b"", 400, "empty"),
])
def test_bad_files_get_a_4xx_with_a_message(server, films, name, content, status, words):
    if content is None:
        content = films["normal.png"].read_bytes()[:300]
    response = post(server, name, content)
    assert response.status_code == status
    assert name in response.json()["detail"] and words in response.json()["detail"]


def test_a_thumbnail_is_answered_with_a_warning(server, films):
    buffer = io.BytesIO()
    Image.open(films["normal.png"]).resize((16, 16)).save(buffer, format="PNG")
    body = post(server, "thumb.png", buffer.getvalue()).json()
    assert body["label"] and "16 x 16 px: a thumbnail" in body["warning"]
    assert post(server, "normal.png", films["normal.png"].read_bytes()).json()["warning"] is None


def test_a_dicom_claiming_too_many_pixels_gets_413_before_decoding(server, tmp_path):
    bomb = write_dicom(tmp_path / "bomb.dcm", np.zeros((4, 4), np.uint16), Rows=12_000,
                       Columns=12_000)
    response = post(server, "bomb.dcm", bomb.read_bytes())
    assert response.status_code == 413 and "12000 x 12000" in response.json()["detail"]


def test_oversized_upload_is_refused_with_413(server):
    big = bytes(MAX_UPLOAD_MB * 2**20 + 1000)
    declared = post(server, "big.png", big)
    assert declared.status_code == 413 and "--max-upload-mb" in declared.json()["detail"]

    def chunks():  # no Content-Length: the server counts what arrives
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for _ in range(MAX_UPLOAD_MB * 8 + 2):
            yield bytes(2**17)
        yield b"\r\n--b--\r\n"

    streamed = requests.post(f"{server}/predict", data=chunks(), timeout=60,
                             headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and "--max-upload-mb" in streamed.json()["detail"]
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_wrong_field_or_no_form_is_422(server, films):
    wrong = post(server, "normal.png", films["normal.png"].read_bytes(), field="image")
    assert wrong.status_code == 422 and "field named 'file'" in wrong.json()["detail"]
    raw = requests.post(f"{server}/predict", data=films["normal.png"].read_bytes(), timeout=10,
                        headers={"Content-Type": "image/png"})
    assert raw.status_code == 422 and "multipart/form-data" in raw.json()["detail"]


def test_concurrent_requests_get_their_own_answers(server, films):
    """60 requests from 6 threads, images and Grad-CAM mixed: each answer is exactly the
    answer the same request gets alone (the model is locked, Grad-CAM hooks included)."""
    cases = [(name, cam) for name in films for cam in (False, True)]
    cases.append(("notes.txt", False))
    content = {name: path.read_bytes() for name, path in films.items()}
    content["notes.txt"] = b"not a film"

    def ask(case):
        name, cam = case
        response = post(server, name, content[name], {"cam": str(cam).lower()})
        return response.status_code, response.json()

    alone = {case: ask(case) for case in cases}
    assert len({str(body["probabilities"]) for status, body in alone.values()
                if status == 200}) == len(films)  # every film its own answer
    requests_ = [cases[i % len(cases)] for i in range(60)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, requests_))
    for case, (status, body) in zip(requests_, answers, strict=True):
        assert status == alone[case][0]
        if status != 200:
            assert "not an image" in body["detail"]
            continue
        expected = alone[case][1]
        assert body["label"] == expected["label"]
        np.testing.assert_allclose(list(body["probabilities"].values()),
                                   list(expected["probabilities"].values()), atol=1e-6)
        if case[1]:
            assert _pixels(body["cam_png"]).shape == _pixels(expected["cam_png"]).shape
            assert np.abs(_pixels(body["cam_png"]) - _pixels(expected["cam_png"])).max() <= 2


def _pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))), dtype=int)


def test_pages_of_other_sites_and_other_host_names_are_refused(server, films):
    """A page on another site can POST a form to 127.0.0.1 (browsers send it without asking)
    and rebind its DNS name to this server: 403 for both. The server's own page, and
    clients that send no Origin, are answered."""
    files = {"file": ("normal.png", films["normal.png"].read_bytes())}
    port = urlsplit(server).port
    foreign = requests.post(f"{server}/predict", files=files, timeout=30,
                            headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "may not send films" in foreign.json()["detail"]
    own = requests.post(f"{server}/predict", files=files, timeout=30, headers={"Origin": server})
    assert own.status_code == 200 and own.json()["label"]
    for host, status in ((f"attacker.example:{port}", 403), (f"localhost:{port}", 200),
                         (f"[::1]:{port}", 200)):
        answer = requests.get(f"{server}/model", headers={"Host": host}, timeout=30)
        assert answer.status_code == status, (host, answer.text)
    assert "answers requests for 127.0.0.1" in requests.get(
        f"{server}/model", headers={"Host": "attacker.example"}, timeout=30).json()["detail"]


def test_host_and_origin_checks_follow_names_ports_and_a_reverse_proxy(onnx_export, films):
    """Names compare without case, a left-out port is the scheme's default, every 127.x
    address is loopback; behind a proxy, --allowed-host and --allowed-origin let it through."""
    files = {"file": ("normal.png", films["normal.png"].read_bytes())}

    def status(url, host=None, origin=None):
        headers = {k: v for k, v in (("Host", host), ("Origin", origin)) if v}
        return requests.post(f"{url}/predict", files=files, headers=headers,
                             timeout=30).status_code

    with running_server(create_app(onnx_export)) as url:  # loopback, as `cxr serve` binds
        port = urlsplit(url).port
        assert status(url, f"LOCALHOST:{port}", f"http://localhost:{port}") == 200
        assert status(url, "127.0.0.1:80", "http://127.0.0.1") == 200  # default port
        assert status(url, f"127.0.1.1:{port}") == 200  # Debian's name for this machine
        assert status(url, "xray.example.org", "https://xray.example.org") == 403
        assert status(url, f"127.0.0.1:{port}", "https://xray.example.org") == 403
        assert status(url, f"127.0.0.1:{port}", "null") == 403  # a sandboxed page
    proxied = create_app(onnx_export, hosts=[*LOOPBACK_HOSTS, "xray.example.org"],
                         origins=["https://XRAY.example.org.:443/"])  # the same site
    for origin in ("xray.example.org", "https://xray.example.org:abc"):
        with pytest.raises(ValueError, match="is not an origin"):  # they would never match
            create_app(onnx_export, origins=[origin])
    with running_server(proxied) as url:
        port = urlsplit(url).port
        assert status(url, "xray.example.org", "https://xray.example.org") == 200  # Host kept
        assert status(url, f"127.0.0.1:{port}", "https://xray.example.org") == 200  # nginx
        assert status(url, "elsewhere.example", "https://xray.example.org") == 403
        assert status(url, f"127.0.0.1:{port}", "https://evil.example") == 403
        # a container's probe names the pod by its address: /health answers it (was 403)
        probe = requests.get(f"{url}/health", headers={"Host": "10.1.2.3:8000"}, timeout=30)
        assert probe.status_code == 200
        assert requests.get(f"{url}/model", headers={"Host": "10.1.2.3:8000"},
                            timeout=30).status_code == 403  # the rest does not


def test_serve_behind_a_proxy_from_the_command_line(onnx_export, films, monkeypatch):
    """`cxr serve --allowed-host/--allowed-origin` reach the app it serves."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(app, [
        "serve", str(onnx_export), "--host", "0.0.0.0", "--port", str(port),
        "--allowed-host", "xray.example.org", "--allowed-origin", "https://xray.example.org"])
    assert result.exit_code == 0, result.output
    assert served["host"] == "0.0.0.0"  # the address it prints, 127.0.0.1, is answered too
    files = {"file": ("normal.png", films["normal.png"].read_bytes())}
    with running_server(served["app"]) as url:
        for host, status in (("xray.example.org", 200), ("elsewhere.example", 403),
                             (f"127.0.0.1:{port}", 200)):
            answer = requests.post(f"{url}/predict", files=files, timeout=30, headers={
                "Host": host, "Origin": "https://xray.example.org"})
            assert answer.status_code == status, (host, answer.text)


def test_cxr_serve_answers_the_address_it_prints():
    from cxrkit.cli.use import served_host_names
    from cxrkit.serve.app import _host_allowed

    for host, allowed, answered, refused in (
            ("127.0.0.1", [], ["127.0.0.1", "localhost", "127.0.1.1"], ["xray.example.org"]),
            ("192.168.1.5", ["xray.example.org"], ["192.168.1.5", "xray.example.org",
                                                    "127.0.0.1"], ["evil.example"]),
            ("0.0.0.0", ["xray.example.org"], ["127.0.0.1", "xray.example.org"],
             ["0.0.0.0", "evil.example"])):
        names = set(served_host_names(host, allowed))
        assert all(_host_allowed(n, names) for n in answered), (host, names)
        assert not any(_host_allowed(n, names) for n in refused), (host, names)
    assert served_host_names("0.0.0.0", []) is None  # any name: the CLI warns


@pytest.fixture(scope="module")
def onnx_export(trained_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    model = load_model(trained_run)
    export_onnx(model, folder / "model.onnx", dynamo=False)  # the quick exporter
    write_sidecar(folder, sidecar_entries(model.spec, Calibration(threshold=0.3)))
    return folder


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_films_are_decoded_and_scored_on_one_thread(trained_run, onnx_export, films,
                                                     monkeypatch, backend):
    """Each thread keeps its own malloc arena: decoding films on the 40 request threads would
    keep up to 40 films' peak memory, so every request's work runs on one."""
    from cxrkit import inference, onnx_backend

    threads = set()
    for module in (inference, onnx_backend):  # where each backend reads its films
        read = module.read_for_model

        def reading_noting_the_thread(*args, read=read, **kwargs):
            threads.add(threading.current_thread().name)
            return read(*args, **kwargs)

        monkeypatch.setattr(module, "read_for_model", reading_noting_the_thread)
    app = create_app(trained_run if backend == "torch" else onnx_export,
                     hosts=None)  # any host name: a server others reach
    content = films["normal.png"].read_bytes()
    with running_server(app) as url, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(url, "normal.png", content), range(16)))
        assert requests.get(f"{url}/model", headers={"Host": "192.0.2.7"}).status_code == 200
    assert [a.status_code for a in answers] == [200] * 16
    assert len(threads) == 1 and threads.pop().startswith("cxr-model")


def test_an_onnx_export_is_served_without_gradcam(onnx_export, films):
    [expected] = predict(onnx_export, [films["normal.png"]])
    with running_server(create_app(onnx_export)) as url:
        info = requests.get(f"{url}/model", timeout=10).json()
        assert (info["backend"], info["gradcam"], info["threshold"]) == ("onnx", False, 0.3)
        body = post(url, "normal.png", films["normal.png"].read_bytes()).json()
        assert body["label"] == expected.label
        np.testing.assert_allclose(list(body["probabilities"].values()),
                                   list(expected.probabilities.values()), atol=1e-6)
        cam = post(url, "normal.png", films["normal.png"].read_bytes(), {"cam": "true"})
        assert cam.status_code == 400 and "no Grad-CAM" in cam.json()["detail"]


def test_serve_command_refuses_what_is_not_a_model(tmp_path):
    from typer.testing import CliRunner

    from cxrkit.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "neither a cxrkit run nor an ONNX export" in " ".join(
        result.output.split())


def test_two_films_in_one_request_are_refused(server, films):
    content = films["normal.png"].read_bytes()
    response = requests.post(f"{server}/predict", timeout=60,
                             files=[("file", ("a.png", content)), ("file", ("b.png", content))])
    assert response.status_code == 422
    assert "2 files were sent in the field 'file'; send one per request" in (
        response.json()["detail"])


def test_serving_on_a_port_in_use_is_refused_before_any_address_is_shown(trained_run,
                                                                         tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(trained_run), "--port", str(port)])
        # said before the model is loaded (seconds of imports and loading): a folder that is
        # no model at all gets the same answer
        no_model = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "choose another --port" in result.output and "open http" not in result.output
    assert no_model.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in no_model.output
    result = CliRunner().invoke(app, ["serve", str(trained_run), "--host", "192.0.2.1"])
    assert result.exit_code == 2 and "check --host" in result.output  # an address not ours


def test_a_running_server_takes_up_a_newly_deployed_calibration(trained_run, films, tmp_path):
    """`cxr evaluate --calibrate-on SITE` while `cxr serve RUN` runs: the next request uses it."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    write_calibration(run, Calibration(0.4, 1.0, "validation: Youden's J"))
    with running_server(create_app(run)) as url:
        assert requests.get(f"{url}/model", timeout=10).json()["threshold"] == 0.4
        time.sleep(0.01)  # another modification time, whatever the file system's resolution
        write_calibration(run, Calibration(0.123, 1.3, "site_b: Youden's J"))
        model = requests.get(f"{url}/model", timeout=10).json()
        assert (model["threshold"], model["threshold_chosen_on"]) == (0.123, "site_b: Youden's J")
        answer = post(url, "normal.png", films["normal.png"].read_bytes()).json()
        assert answer["threshold"] == 0.123


def test_the_default_upload_cap_takes_any_film_the_reader_takes():
    """A full-size uncompressed 16-bit DR film (4280 x 3520: 30 MB) that predict reads, up
    to the reader's own MAX_PIXELS, is not refused by the server's default cap."""
    import inspect

    from cxrkit.cli.use import serve_command
    from cxrkit.data.io import MAX_PIXELS
    from cxrkit.serve.app import DEFAULT_MAX_UPLOAD_MB

    assert DEFAULT_MAX_UPLOAD_MB * 2**20 > 2 * MAX_PIXELS + 64 * 2**10  # pixels and a header
    cli_default = inspect.signature(serve_command).parameters["max_upload_mb"].default.default
    assert cli_default == DEFAULT_MAX_UPLOAD_MB


def test_the_servers_log_lines_go_to_stderr_with_their_date(tmp_path):
    """uvicorn's access lines went to stdout with no time at all, beside cxrkit's on stderr:
    a process manager's log could not tell them apart or date them."""
    script = ("import logging.config\n"
              "from cxrkit.cli.use import server_logging\n"
              "logging.config.dictConfig(server_logging())\n"
              "logging.getLogger('uvicorn.access').info('%s - \"%s %s HTTP/%s\" %d', "
              "'10.0.0.1:5000', 'GET', '/health', '1.1', 200)\n"
              "logging.getLogger('uvicorn.error').info('Application startup complete.')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line)
                                   for line in lines)
    assert '"GET /health HTTP/1.1" 200' in lines[0]


@pytest.mark.slow
def test_no_access_log_leaves_requests_out_of_the_servers_log(onnx_export):
    """A container's health probe every few seconds filled the log with access lines."""
    def served_log(*options: str) -> str:
        with socket.socket() as probe:  # a port free now
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("cxr")), "serve", str(onnx_export), "--port",
             str(port), *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    answer = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
                    break
                except requests.ConnectionError:
                    assert server.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            assert answer.status_code == 200
        finally:
            server.terminate()
        return server.communicate(timeout=30)[1]

    assert '"GET /health HTTP/1.1" 200' in served_log()
    quiet = served_log("--no-access-log")
    assert "GET /health" not in quiet and "Uvicorn running on" in quiet
