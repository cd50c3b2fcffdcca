"""Shared source-target BPE vocabulary (section 5.1), a thin wrapper around SentencePiece.

Ids: PAD_ID = 0 (also the decoder's start symbol; there is no BOS), EOS_ID = 1, UNK_ID = 2;
every module takes them from here. Normalization is 'identity' and extra whitespace is kept, so
raw text round-trips through encode/decode; with byte fallback (vocabularies of
BYTE_FALLBACK_MIN_VOCAB pieces or more) characters unseen in training round-trip too instead
of becoming UNK. A lowercasing vocabulary (data.lowercase) maps each character to its Python
lowercase inside the model's normalizer, so whatever encodes with it (training, evaluation,
translation, exported tokenizers) lowercases the same way, and decoded text is lowercase.

This module trains a model on the sentences it is given and loads a stored one; which
sentences, and where the model is stored, is the caller's business (`vocabulary.load_or_train`).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# Byte fallback reserves 256 pieces; below this size it would crowd out the real subwords
# (the demo's vocabulary has 256 pieces in all).
BYTE_FALLBACK_MIN_VOCAB = 1024

# What a trained model records as its trainer's num_threads, whatever it used: the thread
# count changes no piece, but it is stored in the model, and vocab.model's sha256 is the
# run's vocabulary fingerprint; 2 is what every earlier version used and recorded.
_RECORDED_THREADS = 2


def usable_cores() -> int:
    """The CPU cores this process may run on: its CPU affinity (a container's, a job
    scheduler's or taskset's share of the host), else the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


class Tokenizer:
    """Encodes text to ids and back with a SentencePiece model."""

    def __init__(self, model_proto: bytes, threads: int | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.threads = threads or usable_cores()  # encode_batch's threads

    @property
    def vocab_size(self) -> int:
        """Number of pieces (can be below config.vocab_size for a tiny training text)."""
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts at once, on `threads` threads (the same ids for any count); no
        EOS."""
        return self._sp.encode(list(texts), num_threads=self.threads)

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


def lowercase_rules() -> str:
    """SentencePiece normalization rules (TSV of hex code points) mapping every character
    whose Python lowercase differs to that lowercase, and nothing else: identity otherwise,
    unlike SentencePiece's own 'nmt_nfkc_cf' (which applies NFKC as well)."""
    rules = []
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:  # surrogates are no characters
            continue
        lower = char.lower()
        if lower != char:
            rules.append(f'{code:X}\t{" ".join(f"{ord(c):X}" for c in lower)}\n')
    return ''.join(rules)


def train(texts: Iterable[str], vocab_size: int, threads: int | None = None,
          lowercase: bool = False) -> bytes:
    """Trains a BPE model on `texts` on `threads` threads (default: the usable cores) and
    returns the serialized model: the same bytes for any thread count. With `lowercase`, the
    model lowercases what it encodes (and so learns its pieces from lowercased text)."""
    from sentencepiece import sentencepiece_model_pb2  # protobuf: only to train

    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        # Raw text must round-trip: no NFKC, no whitespace squeezing (only lowercasing when
        # asked).
        normalization = {'normalization_rule_name': 'identity'}
        if lowercase:
            rules = os.path.join(tmp, 'lowercase.tsv')
            with open(rules, 'w') as f:
                f.write(lowercase_rules())
            normalization = {'normalization_rule_tsv': rules}
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type='bpe',
            vocab_size=vocab_size,
            character_coverage=1.0,
            **normalization,
            remove_extra_whitespaces=False,
            byte_fallback=vocab_size >= BYTE_FALLBACK_MIN_VOCAB,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            # A small corpus may not support the requested size; take what it gives.
            hard_vocab_limit=False,
            # We sample ourselves (seeded); keep every sentence handed over.
            input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=threads or usable_cores(),
            minloglevel=2,
        )
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    proto.trainer_spec.num_threads = _RECORDED_THREADS
    if lowercase:  # the rules' temporary path would change the fingerprint; the model holds them
        proto.normalizer_spec.ClearField('normalization_rule_tsv')
    return proto.SerializeToString()
