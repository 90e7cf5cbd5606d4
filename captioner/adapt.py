"""`captioner adapt LIBRARY --output MODEL`: a retrieval model's image vectors fitted to a photo library that
has no captions, by self-training on pseudo-captions.

For each photo the model retrieves its consensus.VOTERS captions from its datastore (image vector and concept words,
as `caption` does), and the one the others agree with most (consensus.py) becomes its pseudo-caption. The
image embedder (retrieval.safetensors), whose vectors choose what is retrieved, is then trained further with
its contrastive loss (contrastive.info_nce) to put each photo next to its pseudo-caption's MiniLM vector, so
photos like the library's find captions like the ones the vote chose. The decoder, its vocabulary and the
datastore are copied as they are; the new model captions by consensus by default, where the adaptation
shows (docs/RESULTS.md, "Adapting to a library"). The self-training of pseudo-labels follows PS-NOC-style
semi-supervised captioning; only the small embedder trains, on features computed once.
"""
from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .atomic import replace_folder, whole_version
from .consensus import rerank
from .contrastive import info_nce
from .data import ImageError, expand_inputs, load_image
from .models.embedder import ImageEmbedder
from .models.files import RETRIEVAL_FILE, read_model_json, retrieval_bytes, write_model_json
from .pipeline import Captioner
from .sentences import SentenceEncoder

MAX_PHOTOS = 5000  # photos used at most, evenly spread: their features stay in memory (49 x 1280 float16 each)


@torch.inference_mode()
def pseudo_captions(captioner: Captioner, paths: list[Path], batch_size: int = 32,
                    log: Callable[[str], None] = print) -> tuple[np.ndarray, list[str], list[Path]]:
    """Each readable photo's encoder features (N, L, C) float16 and pseudo-caption, and the photos that could
    not be read (reported, left out)."""
    store = captioner.datastore
    if store is None or captioner.embedder is None:
        raise ValueError(f"{captioner.path}: adapt needs a retrieval model (a datastore and retrieval.safetensors)")
    opts = captioner.options(consensus=True)  # retrieval as `caption --consensus` does it, voters included
    features, texts, failed = [], [], []
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
    if not texts:
        raise ValueError("captioner adapt: no readable photo in the library")
    return np.concatenate(features), texts, failed


def fit_embedder(embedder: ImageEmbedder, features: np.ndarray, targets: np.ndarray, epochs: int, lr: float,
                 batch_size: int, seed: int = 0, log: Callable[[str], None] = print) -> ImageEmbedder:
    """A copy of `embedder` trained with InfoNCE on (features (N, L, C), unit target vectors (N, D)) pairs."""
    torch.manual_seed(seed)
    model = copy.deepcopy(embedder).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    targets_t = F.normalize(torch.from_numpy(targets.astype(np.float32)), dim=-1)
    for epoch in range(epochs):
        order = torch.randperm(len(features))
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            images = model(torch.from_numpy(features[rows.numpy()].astype(np.float32)))
            loss = info_nce(images, targets_t[rows], torch.arange(len(rows)), model.head.log_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        log(f"epoch {epoch + 1}/{epochs}: contrastive loss {total / len(order):.3f}")
    return model.eval()


def adapt(model: str | Path, library: str | Path, output: str | Path, epochs: int = 3, lr: float = 1e-4,
          batch_size: int = 64, max_photos: int = MAX_PHOTOS, encoder: SentenceEncoder | None = None,
          log: Callable[[str], None] = print) -> int:
    """Write `output`: `model` with its image embedder fitted to the photos of `library` (module docstring),
    the pseudo-captions embedded by `encoder` (default: MiniLM, the datastore's). Returns the number of
    photos it learned from."""
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
    features, texts, failed = pseudo_captions(captioner, paths, log=log)
    log(f"{len(texts)} pseudo-captions, e.g. " + "; ".join(f'"{t}"' for t in texts[:3])
        + (f" ({len(failed)} unreadable photos left out)" if failed else ""))
    assert captioner.embedder is not None  # pseudo_captions refused a model without one
    embedder = fit_embedder(captioner.embedder, features, encoder(texts), epochs, lr, batch_size, log=log)
    write_adapted(Path(model), output, embedder)
    log(f"{output}: {model} with image vectors fitted to {len(texts)} photos of {library}; it captions by "
        "consensus by default (--no-consensus: the decoder's best)")
    return len(texts)


def write_adapted(model: Path, output: str | Path, embedder: ImageEmbedder) -> None:
    """`model`'s folder copied file for file (weights, vocabulary, datastore) into `output`, with the fitted
    embedder as its retrieval file and consensus on by default."""
    source = whole_version(model)
    meta = read_model_json(source)
    meta["decoding"] = {**meta["decoding"], "consensus": True}

    def write(folder: Path) -> None:
        shutil.copytree(source, folder, dirs_exist_ok=True)
        write_model_json(folder, meta)
        (folder / RETRIEVAL_FILE).write_bytes(retrieval_bytes(embedder))

    replace_folder(output, write)
