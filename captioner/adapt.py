"""`captioner adapt LIBRARY --output MODEL`: a retrieval model's image vectors fitted to a photo library that
has no captions, by self-training on pseudo-captions, for the library's photos unlike the model's training photos.

For each photo the model retrieves its consensus.VOTERS captions from its datastore (image vector and concept words,
as `caption` does), and the one the others agree with most (consensus.py) becomes its pseudo-caption. A second
pooled head of the image embedder, its library head (models/embedder.py), starts as a copy of the first and is
trained with the contrastive loss (contrastive.info_nce) to put each photo next to its pseudo-caption's MiniLM
vector, so photos like the library's find captions like the ones the vote chose. The model uses it for the photos
its familiarity check calls unfamiliar (familiarity.py), which the retrieved captions already decide by their vote;
the photos the decoder knows keep the vectors it learned to read, so its Flickr8k captions stay as they were. The
decoder, its vocabulary, the check and the datastore are copied as they are (docs/RESULTS.md, "Adapting to a
library"). The self-training of pseudo-labels follows PS-NOC-style semi-supervised captioning; only the small head
trains, on features computed once.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .consensus import rerank
from .contrastive import info_nce
from .data import ImageError, expand_inputs, load_image
from .familiarity import FAMILIARITY_FILE, unfamiliar_photos
from .models.embedder import ImageEmbedder
from .models.files import add_retrieval
from .pipeline import Captioner
from .sentences import SentenceEncoder

MAX_PHOTOS = 5000  # photos used at most, evenly spread: their features stay in memory (49 x 1280 float16 each)


@torch.inference_mode()
def pseudo_captions(captioner: Captioner, paths: list[Path], batch_size: int = 32,
                    log: Callable[[str], None] = print) -> tuple[np.ndarray, list[str], list[Path], int]:
    """Each readable photo's encoder features (N, L, C) float16 and pseudo-caption, the photos that could not be
    read (reported, left out), and how many the model's familiarity check calls unfamiliar (at its default
    threshold): those the library head will serve."""
    store = captioner.datastore
    if store is None or captioner.embedder is None:
        raise ValueError(f"{captioner.path}: adapt needs a retrieval model (a datastore and retrieval.safetensors)")
    if captioner.familiarity is None:
        raise ValueError(f"{captioner.path}: adapt fits image vectors for the photos a model's familiarity check "
                         f"calls unlike its training photos, and this model has no check ({FAMILIARITY_FILE}; "
                         "scripts/assets/build_familiarity.py fits one)")
    opts = captioner.options(consensus=True)  # retrieval as `caption --consensus` does it, voters included
    features, texts, failed, unfamiliar = [], [], [], 0
    for start in tqdm(range(0, len(paths), batch_size), desc="pseudo-captions", unit="batch"):
        images = []
        for path in paths[start:start + batch_size]:
            try:
                images.append(load_image(path))
            except ImageError as err:
                failed.append(path)
                log(f"captioner adapt: skipped {err}")
        if not images:
            continue
        regions = captioner.encoder.regions(torch.stack([captioner.encoder.preprocess(im) for im in images]))
        _, found = captioner.retrieved(regions, opts)
        texts += [voters[rerank([], voters, store.idf, 0.0)[0][0]] for voters in found.texts]
        features.append(regions.half().numpy())
        unfamiliar += int(unfamiliar_photos(captioner.familiarity, regions, opts.unfamiliar_threshold).sum())
    if not texts:
        raise ValueError("captioner adapt: no readable photo in the library")
    return np.concatenate(features), texts, failed, unfamiliar


def fit_library_head(embedder: ImageEmbedder, features: np.ndarray, targets: np.ndarray, epochs: int, lr: float,
                     batch_size: int, seed: int = 0, log: Callable[[str], None] = print) -> ImageEmbedder:
    """A copy of `embedder` with a library head trained with InfoNCE on (features (N, L, C), unit target vectors
    (N, D)) pairs from a copy of its first head; the image side and the first head stay as they are."""
    torch.manual_seed(seed)
    model = copy.deepcopy(embedder).eval()
    model.library = copy.deepcopy(embedder.head).train()
    optimizer = torch.optim.Adam(model.library.parameters(), lr=lr)
    targets_t = F.normalize(torch.from_numpy(targets.astype(np.float32)), dim=-1)
    for epoch in range(epochs):
        order = torch.randperm(len(features))
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            with torch.no_grad():
                regions = model.image_side(torch.from_numpy(features[rows.numpy()].astype(np.float32)))
            images = model.library(regions)
            loss = info_nce(images, targets_t[rows], torch.arange(len(rows)), model.library.log_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        log(f"epoch {epoch + 1}/{epochs}: contrastive loss {total / len(order):.3f}")
    return model.eval()


def adapt(model: str | Path, library: str | Path, output: str | Path, epochs: int = 3, lr: float = 1e-4,
          batch_size: int = 64, max_photos: int = MAX_PHOTOS, encoder: SentenceEncoder | None = None,
          log: Callable[[str], None] = print) -> int:
    """Write `output`: `model` with a library head fitted to the photos of `library` (module docstring), the
    pseudo-captions embedded by `encoder` (default: MiniLM, the datastore's). Returns the number of photos it
    learned from."""
    if Path(output).resolve() == Path(model).resolve():
        raise ValueError(f"captioner adapt: --output {output} is the model itself; write a new folder")
    paths = expand_inputs([str(library)])
    if not paths:
        raise ValueError(f"captioner adapt: no photos in {library}")
    if len(paths) > max_photos:  # evenly spread over the library, not its first folders
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_photos).round().astype(int)]
        log(f"using {max_photos} of the library's photos, evenly spread (--max-photos)")
    if encoder is None:  # before the long part: a missing extra fails now, saying how to install it
        from .sentences import load_sentence_encoder
        encoder = load_sentence_encoder()
    captioner = Captioner.from_pretrained(model, device="cpu")
    features, texts, failed, unfamiliar = pseudo_captions(captioner, paths, log=log)
    log(f"{len(texts)} pseudo-captions, e.g. " + "; ".join(f'"{t}"' for t in texts[:3])
        + (f" ({len(failed)} unreadable photos left out)" if failed else ""))
    log(f"the familiarity check calls {unfamiliar} of these {len(texts)} photos unfamiliar: the library head will "
        "serve photos like those" + ("" if unfamiliar else "; with none, the adapted model will caption such a "
                                      "library as the model does"))
    assert captioner.embedder is not None  # pseudo_captions refused a model without one
    embedder = fit_library_head(captioner.embedder, features, encoder(texts), epochs, lr, batch_size, log=log)
    add_retrieval(model, embedder, output=output)  # everything else copied as it is
    log(f"{output}: {model} with image vectors fitted to {len(texts)} photos of {library}, for the photos its "
        "familiarity check calls unfamiliar; the others keep the model's own")
    return len(texts)

