"""The REST API and the batcher, through FastAPI's test client and the shipped model."""
import asyncio
import base64
import logging
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from captioner.decoding_options import LIMITS, OPTIONS, DecodingOptions  # noqa: E402
from captioner.pipeline import Captioner, CaptionResult  # noqa: E402
from captioner.serve import Batcher, Busy, create_app  # noqa: E402

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def client(captioner: Captioner):
    with TestClient(create_app(captioner, ui=False, batch_wait_ms=50)) as c:
        yield c


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a decompression bomb's header, without its payload."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def post_file(client: TestClient, data: bytes, name: str = "photo.jpg", **fields):
    return client.post("/api/caption", files={"image": (name, data, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def test_health_names_the_model_and_its_version(client: TestClient, captioner: Captioner) -> None:
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert body["model"]["name"] == "flickr8k-lite0"
    # what bulk lines carry: the weights, image vectors, check and datastore named (test_datastore.py)
    assert body["model"]["version"] == captioner.version and len(captioner.version) == 12
    assert body["model"]["grid"] == [7, 7] and body["captioner_version"]


def test_multipart_upload_answers_what_the_python_api_answers(client: TestClient, captioner: Captioner) -> None:
    r = post_file(client, (PHOTOS / "coffee.jpg").read_bytes(), "coffee.jpg", beam_size=4, num_captions=3)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = captioner(str(PHOTOS / "coffee.jpg"), beam_size=4, num_captions=3)
    assert [c["generated_text"] for c in body["captions"]] == [c["generated_text"] for c in expected]
    assert [c.get("source") for c in body["captions"]] == [c.get("source") for c in expected]
    # ranked by score, or where the captions of similar photos voted (the concept check fires on this photo,
    # whose decoder sees a dog), by their agreement
    ranks = [c["score"] if c.get("agreement") is None else c["agreement"] for c in body["captions"]]
    assert ranks == sorted(ranks, reverse=True) and len(ranks) == 3
    timing = body["timing"]
    assert timing["total_ms"] >= timing["model_ms"] > 0 and timing["batch_size"] >= 1
    assert body["model"] == "flickr8k-lite0" and body["attention"] is None


def test_a_caption_of_a_similar_photo_comes_with_its_words_and_no_maps(client: TestClient) -> None:
    encoded = base64.b64encode((PHOTOS / "coffee.jpg").read_bytes()).decode()  # the concept check fires here
    body = client.post("/api/caption", json={"image": encoded, "attention": True}).json()
    assert body["captions"][0]["source"] == "datastore"
    assert " ".join(body["attention"]["words"]) == body["captions"][0]["generated_text"]
    assert body["attention"]["maps"] == [] and body["attention"]["grid"] == [7, 7]


def test_json_base64_with_attention_maps(client: TestClient) -> None:
    encoded = base64.b64encode((PHOTOS / "chelsea.jpg").read_bytes()).decode()
    plain = client.post("/api/caption", json={"image": encoded, "attention": True, "max_length": 12})
    as_url = client.post("/api/caption", json={"image": "data:image/jpeg;base64," + encoded})
    assert plain.status_code == as_url.status_code == 200, plain.text
    body = plain.json()
    words = body["attention"]["words"]
    maps = np.array(body["attention"]["maps"])
    assert " ".join(words) == body["captions"][0]["generated_text"] == as_url.json()["captions"][0]["generated_text"]
    assert 1 <= len(words) <= 12 and body["attention"]["grid"] == [7, 7]
    assert maps.shape == (len(words), 7, 7)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-3)


@pytest.mark.parametrize("name, data, status, says", [
    ("notes.jpg", b"these are words, not pixels", 400, "notes.jpg: not an image"),
    ("cut.jpg", (PHOTOS / "camera.jpg").read_bytes()[:2000], 400,
     "cut.jpg: cannot read image: image file is truncated"),
    ("empty.jpg", b"", 400, "empty.jpg: empty image"),
    ("big.png", png_header(8_000, 8_000), 413, "big.png: 8000x8000 pixels is more than the limit of 50000000"),
    ("bomb.png", png_header(40_000, 40_000), 413, "bomb.png: Image size (1600000000 pixels) exceeds limit"),
    ("huge.jpg", b"\xff" * (10 * 2**20 + 1), 413, "huge.jpg: 10485761 bytes is more than the limit of 10485760"),
])
def test_bad_images_get_a_4xx_naming_the_file(client: TestClient, name: str, data: bytes, status: int,
                                              says: str) -> None:
    r = post_file(client, data, name)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_bodies_over_the_limit_are_refused_before_reading(client: TestClient) -> None:
    big = b"\x00" * (15 * 2**20)
    r = client.post("/api/caption", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the server's limit" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(15):
            yield b"\x00" * 2**20
    r = client.post("/api/caption", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the server's limit" in r.json()["detail"]


@pytest.mark.parametrize("request_kwargs, status, says", [
    ({}, 400, "empty body"),
    ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty body"),
    ({"data": {"beam_size": "3"}}, 400, "no file field 'image'"),
    ({"content": b"GIF89a", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
    ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty body"),
    ({"content": b"GIF89a", "headers": {"content-type": "image/gif"}}, 400, "image"),  # a raw body, truncated
])
def test_malformed_requests_say_what_to_send(client: TestClient, request_kwargs: dict, status: int, says: str) -> None:
    if "data" in request_kwargs:  # multipart without the file
        request_kwargs = {"files": {"other": ("x.txt", b"x")}, **request_kwargs}
    r = client.post("/api/caption", **request_kwargs)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


@pytest.mark.parametrize("fields, field", [
    ({"beam_size": 0}, "beam_size"),
    ({"max_length": 10000}, "max_length"),
    ({"beam_size": 2, "num_captions": 3}, "num_captions"),
    ({"beam_size": "three"}, "beam_size"),
    ({"length_penalty": -1}, "length_penalty"),
])
def test_options_out_of_range_get_422_naming_the_field(client: TestClient, fields: dict, field: str) -> None:
    photo = (PHOTOS / "rocket.jpg").read_bytes()
    answers = [post_file(client, photo, **fields),
               client.post("/api/caption", json={"image": base64.b64encode(photo).decode(), **fields})]
    for r in answers:
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", field]


def test_bad_base64_is_a_422_on_the_image_field(client: TestClient) -> None:
    r = client.post("/api/caption", json={"image": "not base64!"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
    r = client.post("/api/caption", json={"beam_size": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads memory from /proc")
def test_server_keeps_serving_after_bad_input_and_memory_stays_flat(client: TestClient) -> None:
    bad = [("bomb.png", png_header(100_000, 100_000)), ("cut.jpg", (PHOTOS / "coffee.jpg").read_bytes()[:5000]),
           ("huge.jpg", b"\x00" * (10 * 2**20 + 10)), ("text.jpg", b"hello")]
    for name, data in bad:  # warm-up: first-use allocations are not leaks
        post_file(client, data, name)
    before = rss_bytes()
    for _ in range(10):
        for name, data in bad:
            assert 400 <= post_file(client, data, name).status_code < 500
    growth = rss_bytes() - before
    assert growth < 40 * 2**20, f"memory grew {growth / 2**20:.0f} MiB over 40 bad requests"
    assert post_file(client, (PHOTOS / "astronaut.jpg").read_bytes()).status_code == 200


def test_concurrent_requests_share_batches(captioner: Captioner) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    answers: dict[str, dict] = {}
    with TestClient(create_app(captioner, ui=False, batch_wait_ms=300)) as client:
        def ask(path: Path) -> None:
            answers[path.name] = post_file(client, path.read_bytes(), path.name).json()
        threads = [threading.Thread(target=ask, args=(p,)) for p in photos]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = client.get("/api/health").json()["batching"]
    assert max(a["timing"]["batch_size"] for a in answers.values()) > 1
    assert health["images"] == len(photos) and health["batches"] < len(photos)
    for path in photos:  # batched or not, each image gets its own caption
        expected = captioner(str(path))[0]["generated_text"]
        assert answers[path.name]["captions"][0]["generated_text"] == expected


def test_batcher_off_runs_one_image_at_a_time(captioner: Captioner) -> None:
    batcher = Batcher(captioner, max_batch_size=1, max_wait_ms=100)
    pixels = captioner.encoder.preprocess(Image.open(PHOTOS / "coffee.jpg"))
    futures = [batcher.submit(pixels, captioner.defaults) for _ in range(3)]
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert [r.batch_size for r in results] == [1, 1, 1] and batcher.batches == 3


class SlowModel:
    """Stands in for Captioner in the batcher: records batches, can block, can fail."""

    def __init__(self) -> None:
        self.release, self.batches, self.fail_next = threading.Event(), [], False

    def generate(self, pixels, opts: DecodingOptions):
        self.release.wait(10)
        self.batches.append((len(pixels), opts))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("model broke")
        return [CaptionResult([f"caption {float(p.sum()):.0f} beam {opts.beam_size}"], []) for p in pixels]


def test_batcher_groups_by_options_and_survives_a_failing_batch() -> None:
    import torch

    model = SlowModel()
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=200)  # type: ignore[arg-type]
    one, three = DecodingOptions(beam_size=1), DecodingOptions(beam_size=3)
    first = batcher.submit(torch.zeros(3, 2, 2), one)  # the model is idle: it starts at once, alone
    deadline = time.time() + 10
    while batcher._queue.qsize() and time.time() < deadline:  # the worker holds it, blocked in generate
        time.sleep(0.001)
    futures = [batcher.submit(torch.full((3, 2, 2), float(i)), opts) for i, opts in enumerate([one, three, one, three])]
    model.release.set()
    results = [f.result(timeout=10) for f in [first, *futures]]
    # the four that waited behind the first share the next pass, one batch per set of options
    assert model.batches[0] == (1, one) and sorted(model.batches[1:], key=lambda b: b[1].beam_size) == [
        (2, one), (2, three)]
    assert [r.captions[0] for r in results[1:]] == ["caption 0 beam 1", "caption 12 beam 3", "caption 24 beam 1",
                                                    "caption 36 beam 3"]
    model.fail_next = True
    with pytest.raises(RuntimeError, match="model broke"):
        batcher.submit(torch.zeros(3, 2, 2), one).result(timeout=10)
    assert batcher.submit(torch.ones(3, 2, 2), one).result(timeout=10).captions == ["caption 12 beam 1"]
    batcher.close()


def test_an_idle_batcher_answers_a_lone_request_without_waiting_the_window() -> None:
    import torch

    model = SlowModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=30_000)  # type: ignore[arg-type]
    for _ in range(3):  # one client, one request at a time: each finds the model idle
        assert batcher.submit(torch.zeros(3, 2, 2), DecodingOptions()).result(timeout=10).batch_size == 1
    batcher.close()


def test_full_queue_answers_busy_instead_of_growing() -> None:
    import torch

    model = SlowModel()
    batcher = Batcher(model, max_batch_size=1, max_wait_ms=0, max_queue=2)  # type: ignore[arg-type]
    first = batcher.submit(torch.zeros(3, 2, 2), DecodingOptions())
    time.sleep(0.2)  # the worker holds the first job, blocked in generate
    queued = [batcher.submit(torch.zeros(3, 2, 2), DecodingOptions()) for _ in range(2)]
    with pytest.raises(Busy, match="2 images are waiting"):
        batcher.submit(torch.zeros(3, 2, 2), DecodingOptions())
    model.release.set()
    assert all(f.result(timeout=10).batch_size == 1 for f in [first, *queued])
    batcher.close()


def test_ui_is_served_at_the_root(captioner: Captioner) -> None:
    pytest.importorskip("gradio")
    with TestClient(create_app(captioner, examples=sorted(PHOTOS.glob("*.jpg")))) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert client.get("/api/health").status_code == 200  # the API is not shadowed by the UI's mount
        assert "/api/caption" in client.get("/openapi.json").json()["paths"]


def page_values(**chosen: float | bool) -> list[float | bool]:
    """What the page's controls send, in the table's order: `chosen`, else each option's default."""
    return [chosen.get(name, f.default) for name, f in OPTIONS.items()]


def test_ui_function_returns_captions_and_one_heatmap_per_word(captioner: Captioner) -> None:
    pytest.importorskip("gradio")
    from captioner.serve import build_ui

    batcher = Batcher(captioner, max_wait_ms=0)
    demo = build_ui(batcher, [])
    run = next(fn.fn for fn in demo.fns.values() if fn.api_name == "caption")
    values = page_values(beam_size=5, max_length=20, length_penalty=0.5, num_captions=7, block_trigrams=True)
    best, tags, table, similar, heatmaps = asyncio.run(run(str(PHOTOS / "rocket.jpg"), *values))  # a file path
    batcher.close()
    assert next(iter(tags)) == "rocket" and all(0 < p <= 1 for p in tags.values())  # what the encoder recognised
    assert best == table[0][1] and len(table) == 5  # num_captions is capped at the beam size
    assert len(similar) == 4 and all(isinstance(text, str) and -1 <= sim <= 1 for text, sim in similar)  # read
    assert [word for _, word in heatmaps] == best.split()
    assert heatmaps[0][0].size == (224, 224)
    pixels = [np.asarray(im, dtype=np.float32) for im, _ in heatmaps[:2]]
    assert np.abs(pixels[0] - pixels[1]).mean() > 1  # each word has its own map


def test_the_page_and_the_api_offer_every_decoding_option_with_its_range(captioner: Captioner) -> None:
    """Both come from the one table (decoding_options.py): a new option or range reaches them by itself."""
    pytest.importorskip("gradio")
    import gradio as gr

    from captioner.serve import Options, build_ui

    schema = Options.model_json_schema()["properties"]
    for name, f in OPTIONS.items():
        if name in LIMITS:
            ranged = next(s for s in schema[name]["anyOf"] if s["type"] != "null")
            assert (ranged["minimum"], ranged["maximum"]) == LIMITS[name], name
        assert f.metadata["help"] in schema[name]["description"], name
    batcher = Batcher(captioner, max_wait_ms=0)
    demo = build_ui(batcher, [])
    batcher.close()
    run = next(fn for fn in demo.fns.values() if fn.api_name == "caption")
    controls = run.inputs[1:]
    assert [c.label for c in controls] == [name.replace("_", " ").capitalize() for name in OPTIONS]
    for control, name in zip(controls, OPTIONS):
        if name in LIMITS:
            assert isinstance(control, gr.Slider) and (control.minimum, control.maximum) == LIMITS[name], name
        else:
            assert isinstance(control, gr.Checkbox), name


def test_attention_overlay_marks_where_the_map_is_high() -> None:
    from captioner.visualize import attention_overlay

    image = Image.new("RGB", (70, 70), (128, 128, 128))
    alpha = np.zeros((7, 7), dtype=np.float32)
    alpha[0, 0] = 1.0
    out = np.asarray(attention_overlay(image, alpha), dtype=np.int32)
    hot, cold = out[3, 3], out[66, 66]  # jet: red where the map is 1, blue where it is 0
    assert hot[0] > hot[2] and cold[2] > cold[0]


def test_serve_command_builds_the_app_with_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from captioner import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    assert cli.main(["serve", "--port", "8765", "--no-ui", "--max-batch-size", "4", "--device", "cpu"]) == 0
    assert seen["port"] == 8765 and seen["host"] == "127.0.0.1"
    assert seen["app"].state.batcher.max_batch_size == 4
    with TestClient(seen["app"]) as client:
        assert client.get("/").status_code == 404  # --no-ui: API only
        assert client.get("/api/health").json()["batching"]["max_batch_size"] == 4


def test_spaces_app_builds_the_same_page() -> None:
    pytest.importorskip("gradio")
    import runpy

    import gradio as gr

    demo = runpy.run_path(str(PHOTOS.parent.parent / "app.py"))["demo"]  # not __main__: builds, does not launch
    assert isinstance(demo, gr.Blocks)
    assert any(fn.api_name == "caption" for fn in demo.fns.values())


# --- errors: bad input is a 4xx, anything unexpected a 500 that tells the client nothing internal ---

@pytest.mark.parametrize("image, status", [
    ("data:image/jpeg;base64", 422),  # no comma: no data
    ("data:", 422),
    ("data:image/png;base64,", 400),  # a comma, then nothing: an empty image
])
def test_malformed_data_urls_are_a_4xx_on_the_image_field(client: TestClient, image: str, status: int) -> None:
    r = client.post("/api/caption", json={"image": image})
    assert r.status_code == status, r.text
    if status == 422:
        assert r.json()["detail"][0]["loc"] == ["body", "image"] and "comma" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize("body, loc", [
    (b'{"image": "%s", "length_penalty": Infinity}', ["body", "length_penalty"]),
    (b'{"image": "%s", "length_penalty": NaN}', ["body", "length_penalty"]),
    (b'{"image": "%s", "beam_size": 1e309}', ["body", "beam_size"]),
    (b'{"image": "\xff\xfe not utf-8"}', ["body"]),
    (b'{"image": "%s", "beam_size": 3', ["body"]),  # cut short: the whole body is the bad "input"
])
def test_json_that_cannot_be_echoed_back_is_still_a_422(client: TestClient, body: bytes, loc: list) -> None:
    photo = base64.b64encode((PHOTOS / "coffee.jpg").read_bytes())
    r = client.post("/api/caption", content=body.replace(b"%s", photo), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc and len(r.content) < 2000  # the photo is not echoed


def test_images_too_narrow_to_crop_are_a_4xx_not_gigabytes(client: TestClient) -> None:
    """A 20000x1 PNG is a few hundred bytes, but resizing its short side to the encoder's takes gigabytes."""
    strip = Image.new("RGB", (20_000, 1))
    data = __import__("io").BytesIO()
    strip.save(data, "PNG")
    r = post_file(client, data.getvalue(), "strip.png")
    assert r.status_code == 400 and "strip.png: 20000x1" in r.json()["detail"]


@pytest.mark.parametrize("where", ["decoding", "model"])
def test_unexpected_errors_answer_a_generic_500_and_log_the_traceback(
        captioner: Captioner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str) -> None:
    from captioner.serve import api

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert in /home/alice/secret/model.py")
    if where == "decoding":
        monkeypatch.setattr(api, "decode_upload", broken)
    else:
        monkeypatch.setattr(captioner, "generate", broken)
    with TestClient(create_app(captioner, ui=False, batch_wait_ms=0), raise_server_exceptions=False) as c:
        r = post_file(c, (PHOTOS / "coffee.jpg").read_bytes())
    assert r.status_code == 500
    assert "secret" not in r.text and "CUDA" not in r.text and "RuntimeError" not in r.text
    error_id = r.json()["error_id"]
    logged = [rec for rec in caplog.records if rec.name == "captioner.serve" and rec.exc_info]
    assert len(logged) == 1 and error_id in logged[0].getMessage()
    assert "/home/alice/secret/model.py" in str(logged[0].exc_info[1])  # the operator sees it all


@pytest.mark.parametrize("fields, field", [
    ({"beamsize": 5}, "beamsize"),
    ({"beam_size": 2, "lenght_penalty": 1}, "lenght_penalty"),
])
def test_unknown_fields_get_a_422_naming_them(client: TestClient, fields: dict, field: str) -> None:
    photo = (PHOTOS / "rocket.jpg").read_bytes()
    answers = [post_file(client, photo, **fields),
               client.post("/api/caption", json={"image": base64.b64encode(photo).decode(), **fields})]
    for r in answers:
        assert r.status_code == 422, r.text
        error = r.json()["detail"][0]
        assert error["loc"] == ["body", field] and "beam_size" in error["msg"]  # it lists the real options


# --- the page's work runs off the event loop ---

def page_function(app):
    """The function behind the page's Caption button, from the app that mounts the page."""
    from starlette.routing import Mount

    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == "")
    return next(fn.fn for fn in mount.app.get_blocks().fns.values() if fn.api_name == "caption")


@pytest.mark.parametrize("slow", ["load_image", "attention_overlay"])
def test_a_slow_page_job_does_not_stall_the_api(captioner: Captioner, monkeypatch: pytest.MonkeyPatch,
                                                slow: str) -> None:
    """The page's decoding and heatmaps are slowed until the API has answered: if they ran on the event loop,
    the API could not answer and the wait would time out."""
    pytest.importorskip("gradio")
    import anyio
    import httpx

    from captioner import visualize
    from captioner.serve import photos

    entered, api_answered, seen = threading.Event(), threading.Event(), []
    module = photos if slow == "load_image" else visualize
    real = getattr(module, slow)

    def slowed(source, *args, **kwargs):
        if not isinstance(source, bytes) and not entered.is_set():  # the page's photo, not the API's upload
            entered.set()
            seen.append(api_answered.wait(10))
        return real(source, *args, **kwargs)
    monkeypatch.setattr(module, slow, slowed)
    app = create_app(captioner, batch_wait_ms=0)
    run = page_function(app)
    photo = (PHOTOS / "coffee.jpg").read_bytes()

    async def main() -> tuple[int, str]:
        async with anyio.create_task_group() as tasks:
            page: list = []

            async def click() -> None:
                page.append(await run(str(PHOTOS / "rocket.jpg"), *page_values(num_captions=1)))
            tasks.start_soon(click)
            assert await anyio.to_thread.run_sync(entered.wait, 10), "the page job never started"
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                r = await http.post("/api/caption", files={"image": ("coffee.jpg", photo, "image/jpeg")})
            api_answered.set()
        return r.status_code, page[0][0]

    try:
        status, page_caption = anyio.run(main)
    finally:
        app.state.batcher.close()
    assert status == 200 and seen and all(seen), "the API waited for the page's job"
    assert page_caption == captioner(str(PHOTOS / "rocket.jpg"))[0]["generated_text"]


def test_the_page_refuses_images_over_the_pixel_limit_before_decoding(captioner: Captioner, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    import gradio as gr

    from captioner.serve import build_ui

    (tmp_path / "big.png").write_bytes(png_header(8_000, 8_000))  # no pixel data: decoding it would fail
    batcher = Batcher(captioner)
    run = next(fn.fn for fn in build_ui(batcher, []).fns.values() if fn.api_name == "caption")
    with pytest.raises(gr.Error, match="^'?big.png: 8000x8000 pixels is more than the limit"):
        asyncio.run(run(str(tmp_path / "big.png"), *page_values()))
    batcher.close()


# --- the batcher under threads: one worker, an exact queue limit, and no hang at shutdown ---

@pytest.fixture
def fast_switching():
    """Switch threads every microsecond, so check-then-act races show within a few rounds."""
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def hammer(action, threads: int = 8) -> list:
    """Run `action(i)` in `threads` threads at once; what each returned or raised, failing if any hangs."""
    barrier, out = threading.Barrier(threads), [None] * threads

    def go(i: int) -> None:
        barrier.wait(10)
        try:
            out[i] = action(i)
        except Exception as err:  # noqa: BLE001 - the test looks at what was raised
            out[i] = err
    workers = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
        assert not w.is_alive(), "a thread hung"
    return out


def within(seconds: float, action) -> None:
    """Run `action()` in a thread, failing the test if it has not returned after `seconds`."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{action.__name__} hung"


def batcher_threads() -> int:
    return sum(t.name == "captioner-batcher" for t in threading.enumerate())


def test_concurrent_starts_run_one_worker(fast_switching) -> None:
    before = batcher_threads()
    for _ in range(30):
        batcher = Batcher(SlowModel())  # type: ignore[arg-type]
        hammer(lambda i: batcher.start())  # noqa: B023 - hammer returns before the loop moves on
        within(10, batcher.close)  # stops the one worker it knows of; a second would be left running
        assert batcher_threads() == before, "two workers were started"


def test_queue_limit_holds_under_concurrent_submits(fast_switching) -> None:
    import torch

    for _ in range(200):
        model = SlowModel()
        batcher = Batcher(model, max_batch_size=1, max_wait_ms=0, max_queue=3)  # type: ignore[arg-type]
        held = batcher.submit(torch.zeros(3, 2, 2), DecodingOptions())
        deadline = time.time() + 10
        while batcher._queue.qsize() and time.time() < deadline:  # the worker takes it and blocks in generate
            time.sleep(0.001)
        out = hammer(lambda i: batcher.submit(torch.zeros(3, 2, 2), DecodingOptions()), threads=12)  # noqa: B023
        accepted = [f for f in out if not isinstance(f, Exception)]
        assert all(isinstance(f, Busy) for f in out if isinstance(f, Exception))
        model.release.set()
        assert len(accepted) == 3, f"{len(accepted)} jobs queued past a limit of 3"
        assert all(f.result(timeout=10).batch_size == 1 for f in [held, *accepted])
        batcher.close()


def test_submits_racing_close_get_an_answer_or_an_error_never_a_hang(fast_switching) -> None:
    import torch

    before = batcher_threads()
    for _ in range(20):
        model = SlowModel()
        model.release.set()
        batcher = Batcher(model, max_batch_size=4, max_wait_ms=0)  # type: ignore[arg-type]

        def act(i: int):
            if i == 0:
                return batcher.close()  # noqa: B023 - act runs before the loop moves on
            return [batcher.submit(torch.zeros(3, 2, 2), DecodingOptions()) for _ in range(5)]  # noqa: B023
        out = hammer(act)
        for answer in out[1:]:
            if isinstance(answer, Exception):
                assert "shutting down" in str(answer), answer
            else:
                assert all(f.result(timeout=10).captions for f in answer), "a submitted job was never run"
        with pytest.raises(RuntimeError, match="shutting down"):
            batcher.submit(torch.zeros(3, 2, 2), DecodingOptions())
        assert batcher_threads() == before, "a worker outlived close"


def test_requests_after_shutdown_get_a_503(captioner: Captioner) -> None:
    app = create_app(captioner, ui=False)
    with TestClient(app):
        pass  # the lifespan ends: the batcher closes
    r = post_file(TestClient(app), (PHOTOS / "coffee.jpg").read_bytes())
    assert r.status_code == 503 and "shutting down" in r.json()["detail"]


# --- access control: an API key and a limit on requests in flight per client ---

def test_api_key_is_required_as_a_bearer_token_when_set(captioner: Captioner) -> None:
    photo = (PHOTOS / "coffee.jpg").read_bytes()
    with TestClient(create_app(captioner, ui=False, api_key="s3cret-key")) as c:
        for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret-key"},
                        {"authorization": "Bearer s3cret-keyX"}]:
            r = c.post("/api/caption", files={"image": ("c.jpg", photo)}, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and "s3cret" not in r.text
        ok = c.post("/api/caption", files={"image": ("c.jpg", photo)}, headers={"authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200, ok.text
        raw = {"content-type": "image/jpeg"}
        assert c.post("/api/image-to-text", content=photo, headers=raw).status_code == 401  # the same guard
        answer = c.post("/api/image-to-text?beam_size=5", content=photo,
                        headers={**raw, "authorization": "Bearer s3cret-key"})
        assert answer.status_code == 200 and set(answer.json()[0]) == {"generated_text"}
        assert c.get("/api/health").status_code == 200  # open: load balancers probe it without secrets
        assert "bearer" in str(c.get("/openapi.json").json()["components"]["securitySchemes"]).lower()


def test_without_a_key_the_api_is_open(client: TestClient) -> None:
    assert post_file(client, (PHOTOS / "coffee.jpg").read_bytes()).status_code == 200


def test_the_page_asks_for_the_key_when_one_is_set(captioner: Captioner) -> None:
    pytest.importorskip("gradio")
    with TestClient(create_app(captioner, api_key="s3cret-key")) as c:
        assert c.get("/config").status_code == 401  # the page's data, before logging in
        assert c.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert c.post("/login", data={"username": "me", "password": "s3cret-key"}).status_code == 200
        assert c.get("/config").status_code == 200


def test_requests_in_flight_per_client_are_limited(captioner: Captioner) -> None:
    """Requests are held after decoding until released: two from one address fill its allowance, a third
    gets a 429 at once, another address still gets in, and answered requests free their places."""
    import anyio
    import httpx

    app = create_app(captioner, ui=False, max_inflight_per_client=2)
    batcher, release, held = app.state.batcher, anyio.Event(), []
    real = batcher.caption

    async def caption_when_released(*args):
        held.append(args)
        await release.wait()
        return await real(*args)
    batcher.caption = caption_when_released
    photo = {"image": ("coffee.jpg", (PHOTOS / "coffee.jpg").read_bytes(), "image/jpeg")}

    def client(address: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 1)), base_url="http://test")

    async def until_held(n: int) -> None:
        with anyio.fail_after(20):
            while len(held) < n:
                await anyio.sleep(0.01)

    async def main() -> tuple[list[int], httpx.Response, int]:
        answers: list[int] = []
        async with client("10.0.0.1") as alice, client("10.0.0.2") as bob, anyio.create_task_group() as tasks:
            async def ask(who: httpx.AsyncClient) -> None:
                answers.append((await who.post("/api/caption", files=photo)).status_code)
            tasks.start_soon(ask, alice)
            tasks.start_soon(ask, alice)
            await until_held(2)
            third = await alice.post("/api/caption", files=photo)
            tasks.start_soon(ask, bob)  # another address has its own allowance
            await until_held(3)
            release.set()
        async with client("10.0.0.1") as alice:
            again = (await alice.post("/api/caption", files=photo)).status_code
        return answers, third, again

    try:
        answers, third, again = anyio.run(main)
    finally:
        batcher.close()
    assert third.status_code == 429 and third.headers["retry-after"] == "1", third.text
    assert "2 requests from 10.0.0.1 are already in flight" in third.json()["detail"]
    assert answers == [200, 200, 200] and again == 200


def test_serve_help_lists_the_access_flags(capsys: pytest.CaptureFixture) -> None:
    from captioner import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--api-key" in out and "CAPTIONER_API_KEY" in out and "--max-inflight-per-client" in out


@pytest.mark.parametrize("host, env, flags, limit, warns", [
    ("127.0.0.1", None, [], None, False),  # loopback: both off
    ("0.0.0.0", "k3y", [], 8, False),  # other machines: the limit is on, the key comes from the environment
    ("0.0.0.0", None, ["--max-inflight-per-client", "0"], None, True),  # no key: a warning
    ("::1", None, ["--max-inflight-per-client", "3"], 3, False),
])
def test_serve_command_access_settings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, host: str,
                                       env: str | None, flags: list[str], limit: int | None, warns: bool) -> None:
    import uvicorn

    from captioner import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app))
    if env:
        monkeypatch.setenv("CAPTIONER_API_KEY", env)
    else:
        monkeypatch.delenv("CAPTIONER_API_KEY", raising=False)
    assert cli.main(["serve", "--host", host, "--no-ui", "--device", "cpu", *flags]) == 0
    assert seen["app"].state.max_inflight_per_client == limit
    assert ("warning: 0.0.0.0 takes requests from other machines" in capsys.readouterr().err) == warns
    photo = {"image": ("c.jpg", (PHOTOS / "coffee.jpg").read_bytes())}
    with TestClient(seen["app"]) as c:
        assert c.post("/api/caption", files=photo).status_code == (401 if env else 200)
        if env:
            assert c.post("/api/caption", files=photo, headers={"authorization": f"Bearer {env}"}).status_code == 200


# --- what the API echoes, what the log keeps, Hugging Face's JSON and other origins ---

def test_an_unknown_fields_message_lists_every_field_and_only_what_was_sent_is_cut(client: TestClient) -> None:
    photo = (PHOTOS / "rocket.jpg").read_bytes()
    every = "unknown field; the fields are " + ", ".join([*OPTIONS, "attention", "image"])
    answers = [post_file(client, photo, beamsize="x" * 500),
               client.post("/api/caption", json={"image": base64.b64encode(photo).decode(), "beamsize": "x" * 500,
                                                 "z" * 300: 1})]
    for r in answers:
        assert r.status_code == 422, r.text
        errors = r.json()["detail"]
        assert all(e["msg"] == every for e in errors), errors  # the server's own list, whole
        assert errors[0]["loc"] == ["body", "beamsize"] and errors[0]["input"] == "x" * 100 + "..."
    assert answers[1].json()["detail"][1]["loc"] == ["body", "z" * 100 + "..."]  # a sent name is cut too


def page_caption(captioner: Captioner) -> tuple[Batcher, object, object]:
    """A batcher, the page and its Caption event, whose `process_api` runs it as a click does: Gradio's
    preprocessing of the upload, then `run`."""
    from captioner.serve import build_ui

    batcher = Batcher(captioner, max_wait_ms=0)
    demo = build_ui(batcher, [])
    return batcher, demo, next(fn for fn in demo.fns.values() if fn.api_name == "caption")


def test_the_page_reads_heic_and_says_plainly_why_it_cannot_read_a_photo(
        captioner: Captioner, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Gradio's own gr.Image opened uploads with Pillow, which reads no HEIC: the page showed Gradio's error
    with the server's temporary path in it twice, and its traceback went to the log."""
    pytest.importorskip("gradio")
    pillow_heif = pytest.importorskip("pillow_heif")
    import gradio as gr

    from captioner.serve import ui

    # written without registering pillow-heif's opener, which would teach Pillow (and so Gradio) to read it
    pillow_heif.from_pillow(Image.open(PHOTOS / "rocket.jpg")).save(tmp_path / "rocket.heic")
    (tmp_path / "broken.jpg").write_bytes(b"not a photo at all")
    batcher, demo, event = page_caption(captioner)
    cache = event.inputs[0].GRADIO_CACHE

    def click(name: str) -> dict:
        upload = {"path": str(tmp_path / name), "orig_name": name, "meta": {"_type": "gradio.FileData"}}
        return asyncio.run(demo.process_api(event, [upload, *page_values()], explicit_call=True))

    try:
        assert click("rocket.heic")["data"][0] == captioner(str(tmp_path / "rocket.heic"))[0]["generated_text"]
        with pytest.raises(gr.Error) as refused:
            click("broken.jpg")
    finally:
        batcher.close()
    message = refused.value.message  # what the page shows
    assert message == "broken.jpg: not an image, or a format Pillow cannot read"
    assert str(tmp_path) not in message and cache not in message
    assert refused.value.print_exception is False  # Gradio prints no traceback for it
    logged = [r for r in caplog.records if r.name == "captioner.serve"]
    assert [r.getMessage() for r in logged] == [f"page: {message}"] and not logged[0].exc_info
    assert not Path(ui.__file__).with_suffix(".pyi").exists()  # Gradio wrote no stub into the package


def test_refused_requests_are_one_line_in_the_log_and_faults_keep_their_traceback(
        captioner: Captioner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from captioner.serve import api

    caplog.set_level(logging.INFO)
    photo = (PHOTOS / "coffee.jpg").read_bytes()
    with TestClient(create_app(captioner, ui=False, batch_wait_ms=0, max_upload_bytes=2000),
                    raise_server_exceptions=False) as c:
        statuses = [post_file(c, b"these are words, not pixels", "notes.jpg").status_code,
                    post_file(c, photo[:1500], beamsize=3).status_code,
                    post_file(c, photo, "coffee.jpg").status_code,
                    c.post("/api/caption", content=b"\0" * 100_000, headers={"content-type": "image/jpeg"}).status_code,
                    c.get("/api/search?q=dogs").status_code]
        monkeypatch.setattr(api, "decode_upload", lambda *args: 1 / 0)
        statuses.append(post_file(c, photo[:1500]).status_code)
    assert statuses == [400, 422, 413, 413, 404, 500]
    logged = [r for r in caplog.records if r.name == "captioner.serve"]
    assert [r.getMessage().split(":")[0] for r in logged[:5]] == [
        "POST /api/caption 400", "POST /api/caption 422", "POST /api/caption 413", "POST /api/caption 413",
        "GET /api/search 404"]
    assert "notes.jpg: not an image" in logged[0].getMessage()
    assert "body.beamsize: unknown field" in logged[1].getMessage()
    assert "coffee.jpg: " in logged[2].getMessage() and "over the server's limit" in logged[3].getMessage()
    assert len(logged) == 6 and all("\n" not in r.getMessage() for r in logged)
    assert [r for r in caplog.records if r.exc_info] == [logged[5]]  # a traceback for the fault alone
    assert isinstance(logged[5].exc_info[1], ZeroDivisionError)


def test_image_to_text_takes_hugging_faces_json(client: TestClient, captioner: Captioner) -> None:
    path = str(PHOTOS / "chelsea.jpg")
    encoded = base64.b64encode((PHOTOS / "chelsea.jpg").read_bytes()).decode()
    plain = client.post("/api/image-to-text", json={"inputs": encoded})
    assert plain.status_code == 200, plain.text
    assert plain.json() == [{"generated_text": captioner(path)[0]["generated_text"]}]
    as_url = client.post("/api/image-to-text", json={"inputs": "data:image/jpeg;base64," + encoded,
                                                     "parameters": {"beam_size": 4, "num_captions": 2}})
    assert as_url.status_code == 200, as_url.text
    assert as_url.json() == [{"generated_text": c["generated_text"]} for c in captioner(path, beam_size=4,
                                                                                          num_captions=2)]
    bad = client.post("/api/image-to-text", json={"inputs": "not base64!"})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("inputs: not valid base64: send")
    unknown = client.post("/api/image-to-text", json={"inputs": encoded, "parameters": {"max_new_tokens": 20}})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "parameters", "max_new_tokens"]
    assert unknown.json()["detail"][0]["msg"] == "unknown field; the fields are " + ", ".join([*OPTIONS, "attention"])
    ours = client.post("/api/image-to-text", json={"image": encoded})  # what it took before, it still takes
    assert ours.status_code == 200 and ours.json() == plain.json()


def test_serve_cors_origin_lets_only_the_pages_it_names_call_the_api(
        monkeypatch: pytest.MonkeyPatch, client: TestClient, captioner: Captioner) -> None:
    import uvicorn

    from captioner import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app))
    assert cli.main(["serve", "--no-ui", "--device", "cpu", "--cors-origin", "https://photos.example",
                     "--cors-origin", "http://localhost:3000"]) == 0
    allowed, other = {"origin": "https://photos.example"}, {"origin": "https://elsewhere.example"}
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type"}
    with TestClient(seen["app"]) as c:
        assert c.get("/api/health", headers=allowed).headers["access-control-allow-origin"] == "https://photos.example"
        error = c.post("/api/caption", files={"image": ("x.jpg", b"x")}, headers=allowed)
        assert error.status_code == 400  # errors carry it too, or the page could not read why
        assert error.headers["access-control-allow-origin"] == "https://photos.example"
        preflight = c.options("/api/caption", headers={"origin": "http://localhost:3000", **ask})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "access-control-allow-origin" not in c.get("/api/health", headers=other).headers
        assert "access-control-allow-origin" not in c.options("/api/caption", headers={**other, **ask}).headers
    assert "access-control-allow-origin" not in client.get("/api/health", headers=allowed).headers  # default: none
    with pytest.raises(ValueError, match="'https://photos.example/' is not an origin"):
        create_app(captioner, ui=False, cors_origins=["https://photos.example/"])  # no browser sends the slash


# --- the clients people already use, for real, against a running server ---

def test_the_hugging_face_inference_client_reads_captions(server_url: str, captioner: Captioner) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    client = huggingface_hub.InferenceClient(model=f"{server_url}/api/image-to-text")
    for name in ("chelsea.jpg", "coffee.jpg"):
        out = client.image_to_text(str(PHOTOS / name))  # posts the raw file, reads [{"generated_text"}]
        assert out.generated_text == captioner(str(PHOTOS / name))[0]["generated_text"]
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as refused:
        client.image_to_text(b"not an image")
    assert refused.value.response.status_code == 400  # the same checks as /api/caption


def test_the_gradio_client_calls_the_page(server_url: str, captioner: Captioner) -> None:
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(server_url + "/", verbose=False)
    photo = gradio_client.handle_file(str(PHOTOS / "chelsea.jpg"))
    caption, tags, *_ = client.predict(photo, *page_values(), api_name="/caption")
    assert caption == captioner(str(PHOTOS / "chelsea.jpg"))[0]["generated_text"]
    assert tags["label"] == "cat"
