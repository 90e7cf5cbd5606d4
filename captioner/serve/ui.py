"""The Gradio page: a photo in, the n-best captions, concepts and attention heatmaps out, and a search box
over the library; its work goes through the API's batcher and decoding pool."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import HTTPException
from PIL import Image

from ..data import ImageError, expand_inputs
from ..decoding_options import LIMITS, OPTIONS, DecodingOptions, OptionError
from ..search import Library
from .batcher import Batcher, Busy, Closed
from .middleware import log
from .photos import MAX_PIXELS, decode_slots, read_photo, thumbnail


def build_ui(batcher: Batcher, examples: list[Path], max_pixels: int = MAX_PIXELS,
             slots: anyio.CapacityLimiter | None = None, library: Library | None = None) -> Any:
    """The Gradio page: a photo (upload, webcam, clipboard or an example), beam size and length sliders,
    the n-best captions, and one attention heatmap per word of the best caption; with a `library`, a search
    box whose hits show as thumbnails (made here and handed to Gradio, so the page's login covers them too).

    Gradio hands over the photo's file path, not its pixels (`photo_input`), so the pixel limit is checked from
    the header before anything is decoded; decoding, resizing and the heatmaps run in `slots`, the pool the API
    decodes in, so a large photo on the page never holds up the event loop that answers everyone else."""
    import gradio as gr

    from .. import visualize

    captioner = batcher.captioner
    slots = slots or decode_slots()

    def prepare(photo: str) -> tuple[torch.Tensor, Image.Image]:
        picture = read_photo(photo, Path(photo).name, max_pixels)  # by its name: no server paths in messages
        return captioner.encoder.preprocess(picture), captioner.encoder.crop(picture)

    def draw(crop: Image.Image, words: list[str], alphas: np.ndarray | None) -> list[tuple[Image.Image, str]]:
        if alphas is None:  # a caption of a similar photo: the decoder did not write it, so looked nowhere
            return [(crop, visualize.NO_ATTENTION)]
        return [(visualize.attention_overlay(crop, alpha), word) for word, alpha in zip(words, alphas)]

    def refuse(message: str) -> Exception:
        """The page's answer to a photo or option it cannot use: the message for the person, one line in the
        log, and no traceback, which is for the server's own faults (Gradio prints one for any other error)."""
        log.warning("page: %s", " ".join(message.split()))
        return gr.Error(message, print_exception=False)

    async def run(photo: str | None, *values: float | bool
                  ) -> tuple[str, dict[str, float], list[list], list[list], list[tuple[Image.Image, str]]]:
        if photo is None:
            raise refuse("Upload a photo, take one with the webcam, or pick an example first.")
        # each option's type (int, float or bool) from its default
        kinds: dict[str, Callable[[Any], Any]] = {name: type(OPTIONS[name].default) for name in OPTIONS}
        chosen = {name: kinds[name](value) for name, value in zip(OPTIONS, values)}
        chosen["num_captions"] = min(chosen["num_captions"], chosen["beam_size"])
        try:
            opts = captioner.options(**chosen)
        except OptionError as err:
            raise refuse(str(err)) from None
        try:
            pixels, crop = await anyio.to_thread.run_sync(prepare, photo, limiter=slots)
            result = await batcher.caption(pixels, opts)
        except (ImageError, Busy, Closed) as err:
            raise refuse(str(err)) from None
        nbest = captioner.as_dicts(result.captions)
        words, alphas = captioner.attention_maps(result.captions[0])
        heatmaps = await anyio.to_thread.run_sync(draw, crop, words, alphas, limiter=slots)
        table = [[rank, c["generated_text"], c["score"], c.get("source", "decoder")] for rank, c in enumerate(nbest, 1)]
        similar = [[text, round(sim, 3)] for text, sim in result.neighbours]
        return nbest[0]["generated_text"], dict(result.concepts), table, similar, heatmaps

    def thumbnails(query: str) -> list[tuple[Image.Image, str]]:
        hits: list[tuple[Image.Image, str]] = []
        if library is None:  # the search box is only on the page with a library
            return hits
        for hit in library.find(query) if query.strip() else []:
            label = f"{hit['caption']} ({hit['score']:.2f}) {hit['file']}"
            try:
                hits.append((thumbnail(library, hit["file"], max_pixels), label))
            except HTTPException:  # listed, but gone or unreadable since: left out
                continue
        return hits

    async def find(query: str) -> list[tuple[Image.Image, str]]:
        return await anyio.to_thread.run_sync(thumbnails, query, limiter=slots)

    defaults = captioner.defaults
    with gr.Blocks(title="captioner") as demo:
        gr.Markdown(f"## captioner\n{captioner.title[0].upper()}{captioner.title[1:]}, model `{captioner.name}`. "
                    "Pick a photo; the captions come with a heatmap of where the model looked for each word. "
                    "REST API: [/docs](/docs).")
        with gr.Row():
            with gr.Column(scale=2):
                image = photo_input(gr)
                controls = [page_control(gr, name, defaults) for name in OPTIONS]
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example photos")
            with gr.Column(scale=3):
                best = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                tags = gr.Label(label="What the encoder recognises (ImageNet concepts, as tags)", num_top_classes=5,
                                elem_id="concepts")
                table = gr.Dataframe(headers=["rank", "caption", "score", "written by"], label="The n-best: the "
                                     "decoder's beams, or where consensus, the concept check or a photo unlike the "
                                     "training photos let them vote, "
                                     "captions of similar photos",
                                     interactive=False, elem_id="nbest")
                similar = gr.Dataframe(headers=["caption", "similarity"], label="Captions of similar photos (what a "
                                       "retrieval model read while writing)", interactive=False, elem_id="neighbours",
                                       visible=captioner.datastore is not None)
                gallery = gr.Gallery(label="Attention, word by word", columns=5, height="auto", elem_id="attention")
        inputs, outputs = [image, *controls], [best, tags, table, similar, gallery]
        button.click(run, inputs, outputs, concurrency_limit=None, api_name="caption")
        image.upload(run, inputs, outputs, concurrency_limit=None, api_visibility="private")
        if library is not None:
            gr.Markdown(f"### Search the library\n{len(library.records)} captioned photos; describe what to find.")
            query = gr.Textbox(label="Find photos", placeholder="two dogs on a beach", elem_id="search")
            found = gr.Gallery(label="Best matches", columns=5, height="auto", elem_id="search-results")
            query.submit(find, [query], [found], concurrency_limit=None, api_name="search")
    return demo


def photo_input(gr: Any) -> Any:
    """The page's photo: a gr.Image that hands `run` the uploaded file's path without opening it. Gradio's
    own preprocessing opens every upload with Pillow first, so a photo only captioner reads (HEIC) or a broken
    file failed there, and the page showed Gradio's error, with the server's temporary path in it twice,
    instead of load_image's, which says what is wrong with the photo by its name. Its one method is replaced
    on the instance: a subclass of a Gradio component makes Gradio write a stub (.pyi) beside this file."""
    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"], label="Photo",
                     elem_id="photo", height=320)
    preprocess = image.preprocess

    def hand_over(payload: Any) -> Any:
        if payload is not None and payload.path is not None and not (payload.url or "").startswith("data:"):
            return payload.path
        return preprocess(payload)  # nothing, or a photo sent as a data: URL (image_mode=None: not converted)

    image.preprocess = hand_over
    return image


def page_control(gr: Any, name: str, defaults: DecodingOptions) -> Any:
    """The page's control of one decoding option, from its row in the table: a slider over its range,
    or a checkbox. The page shows 3 captions unless the beam is narrower."""
    f = OPTIONS[name]
    label, value = name.replace("_", " ").capitalize(), getattr(defaults, name)
    if name == "num_captions":
        value = min(3, defaults.beam_size)
    if name not in LIMITS:
        return gr.Checkbox(value=value, label=label, info=f.metadata["help"])
    low, high = LIMITS[name]
    step = 1 if type(f.default) is int else 0.1
    return gr.Slider(low, high, value=value, step=step, label=label, info=f.metadata["help"], elem_id=name)


def example_photos(folder: str | Path | None = None) -> list[Path]:
    """The photos the UI offers as examples: the given folder, or the repository's examples/photos."""
    root = Path(folder) if folder else Path(__file__).resolve().parents[2] / "examples" / "photos"
    return expand_inputs([str(root)]) if root.is_dir() else []
