"""End to end in a real browser: Debian's Chromium, driven by Playwright, against `captioner serve`'s page.

Set CAPTIONER_SCREENSHOT=docs/images/serve_ui.png to keep the screenshot (the README's picture)."""
import os
import shutil
from pathlib import Path

import pytest

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
