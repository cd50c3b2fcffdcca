"""The run's vocabulary and its life cycle: trained once on the training text (SentencePiece
BPE), stored in the work directory (workdir.VOCAB_MODEL, VOCAB_META), fingerprinted, and
loaded by every program that reads the run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable

from absl import logging

from transformer import checkpoint_info, errors
from transformer import tokenizer as tokenizer_lib
from transformer.errors import FieldError, UsageError
from transformer.workdir import VOCAB_META, VOCAB_MODEL, atomic_write, path

_VOCAB_FIELDS = ('vocab_size', 'source_lang', 'target_lang', 'lowercase')
# What a vocab.json written before a field existed meant by it.
_VOCAB_DEFAULTS = {'lowercase': False}

# The run's vocabulary is fingerprinted (sha256 of vocab.model) in vocab.json and in every
# checkpoint: a missing or changed vocabulary under existing checkpoints is refused, never
# rebuilt, since a new one would map the same ids to other pieces.


def _vocab_metadata(config) -> dict:
    return dict(vocab_size=int(config.vocab_size), source_lang=config.source_lang,
                target_lang=config.target_lang, lowercase=bool(config.data.lowercase))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_fingerprint(workdir: str) -> str:
    """The sha256 of the stored vocabulary file."""
    with open(path(workdir, VOCAB_MODEL), 'rb') as f:
        return _sha256(f.read())


def _vocab_meta(workdir: str) -> dict:
    file = path(workdir, VOCAB_META)
    if not os.path.exists(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f'{file} cannot be read: {errors.reason(e)}') from None


def recorded_fingerprint(workdir: str, infos: list[dict] = ()) -> str | None:
    """The vocabulary fingerprint the run recorded: in its newest checkpoint (`infos`, oldest
    first, as checkpoint.info gives them), else in vocab.json; None if neither has one."""
    for info in reversed(list(infos)):
        recorded = checkpoint_info.parse(info).vocab_sha256
        if recorded:
            return recorded
    return (_vocab_meta_or_none(workdir) or {}).get('sha256')


def load(workdir: str, fingerprint: str | None = None) -> tokenizer_lib.Tokenizer:
    """The vocabulary stored in `workdir`; with `fingerprint`, it must be that very file."""
    file = path(workdir, VOCAB_MODEL)
    if not os.path.exists(file):
        raise UsageError(f'no vocabulary at {file}; train a model in this workdir first')
    with open(file, 'rb') as f:
        proto = f.read()
    if fingerprint is not None and _sha256(proto) != fingerprint:
        raise UsageError(f'{file} is not the vocabulary this run was trained with (sha256 '
                         f'{_sha256(proto)[:12]}..., the run recorded {fingerprint[:12]}...): '
                         'restore the original file or use a new --workdir')
    try:
        return tokenizer_lib.Tokenizer(proto)
    except Exception as e:  # noqa: BLE001 - SentencePiece raises bare RuntimeErrors
        raise UsageError(f'{file} is not a SentencePiece model ({errors.reason(e)})') from None


def load_or_train(config, workdir: str, texts: Callable[[], Iterable[str]],
               fingerprint: str | None = None,
               steps: list[int] = ()) -> tokenizer_lib.Tokenizer:
    """The run's vocabulary: the one stored in `workdir`, or trained on `texts()` and stored.

    `steps` are the run's checkpoints and `fingerprint` what they recorded (see
    recorded_fingerprint): under checkpoints a missing or changed vocabulary is refused, and a
    missing or unreadable vocab.json is written anew from the vocabulary they recorded. A
    stored vocabulary made for another vocab_size or language pair is refused too, and so is
    a vocab_size that the training text cannot fill (SentencePiece stops short of it).
    """
    model_file, meta_file = path(workdir, VOCAB_MODEL), path(workdir, VOCAB_META)
    want = _vocab_metadata(config)
    if os.path.exists(model_file):
        have = _vocab_meta_or_none(workdir)
        if have is None and steps and fingerprint:
            tokenizer = load(workdir, fingerprint)  # the very file they recorded
            _write_vocab_meta(config, workdir, tokenizer, fingerprint)
            errors.warn(f'{meta_file} was missing or unreadable: wrote it anew for {model_file}, '
                        f'the vocabulary checkpoint {steps[-1]} was trained with')
            return tokenizer
        if have is None:
            raise UsageError(f'{meta_file} is missing or unreadable, so what {model_file} was '
                             f'made for is unknown; nothing was trained with it yet: delete '
                             f'{model_file} (a new one is trained)')
        stored = {k: have.get(k, _VOCAB_DEFAULTS.get(k)) for k in _VOCAB_FIELDS}
        bad = [f'{k}: stored {stored[k]!r} vs config {want[k]!r}'
               for k in _VOCAB_FIELDS if stored[k] != want[k]]
        if bad:
            remedy = (f'use a new --workdir (checkpoints {", ".join(map(str, steps))} were '
                      'trained with it)' if steps else 'use a new workdir or delete the '
                      'vocabulary')
            raise UsageError(f'vocabulary {model_file} was made for another config '
                             f'({"; ".join(bad)}); {remedy}')
        return load(workdir, fingerprint)
    if steps:
        raise UsageError(f'{model_file} is missing, but {workdir} holds checkpoints (steps '
                         f'{", ".join(map(str, steps))}) trained with it; a new vocabulary would '
                         'not match them: restore the file or use a new --workdir')

    sentences = iter(texts())
    first = next(sentences, None)
    if first is None:
        raise UsageError(f'no text to train the vocabulary on: the training data of '
                         f'data.source={config.data.source!r} holds only blank lines')
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    proto = tokenizer_lib.train(itertools.chain([first], sentences), config.vocab_size,
                                lowercase=bool(config.data.lowercase))
    seconds = time.time() - start
    tokenizer = tokenizer_lib.Tokenizer(proto)
    logging.info('Trained a %d-piece BPE vocabulary in %.1f s', tokenizer.vocab_size, seconds)
    if tokenizer.vocab_size < config.vocab_size:
        # The embedding would have rows no id ever uses, and label smoothing would spread
        # probability over them.
        raise FieldError('vocab_size', config.vocab_size,
                         f'is more than the training text gives: SentencePiece learned '
                         f'{tokenizer.vocab_size} pieces from data.vocab_sample_sentences='
                         f'{config.data.vocab_sample_sentences} sentences; set '
                         f'--config.vocab_size={tokenizer.vocab_size} or less (nothing was '
                         'stored)')
    # Metadata first: vocab.model is what marks the vocabulary as present.
    _write_vocab_meta(config, workdir, tokenizer, _sha256(proto), train_seconds=seconds)
    atomic_write(model_file, proto, 'the vocabulary')
    return tokenizer


def _vocab_meta_or_none(workdir: str) -> dict | None:
    """vocab.json, or None when it is missing or unreadable."""
    try:
        return _vocab_meta(workdir) or None
    except UsageError:
        return None


def _write_vocab_meta(config, workdir: str, tokenizer, sha256: str, **extra) -> None:
    meta = dict(_vocab_metadata(config), pieces=tokenizer.vocab_size, model_type='bpe',
                sha256=sha256, data_source=config.data.source,
                **{k: round(v, 2) for k, v in extra.items()})
    file = path(workdir, VOCAB_META)
    atomic_write(file, (json.dumps(meta, indent=2) + '\n').encode(), 'the vocabulary')


# -- the training process's lock --------------------------------------------------------------
