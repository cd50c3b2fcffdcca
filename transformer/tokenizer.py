"""Shared source-target BPE vocabulary (section 5.1), a thin wrapper around SentencePiece.

The model is trained once on a seeded sample of both sides of the training text and stored in
the work directory as `vocab.model`, with `vocab.json` recording what it was trained for, so a
run that resumes, evaluates or translates reads the very same vocabulary.

Ids: PAD_ID = 0 (also the decoder's start symbol; there is no BOS), EOS_ID = 1, UNK_ID = 2.
Normalization is 'identity' and extra whitespace is kept, so raw text round-trips through
encode/decode; with byte fallback (vocabularies of BYTE_FALLBACK_MIN_VOCAB pieces or more)
characters unseen in training round-trip too instead of becoming UNK.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from typing import Callable, Iterable, Sequence

from absl import logging
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

MODEL_FILE = 'vocab.model'
META_FILE = 'vocab.json'
# Byte fallback reserves 256 pieces; below this size it would crowd out the real subwords
# (the demo's vocabulary has 256 pieces in all).
BYTE_FALLBACK_MIN_VOCAB = 1024
# Fields of vocab.json that must agree with the config for a stored vocabulary to be reused.
_CHECKED_FIELDS = ('vocab_size', 'source_lang', 'target_lang')


class Tokenizer:
    """Encodes text to ids and back with a SentencePiece model."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path  # directory the model was loaded from, if any

    @property
    def vocab_size(self) -> int:
        """Number of pieces (can be below config.vocab_size for a tiny training text)."""
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts at once (SentencePiece threads the work); no EOS."""
        return self._sp.encode(list(texts), num_threads=2)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, stopping at the first EOS and skipping PAD."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i != PAD_ID:
                kept.append(i)
        return self._sp.decode(kept)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The piece string of each id (for attention plots)."""
        return [self._sp.id_to_piece(int(i)) for i in ids]


def _metadata(config) -> dict:
    return dict(vocab_size=int(config.vocab_size), source_lang=config.source_lang,
                target_lang=config.target_lang)


def _atomic_write(path: str, data: bytes) -> None:
    """Writes via a temporary file and os.replace, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix='.tmp-')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def train(texts: Iterable[str], vocab_size: int) -> bytes:
    """Trains a BPE model on `texts` and returns the serialized model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type='bpe',
        vocab_size=vocab_size,
        character_coverage=1.0,
        # Raw text must round-trip: no NFKC, no whitespace squeezing.
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        byte_fallback=vocab_size >= BYTE_FALLBACK_MIN_VOCAB,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        # A small corpus may not support the requested size; take what it gives.
        hard_vocab_limit=False,
        # We sample ourselves (seeded); keep every sentence handed over.
        input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def load(workdir: str) -> Tokenizer:
    """Loads the vocabulary stored in `workdir` (for evaluate/translate)."""
    path = os.path.join(workdir, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f'no vocabulary at {path}; train a model in this workdir first')
    with open(path, 'rb') as f:
        return Tokenizer(f.read(), path=workdir)


def load_or_train(config, workdir: str,
                  text_iter_fn: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """Returns the vocabulary of `workdir`, training and storing it first if absent.

    Args:
      config: the run config (uses vocab_size, source_lang, target_lang, data.*).
      workdir: directory holding vocab.model and vocab.json.
      text_iter_fn: returns the sentences to train on; default: a seeded sample of
        config.data.vocab_sample_sentences sentences of each side of the training split.

    Raises:
      ValueError: a stored vocabulary was made for a different config.
    """
    model_path = os.path.join(workdir, MODEL_FILE)
    meta_path = os.path.join(workdir, META_FILE)
    want = _metadata(config)
    if os.path.exists(model_path):
        have = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                have = json.load(f)
        bad = [f'{k}: stored {have.get(k)!r} vs config {want[k]!r}'
               for k in _CHECKED_FIELDS if have.get(k) != want[k]]
        if bad:
            raise ValueError(f'vocabulary {model_path} was made for another config ({"; ".join(bad)}); '
                             'use a new workdir or delete the vocabulary')
        return load(workdir)

    if text_iter_fn is None:
        from transformer import data  # local import: data imports this module
        text_iter_fn = lambda: data.vocab_text(config)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    proto = train(text_iter_fn(), config.vocab_size)
    seconds = time.time() - start
    tokenizer = Tokenizer(proto, path=workdir)
    logging.info('Trained a %d-piece BPE vocabulary in %.1f s', tokenizer.vocab_size, seconds)
    meta = dict(want, pieces=tokenizer.vocab_size, model_type='bpe',
                train_seconds=round(seconds, 2), data_source=config.data.source)
    # Metadata first: vocab.model is what marks the vocabulary as present.
    _atomic_write(meta_path, (json.dumps(meta, indent=2) + '\n').encode())
    _atomic_write(model_path, proto)
    return tokenizer
