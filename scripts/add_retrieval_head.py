"""Ship a contrastive pretraining's image side and pooled head with a model: write them into the model
folder as retrieval.safetensors (float16), so bulk captioning stores each photo's vector and `captioner
search` ranks by it as well as by the captions.

    python scripts/add_retrieval_head.py --run runs/flickr8k-contrastive --model captioner/models/flickr8k-lite0 \\
        --prepared prepared/flickr8k

A script, not a `captioner` command: it is a step of making a release (once per shipped model, from a
training run on the maintainer's machine), not something a user of a model does. The head must have been
trained on the features the model reads (refused otherwise); with --prepared it prints the dev split's
retrieval recall in float32 and as stored (float16), which should agree within 0.1.
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from captioner.contrastive import (
    format_recall,
    load_pretrained,
    sentence_embeddings,
    split_recall,
)
from captioner.features import open_prepared
from captioner.models import check_encoder_spec, load_model
from captioner.models.embedder import ImageEmbedder
from captioner.models.files import add_retrieval


def embedder_of(run: str) -> tuple[ImageEmbedder, dict]:
    """The run's image side and head as one ImageEmbedder; an image side that is not a Linear + ReLU (the
    attention families') is refused, since the model folder stores only that shape."""
    side, head, result = load_pretrained(run, torch.device("cpu"))
    state = side.state_dict()
    if set(state) != {"0.weight", "0.bias"} or not isinstance(side[1], torch.nn.ReLU):
        raise SystemExit(f"{run}: its image side is not Linear + ReLU ({type(side).__name__}); only that is shipped")
    region_dim, feature_dim = state["0.weight"].shape
    embedder = ImageEmbedder(feature_dim, region_dim, head.proj.out_features)
    embedder.image_side.load_state_dict(state)
    embedder.head.load_state_dict(head.state_dict())
    return embedder.eval(), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True,
                        help="a run folder trained with --pretrain contrastive (its pretrain.pt)")
    parser.add_argument("--model", default="captioner/models/flickr8k-lite0")
    parser.add_argument("--prepared", help="the prepared folder the run trained on: check float16 against float32")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    embedder, result = embedder_of(args.run)
    check_encoder_spec(result["encoder_spec"], load_model(args.model).features_spec,
                       f"{args.run} (against {args.model})")
    if args.prepared:
        prepared = open_prepared(args.prepared)
        sentences = torch.from_numpy(sentence_embeddings(prepared, result["sentence_model"]).astype(np.float32))
        stored = copy.deepcopy(embedder)
        for p in stored.parameters():
            p.copy_(p.half().float())
        for name, e in (("float32", embedder), ("float16 (as stored)", stored)):
            print(f"dev split, {name}:\n" + format_recall(split_recall(e.image_side, e.head, prepared, sentences, "val",
                                                                        torch.device("cpu"))))
    add_retrieval(args.model, embedder, result["sentence_model"])
    print(f"{args.model}: retrieval.safetensors from {args.run} (pretraining epoch {result['best_epoch']})")


if __name__ == "__main__":
    main()
