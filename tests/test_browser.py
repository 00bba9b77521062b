"""The `cxr serve` page in a real headless Chromium: upload a real X-ray, see the label, the
probabilities and the Grad-CAM; drop a text file, see the error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrkit.data.audit import audit_dataset
from cxrkit.predict import Predictor
from cxrkit.report import build_report
from cxrkit.serve import create_app
from tests.conftest import REAL_DATA, pretrained_run, requires_real_data, running_server
from tests.test_io import write_dicom

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path("/tmp")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
TIMEOUT_MS = 30_000

pytestmark = [
    requires_real_data,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM} "
                       "(Debian: apt-get install chromium; CI installs it)"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pretrained_run(tmp_path_factory.mktemp("browser") / "run", threshold=0.45)


@pytest.fixture(scope="module")
def page(run):
    from playwright.sync_api import sync_playwright

    with running_server(create_app(run)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        yield page
        browser.close()


def test_an_uploaded_xray_shows_label_probabilities_and_heatmap(page, run):
    from playwright.sync_api import expect

    film = sorted((REAL_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    [expected] = Predictor.load(run).predict([film])
    expect(page.locator("#model")).to_contain_text("efficientnet_lite0")
    expect(page.locator("#model")).to_contain_text("0.45")
    page.set_input_files("#file-input", film)
    expect(page.locator("#label")).to_have_text(expected.label)
    expect(page.locator("#file-name")).to_have_text(film.name)
    rows = page.locator(".bar-row")
    expect(rows).to_have_count(2)
    for row, (name, p) in zip(rows.all(), expected.probabilities.items(), strict=True):
        expect(row).to_contain_text(name)
        shown = row.locator(".pct").inner_text()
        assert shown.endswith("%") and abs(float(shown[:-1]) - 100 * p) <= 0.051
    expect(page.locator(f".bar-row.chosen:has-text('{expected.label}')")).to_have_count(1)
    page.wait_for_function("document.getElementById('cam').naturalWidth > 0")
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
    cam_size = page.evaluate("[document.getElementById('cam').naturalWidth, "
                             "document.getElementById('cam').naturalHeight]")
    assert cam_size == [224, 224]  # the overlay, at the film's size
    expect(page.locator("#cam-caption")).to_contain_text(expected.label)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#warning")).to_be_hidden()
    # the status region, which a screen reader announces, says the result in one line
    p = 100 * expected.probabilities["PNEUMONIA"]
    expect(page.locator("#status")).to_have_text(
        f"{film.name}: {expected.label}, P(PNEUMONIA) {p:.1f}% (threshold 0.45).")
    page.screenshot(path=str(SCREENSHOTS / "cxrkit_serve_result.png"), full_page=True)


def test_the_page_works_from_the_keyboard_and_shows_where_it_is(page):
    page.locator("body").focus()
    page.keyboard.press("Tab")  # to the file chooser, inside the drop zone: outlined
    assert page.evaluate("document.activeElement.id") == "file-input"
    assert page.evaluate("getComputedStyle(document.getElementById('drop')).outlineStyle") \
        == "solid"


def test_a_doubtful_image_says_so_in_the_result_itself(page, tmp_path):
    from playwright.sync_api import expect

    Image.new("L", (256, 256), 255).save(tmp_path / "white.png")
    page.set_input_files("#file-input", tmp_path / "white.png")
    warning = page.locator("#result #warning")
    expect(warning).to_be_visible()
    expect(warning).to_have_text("Warning: almost uniform gray levels: no film content; the "
                                 "label is unreliable.")
    expect(page.locator("#status")).to_contain_text("the label is unreliable")


def test_high_contrast_mode_keeps_the_bars_and_no_script_says_what_to_do(page):
    """Forced colours (Windows High Contrast) blank backgrounds: the bars are drawn in system
    colours. Without JavaScript the page says how to use the API instead of loading forever."""
    from playwright.sync_api import expect

    browser = page.context.browser
    film = sorted((REAL_DATA / "test" / "NORMAL").glob("*.jpeg"))[0]
    contrast = browser.new_page(forced_colors="active")
    contrast.goto(page.url)
    contrast.set_input_files("#file-input", film)
    expect(contrast.locator(".bar-row")).to_have_count(2)
    fill, track, mark = contrast.evaluate("""() => [".bar span", ".bar", ".bar i"].map(
        s => getComputedStyle(document.querySelector(s)).backgroundColor)""")
    assert fill != track and mark != track, (fill, track, mark)
    contrast.close()
    scriptless = browser.new_context(java_script_enabled=False)
    without = scriptless.new_page()
    without.goto(page.url)
    expect(without.locator("#nojs")).to_contain_text("curl -F file=@film.jpeg")
    expect(without.locator("#model")).to_have_text("")  # no "Loading..." forever
    scriptless.close()


def test_a_dropped_text_file_shows_the_error(page):
    from playwright.sync_api import expect

    # Drop, as a user dragging a file onto the page does.
    transfer = page.evaluate_handle("""() => {
        const t = new DataTransfer();
        t.items.add(new File(["patient notes, not a film"], "notes.txt", {type: "text/plain"}));
        return t; }""")
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_have_text("Could not analyse notes.txt: not an image PIL or pydicom can "
                               "read. Send a chest X-ray as PNG, JPEG or DICOM.")
    expect(page.locator("#result")).to_be_hidden()
    page.screenshot(path=str(SCREENSHOTS / "cxrkit_serve_error.png"), full_page=True)


def test_a_dicom_is_predicted_and_shown_through_its_overlay(page, run, tmp_path):
    """Browsers cannot draw DICOM: the page says so, and the overlay shows the film."""
    from playwright.sync_api import expect

    film = np.asarray(Image.open(sorted((REAL_DATA / "test" / "NORMAL").glob("*.jpeg"))[0])
                      .convert("L"), np.uint16)
    dicom = write_dicom(tmp_path / "film.dcm", (255 - film) * 16, "MONOCHROME1")
    [expected] = Predictor.load(run).predict([dicom])
    page.set_input_files("#file-input", dicom)
    expect(page.locator("#file-name")).to_have_text("film.dcm")
    expect(page.locator("#label")).to_have_text(expected.label)
    expect(page.locator(".no-preview")).to_contain_text(
        "No browser preview for this format; the film is in the overlay.")
    page.wait_for_function("document.getElementById('cam').naturalWidth === 224")
    expect(page.locator("#error")).to_be_hidden()
    page.screenshot(path=str(SCREENSHOTS / "cxrkit_serve_dicom.png"), full_page=True)


def test_dropping_several_films_says_only_the_first_was_analysed(page, run):
    from playwright.sync_api import expect

    films = sorted((REAL_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))[:2]
    [expected] = Predictor.load(run).predict([films[0]])
    transfer = page.evaluate_handle("""async (films) => {
        const t = new DataTransfer();
        for (const [name, bytes] of films) {
            t.items.add(new File([new Uint8Array(bytes)], name, {type: "image/jpeg"}));
        }
        return t; }""", [[f.name, list(f.read_bytes())] for f in films])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    expect(page.locator("#file-name")).to_have_text(films[0].name)
    expect(page.locator("#label")).to_have_text(expected.label)
    expect(page.locator("#status")).to_contain_text(
        "Only the first of the 2 files dropped was analysed: one at a time.")


def test_the_api_docs_render_without_the_internet(page):
    """Swagger UI's files come from the server itself (the browser has no internet here)."""
    from playwright.sync_api import expect

    docs = page.context.browser.new_page()
    requested = []
    docs.on("request", lambda request: requested.append(request.url))
    docs.goto(page.url.rstrip("/") + "/docs")
    expect(docs.locator(".opblock-summary-path", has_text="/predict")).to_be_visible()
    assert requested and all(url.startswith(page.url.rstrip("/")) for url in requested)
    docs.close()


