"""Word alignments from the encoder-decoder attention, and their error rate.

`translate --alignment` writes, after each hypothesis, its hard alignment to the source in the
Moses / fast_align format: `i-j` pairs, source word i aligned to target word j, words being the
whitespace-separated words of the source line and of the hypothesis (0-based).

How an alignment is read off the model:

* The model's own teacher-forced pass over (source, hypothesis), its attention weights sown
  and captured (`model.attention_weights`, the pass the attention plot uses:
  `forward_with_attention`), gives the encoder-decoder attention of every layer and head.
  One layer's, averaged over its heads (and over an ensemble's members), is the soft
  alignment.
* The layer is the penultimate decoder layer by default (the first of a 2-layer decoder):
  Garg et al. (2019, "Jointly Learning to Align and Translate with Transformer Models") found
  the penultimate layer's head-averaged attention the best aligner of a Transformer's layers,
  the last one attending more to what predicts the next word than to what it translates.
  `--alignment_layer` chooses another.
* Target piece t is aligned with the source piece that the attention of the decoder position
  predicting it weighs most (as fairseq's --print-alignment does). The row of the next
  position, which reads piece t as its input, aligned worse on the demo (AER 0.32 against
  0.24 in layer 0, 0.36 against 0.19 in layer 1). EOS on either side is left out.
* Pieces become words as fairseq's and Garg et al.'s evaluations do: a source word and a target
  word are aligned when any of their pieces are (a SentencePiece piece that starts with '▁'
  starts a word).

`alignment_error_rate` is Och and Ney's (2003) AER, for testing and measuring.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from transformer import model as model_lib

WORD_START = '\u2581'  # SentencePiece's whitespace mark


@functools.partial(jax.jit, static_argnums=0)
def forward_with_attention(graphdef, params, inputs, targets):
    """(logits, attention weights of every layer and head) of the model's teacher-forced pass
    (model.attention_weights), compiled apart from any other pass."""
    return model_lib.attention_weights(nnx.merge(graphdef, params), inputs, targets)


@functools.partial(jax.jit, static_argnames=('graphdefs', 'layer'))
def cross_attention(graphdefs, params, inputs, targets, layer: int):
    """[B, T, S]: decoder layer `layer`'s encoder-decoder attention over `inputs` [B, S] for
    `targets` [B, T] (EOS-terminated, PAD-padded), averaged over heads and members."""
    maps = [forward_with_attention(g, p, inputs, targets)[1]['cross'][layer].mean(axis=1)
            for g, p in zip(graphdefs, params)]
    return sum(maps) / len(maps)


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """The decoder layer (0-based) of --alignment_layer `layer`: None is the penultimate (the
    only one of a 1-layer decoder), a negative value counts from the last."""
    if layer is None:
        return max(num_layers - 2, 0)
    if not -num_layers <= layer < num_layers:
        raise ValueError(f'--alignment_layer={layer}: the model has {num_layers} decoder '
                         f'layers (0 to {num_layers - 1}, or -{num_layers} to -1)')
    return layer % num_layers


def piece_words(pieces: list[str]) -> list[int]:
    """The word (0-based) each SentencePiece piece belongs to."""
    word, out = -1, []
    for piece in pieces:
        if piece.startswith(WORD_START) or word < 0:
            word += 1
        out.append(word)
    return out


def hard_alignment(attention, source_pieces: list[str],
                   target_pieces: list[str]) -> list[tuple[int, int]]:
    """Sorted (source word, target word) pairs from `attention` [T, S] (row t: the decoder
    position that predicts target piece t; columns: source pieces) of a source of
    `source_pieces` and a target of `target_pieces` (EOS left out of both)."""
    if not source_pieces or not target_pieces:
        return []
    attention = np.asarray(attention)
    rows = attention[:len(target_pieces), :len(source_pieces)]
    best = rows.argmax(axis=1)
    src_word, tgt_word = piece_words(source_pieces), piece_words(target_pieces)
    return sorted({(src_word[s], tgt_word[t]) for t, s in enumerate(best)})


def pairs_text(pairs) -> str:
    """'i-j i-j ...' (Moses / fast_align)."""
    return ' '.join(f'{i}-{j}' for i, j in pairs)


def parse_pairs(text: str) -> set[tuple[int, int]]:
    """The pairs of an 'i-j i-j ...' line."""
    return {tuple(int(x) for x in pair.split('-')) for pair in text.split()}


def diagonal(source_words: int, target_words: int) -> set[tuple[int, int]]:
    """The baseline that aligns target word j with source word j * I / J."""
    return {(min(source_words - 1, j * source_words // target_words), j)
            for j in range(target_words)} if source_words and target_words else set()


def alignment_error_rate(hypotheses, sure, possible=None) -> float:
    """Och and Ney's AER over a corpus: 1 - (|A & S| + |A & P|) / (|A| + |S|) summed over
    sentences, for hypothesised alignments A, sure ones S and possible ones P (S when not
    given); each argument a sequence of sets of (i, j)."""
    possible = sure if possible is None else possible
    hits = sum(len(a & s) + len(a & p) for a, s, p in zip(hypotheses, sure, possible))
    total = sum(len(a) + len(s) for a, s in zip(hypotheses, sure))
    return 1.0 - hits / total if total else 0.0
