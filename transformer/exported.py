"""Decoding and scoring with an exported model, through the target library alone: what the
tests check an export by and what benchmarks/export.py times. Text is tokenized with the
SentencePiece model the export carries (ids + EOS on the source side, as in training);
nothing of the project's model code runs.

Length bounds follow the project's search (section 6.1): at most source length (EOS counted) +
max_extra_length output tokens, EOS included, at most max_position. CTranslate2 and
Transformers take one bound per call, so `exact_bounds` decodes sentences of equal bounds
together (for identical output); otherwise each batch gets its longest sentence's bound.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from transformer.exporting import CT2_SENTENCEPIECE
from transformer.tokenizer import EOS_ID, PAD_ID

# -- shared ---------------------------------------------------------------------------------------


def sentencepiece(path: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=path)


def _bound(source_ids: list[int], max_extra_length: int, max_position: int) -> int:
    """Output tokens allowed, EOS included (search.max_output_lengths)."""
    return max(1, min(len(source_ids) + 1 + max_extra_length, max_position))


def _batches(order: list[int], bounds: list[int], batch_size: int, exact_bounds: bool):
    """Batches of indices (sorted by length beforehand) with their bound."""
    if exact_bounds:
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(bounds[i], []).append(i)
        for bound, members in sorted(groups.items()):
            for start in range(0, len(members), batch_size):
                yield members[start:start + batch_size], bound
        return
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        yield batch, max(bounds[i] for i in batch)


# -- CTranslate2 ------------------------------------------------------------------------------


def ct2_load(directory: str, threads: int = 0, compute_type: str = 'default'):
    """(ctranslate2.Translator, the SentencePiece model copied beside it)."""
    import ctranslate2

    translator = ctranslate2.Translator(directory, device='cpu', compute_type=compute_type,
                                        intra_threads=threads)
    return translator, sentencepiece(os.path.join(directory, CT2_SENTENCEPIECE))


def ct2_score(translator, sp, pairs: Sequence[tuple[str, str]],
              batch_size: int = 64) -> list[float]:
    """log p(target | source) of each pair, EOS included (teacher forcing): `score`'s number."""
    sources = sp.encode([s for s, _ in pairs], out_type=str)
    targets = sp.encode([t for _, t in pairs], out_type=str)
    results = translator.score_batch(sources, targets, max_batch_size=batch_size)
    return [float(sum(r.log_probs)) for r in results]


def ct2_translate(translator, sp, sources: Sequence[str], *, beam_size: int = 4,
                  alpha: float = 0.6, max_extra_length: int = 50, max_position: int = 1024,
                  batch_size: int = 64, exact_bounds: bool = False) -> list[str]:
    """Translations of `sources` with CTranslate2's beam search (greedy for beam 1); its length
    penalty divides log-probabilities by length ** alpha. PAD, the start symbol, is suppressed."""
    pieces = sp.encode(list(sources), out_type=str)
    bounds = [_bound(p, max_extra_length, max_position) for p in pieces]
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
    out = [''] * len(pieces)
    pad = sp.id_to_piece(PAD_ID)
    for batch, bound in _batches(order, bounds, batch_size, exact_bounds):
        # bound - 1 tokens before EOS: the project forces EOS at the bound, CTranslate2 stops.
        results = translator.translate_batch(
            [pieces[i] for i in batch], beam_size=beam_size, length_penalty=alpha,
            max_decoding_length=bound - 1, min_decoding_length=0, max_input_length=0,
            suppress_sequences=[[pad]],
            max_batch_size=batch_size)
        for i, result in zip(batch, results):
            out[i] = sp.decode_pieces(result.hypotheses[0])
    return out


# -- Hugging Face -------------------------------------------------------------------------------


def hf_load(directory: str, threads: int = 0):
    """(MarianMTModel in eval mode, the SentencePiece model the export carries)."""
    import torch
    from transformers import MarianMTModel

    if threads:
        torch.set_num_threads(threads)
    model = MarianMTModel.from_pretrained(directory).eval()
    return model, sentencepiece(os.path.join(directory, 'source.spm'))


def _pad_rows(rows: list[list[int]]):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids


def hf_score(model, sp, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[float]:
    """log p(target | source) of each pair under the MarianMTModel's forward pass."""
    import torch

    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        sources = [ids + [EOS_ID] for ids in sp.encode([s for s, _ in chunk])]
        targets = [ids + [EOS_ID] for ids in sp.encode([t for _, t in chunk])]
        x, y = _pad_rows(sources), _pad_rows(targets)
        start_column = torch.full((len(chunk), 1), PAD_ID, dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=x != PAD_ID,
                           decoder_input_ids=torch.cat([start_column, y[:, :-1]], 1)).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None])[..., 0]
        lengths = [len(t) for t in targets]
        for row, n in enumerate(lengths):
            out.append(float(logp[row, :n].sum()))
    return out


def hf_translate(model, sp, sources: Sequence[str], *, beam_size: int = 4, alpha: float = 0.6,
                 max_extra_length: int = 50, max_position: int = 1024, batch_size: int = 64,
                 exact_bounds: bool = False) -> list[str]:
    """Translations with `generate` (the generation config's PAD ban and forced EOS); its
    length penalty divides by length ** alpha."""
    import torch

    ids = [r + [EOS_ID] for r in sp.encode(list(sources))]
    bounds = [_bound(r[:-1], max_extra_length, max_position) for r in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [''] * len(ids)
    for batch, bound in _batches(order, bounds, batch_size, exact_bounds):
        x = _pad_rows([ids[i] for i in batch])
        with torch.no_grad():
            beam = dict(num_beams=beam_size, length_penalty=alpha) if beam_size > 1 else \
                dict(num_beams=1)
            generated = model.generate(input_ids=x, attention_mask=x != PAD_ID, do_sample=False,
                                       max_length=bound + 1, **beam)  # + the start symbol
        for i, row in zip(batch, generated.tolist()):
            kept = []
            for token in row[1:]:
                if token == EOS_ID:
                    break
                if token != PAD_ID:
                    kept.append(token)
            out[i] = sp.decode(kept)
    return out


def bleu_of(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Detokenized sacreBLEU, as evaluate reports it."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def logprob_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest absolute difference between two lists of log-probabilities."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if len(a) else 0.0