# Everything a phone reader must read without scrolling sideways: a table itself may scroll.
TEXT_ELEMENTS = "h1, h2, h3, p, li, caption, figcaption, nav"


def test_the_report_and_the_audit_fit_a_phone(page, trained_run, tiny_kaggle, tmp_path):
    """At 420 px the page does not scroll sideways (its tables may) and no caption, heading
    or paragraph runs past the screen's edge."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    pages = [build_report(run), audit_html(tiny_kaggle, tmp_path / "audit")]
    phone = page.context.browser.new_page(viewport={"width": 420, "height": 800})
    for path in pages:
        phone.goto(path.as_uri())
        cut = phone.evaluate("""selector => [...document.querySelectorAll(selector)]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
            .map(e => e.tagName + ': ' + e.textContent.trim().slice(0, 50))""", TEXT_ELEMENTS)
        assert cut == [], f"{path.name}: {cut}"
        assert phone.evaluate("document.documentElement.scrollWidth") <= 420, path.name
    phone.close()


def audit_html(data: Path, out: Path) -> Path:
    audit_dataset(data, out)
    return out / "audit.html"


def axe_violations(page) -> list[str]:
    """axe-core's accessibility rules (WCAG 2.x A and AA, best practices) broken on the page."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [f"{v['id']} ({v['impact']}): {v['nodes'][0]['target']}" for v in found]


def test_no_page_breaks_an_accessibility_rule(page, trained_run, tiny_kaggle, tmp_path):
    """The serve page (with a result), the report and the audit, checked by axe-core."""
    page.set_input_files("#file-input", sorted((REAL_DATA / "test" / "NORMAL").glob("*.jpeg"))[0])
    page.wait_for_function("document.getElementById('cam').naturalWidth > 0")
    assert axe_violations(page) == []
    run = shutil.copytree(trained_run, tmp_path / "run")
    reader = page.context.browser.new_page()
    for path in (build_report(run), audit_html(tiny_kaggle, tmp_path / "audit")):
        reader.goto(path.as_uri())
        assert axe_violations(reader) == [], path.name
    reader.close()

