"""The REST API and the batcher, through FastAPI's test client and the shipped model."""
import base64
import hashlib
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

from captioner.pipeline import DEFAULT_MODEL, Captioner, DecodingOptions  # noqa: E402
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


def test_health_names_the_model_and_its_version(client: TestClient) -> None:
    body = client.get("/api/health").json()
    weights = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    assert body["status"] == "ok"
    assert body["model"]["name"] == "flickr8k-lite0"
    assert body["model"]["version"] == hashlib.sha256(weights).hexdigest()[:12]
    assert body["model"]["grid"] == [7, 7] and body["captioner_version"]


def test_multipart_upload_answers_what_the_python_api_answers(client: TestClient, captioner: Captioner) -> None:
    r = post_file(client, (PHOTOS / "coffee.jpg").read_bytes(), "coffee.jpg", beam_size=4, num_captions=3)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = captioner(str(PHOTOS / "coffee.jpg"), beam_size=4, num_captions=3)
    assert [c["generated_text"] for c in body["captions"]] == [c["generated_text"] for c in expected]
    scores = [c["score"] for c in body["captions"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    timing = body["timing"]
    assert timing["total_ms"] >= timing["model_ms"] > 0 and timing["batch_size"] >= 1
    assert body["model"] == "flickr8k-lite0" and body["attention"] is None


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
    ("cut.jpg", (PHOTOS / "camera.jpg").read_bytes()[:2000], 400, "cut.jpg: cannot read image: image file is truncated"),
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
    ({"content": b"GIF89a", "headers": {"content-type": "image/gif"}}, 415, "image/gif"),
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
        return [[f"caption {float(p.sum()):.0f} beam {opts.beam_size}"] for p in pixels]


def test_batcher_groups_by_options_and_survives_a_failing_batch() -> None:
    import torch

    model = SlowModel()
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=200)  # type: ignore[arg-type]
    one, three = DecodingOptions(beam_size=1), DecodingOptions(beam_size=3)
    futures = [batcher.submit(torch.full((3, 2, 2), float(i)), opts) for i, opts in enumerate([one, three, one, three])]
    model.release.set()
    results = [f.result(timeout=10) for f in futures]
    assert sorted(model.batches, key=lambda b: b[1].beam_size) == [(2, one), (2, three)]
    assert [r.captions[0] for r in results] == ["caption 0 beam 1", "caption 12 beam 3", "caption 24 beam 1",
                                                "caption 36 beam 3"]
    model.fail_next = True
    with pytest.raises(RuntimeError, match="model broke"):
        batcher.submit(torch.zeros(3, 2, 2), one).result(timeout=10)
    assert batcher.submit(torch.ones(3, 2, 2), one).result(timeout=10).captions == ["caption 12 beam 1"]
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


def test_ui_function_returns_captions_and_one_heatmap_per_word(captioner: Captioner) -> None:
    pytest.importorskip("gradio")
    import asyncio

    from captioner.serve import build_ui

    batcher = Batcher(captioner, max_wait_ms=0)
    demo = build_ui(batcher, [])
    run = next(fn.fn for fn in demo.fns.values() if fn.api_name == "caption")
    best, table, heatmaps = asyncio.run(run(Image.open(PHOTOS / "rocket.jpg"), 5, 20, 7))
    batcher.close()
    assert best == table[0][1] and len(table) == 5  # num_captions is capped at the beam size
    assert [word for _, word in heatmaps] == best.split()
    assert heatmaps[0][0].size == (224, 224)
    pixels = [np.asarray(im, dtype=np.float32) for im, _ in heatmaps[:2]]
    assert np.abs(pixels[0] - pixels[1]).mean() > 1  # each word has its own map


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
