"""Beam search and greedy decoding over the key/value cache (section 6.1).

The paper's settings: beam 4, length penalty alpha = 0.6, at most input length + 50 output
tokens, stopping early once no live hypothesis can win. The length penalty is GNMT's (Wu et al.
2016), as in tensor2tensor, the paper's code: a hypothesis of `n` tokens (its EOS counted) with
log-probability `logp` scores `logp / ((5 + n) / 6) ** alpha`.

How the search runs, per batch of sentences:

* The encoder runs once per sentence; the encoder-decoder keys and values are projected once and
  repeated for the beams once, never per step.
* Each step feeds one token per hypothesis through `Transformer.decode_step`, which writes its
  key and value into a fixed-size self-attention cache; a step never re-runs the prefix, so its
  cost does not depend on how many tokens came before. Beam reordering gathers only the
  self-attention cache along the beam axis.
* Candidates are chosen as in tensor2tensor's beam search: the 2K best extensions of the K live
  hypotheses; those ending in EOS join the K best finished hypotheses (scored with the length
  penalty), the K best of the others stay live.
* Each sentence may produce at most `source length + max_extra_length` tokens (source length
  counts its EOS); at that length only EOS is allowed, so every sentence finishes. PAD, the
  decoder's start symbol, is never produced.
* A `lax.while_loop` stops as soon as, for every sentence, no live hypothesis can beat the best
  finished one even with the largest length bonus still open to it (the step cost is flat, so
  stopping early saves time in proportion).

`beam_size == 1` is greedy decoding, as in tensor2tensor (a 1-wide beam search with 2
candidates per step could return a shorter hypothesis that greedy never picks).

Everything is jitted as one pure function of (graphdef, parameters, inputs); sharding follows
the inputs, so a batch laid out with `sharding.batch_sharding(mesh)` decodes across the mesh.

Above the search: `Decoder` pads batches to a few shapes and keeps them compiled,
`translate_split` decodes a whole split (train's greedy BLEU, evaluate) and `Translator` turns
lines of text into translations (translate).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from transformer import batching, sharding
from transformer.errors import UsageError
from transformer.model import segments_and_positions
from transformer.tokenizer import EOS_ID, PAD_ID  # PAD is the start symbol; never produced

# A large finite stand-in for -inf: sums and differences of it stay finite (no NaN).
NEG_INF = -1.0e7


def length_penalty(length, alpha: float):
    """GNMT length penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def source_lengths(inputs) -> jax.Array:
    """Non-PAD tokens per row (EOS included); 0 for padding rows."""
    return jnp.sum(inputs != PAD_ID, axis=1).astype(jnp.int32)


def max_output_lengths(inputs, max_extra_length: int, bound: int) -> jax.Array:
    """Per sentence: source length + max_extra_length tokens, at most `bound`.

    A padding row (no source tokens) gets 1: it emits EOS at once and never holds up the loop.
    """
    src = source_lengths(inputs)
    return jnp.where(src > 0, jnp.minimum(src + max_extra_length, bound), 1)


def output_bound(src_len: int, max_extra_length: int, max_position: int) -> int:
    """The static array length T of the outputs for a batch with source arrays of `src_len`."""
    return max(1, min(src_len + max_extra_length, max_position))


def _step_log_probs(logits, length, max_len):
    """log_softmax of the logits, with PAD forbidden and only EOS allowed at max_len.

    `logits` [N, V]; `length` the 1-based length the new token gives; `max_len` [N]. The
    forbidden tokens get NEG_INF after the softmax, so allowed tokens keep the model's own
    log-probabilities (no renormalisation).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = jnp.arange(logits.shape[-1])
    forbidden = (vocab == PAD_ID)[None, :] | (
        (length >= max_len)[:, None] & (vocab != EOS_ID)[None, :])
    return jnp.where(forbidden, NEG_INF, logp)


def _encode_and_cache(model, inputs, bound: int, repeat: int):
    """Runs the encoder once and builds the decoding cache, repeated `repeat` times per row."""
    segmentation, _ = segments_and_positions(inputs)
    encoded = model.encode(inputs, segmentation)
    cache = model.init_cache(encoded, bound)
    if repeat > 1:  # beams of one sentence are adjacent rows: row b * K + k (cache axis 1)
        cache = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=1), cache)
        segmentation = jnp.repeat(segmentation, repeat, axis=0)
    return cache, segmentation


# -- greedy ------------------------------------------------------------------------------------


class _GreedyState(NamedTuple):
    index: jax.Array  # tokens generated so far
    tokens: jax.Array  # [B, T + 1], column 0 the start symbol
    log_prob: jax.Array  # [B]
    done: jax.Array  # [B]
    cache: list  # the self-attention cache


def _greedy(graphdef, params, inputs, max_extra_length: int):
    model = nnx.merge(graphdef, params)
    batch, src_len = inputs.shape
    bound = output_bound(src_len, max_extra_length, model.cfg.max_position)
    max_len = max_output_lengths(inputs, max_extra_length, bound)
    cache, segmentation = _encode_and_cache(model, inputs, bound, 1)
    cross = cache['cross']

    def cond(s: _GreedyState):
        return (s.index < bound) & ~jnp.all(s.done)

    def body(s: _GreedyState):
        previous = jax.lax.dynamic_index_in_dim(s.tokens, s.index, axis=1, keepdims=False)
        logits, new_cache = model.decode_step(
            previous, s.index, {'self': s.cache, 'cross': cross}, segmentation)
        logp = _step_log_probs(logits, s.index + 1, max_len)
        token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        token_logp = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
        token = jnp.where(s.done, PAD_ID, token)
        log_prob = s.log_prob + jnp.where(s.done, 0.0, token_logp)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.index + 1, 1)
        return _GreedyState(s.index + 1, tokens, log_prob, s.done | (token == EOS_ID),
                            new_cache['self'])

    init = _GreedyState(jnp.int32(0), jnp.full((batch, bound + 1), PAD_ID, jnp.int32),
                        jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), bool),
                        cache['self'])
    final = jax.lax.while_loop(cond, body, init)
    return final.tokens[:, 1:], final.log_prob, final.index


# -- beam search -------------------------------------------------------------------------------


class _BeamState(NamedTuple):
    index: jax.Array  # tokens generated so far (the same for every hypothesis)
    live_seqs: jax.Array  # [B, K, T + 1], column 0 the start symbol
    live_log_probs: jax.Array  # [B, K]; NEG_INF for empty slots
    finished_seqs: jax.Array  # [B, K, T + 1]
    finished_scores: jax.Array  # [B, K]; length-penalised; NEG_INF for empty slots
    cache: list  # the self-attention cache, rows b * K + k


def _gather_beams(x, beam_index):
    """x [B, K', ...] -> [B, K, ...] picking x[b, beam_index[b, k]]."""
    index = beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _gather_cache(cache, beam_index, beam_size):
    """Reorders cache rows [layers, B * K, ...]: row b * K + k becomes row
    b * K + beam_index[b, k], in every layer (a gather of whole rows)."""
    batch = beam_index.shape[0]
    rows = (jnp.arange(batch)[:, None] * beam_size + beam_index).reshape(-1)
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=1, mode='clip'), cache)


def _beam_search(graphdef, params, inputs, beam_size: int, alpha: float,
                 max_extra_length: int, early_stop: bool = True):
    model = nnx.merge(graphdef, params)
    batch, src_len = inputs.shape
    K = beam_size
    bound = output_bound(src_len, max_extra_length, model.cfg.max_position)
    max_len = max_output_lengths(inputs, max_extra_length, bound)  # [B]
    cache, segmentation = _encode_and_cache(model, inputs, bound, K)
    cross = cache['cross']
    # The largest length penalty open to a live hypothesis (alpha >= 0: at its max length).
    final_penalty = length_penalty(max_len, alpha)

    def row_done(s: _BeamState):
        """[B] True where no live hypothesis can still beat the best finished one."""
        best_live = jnp.max(s.live_log_probs, axis=1)
        # Log-probabilities only fall as hypotheses grow; the score divides by a penalty of
        # at most max(penalty at the next length, penalty at the max length).
        penalty = jnp.maximum(length_penalty(s.index + 1, alpha), final_penalty)
        best_possible = best_live / penalty
        best_finished = jnp.max(s.finished_scores, axis=1)
        no_live = best_live <= NEG_INF / 2
        out_of_length = s.index >= max_len
        if not early_stop:
            return out_of_length | no_live
        return out_of_length | no_live | (best_finished >= best_possible)

    def cond(s: _BeamState):
        return (s.index < bound) & ~jnp.all(row_done(s))

    def body(s: _BeamState):
        previous = jax.lax.dynamic_index_in_dim(s.live_seqs, s.index, axis=2, keepdims=False)
        logits, new_cache = model.decode_step(
            previous.reshape(-1), s.index, {'self': s.cache, 'cross': cross}, segmentation)
        vocab = logits.shape[-1]
        length = s.index + 1
        logp = _step_log_probs(logits, length, jnp.repeat(max_len, K))
        logp = logp.reshape(batch, K, vocab)
        candidates = s.live_log_probs[:, :, None] + logp
        # An empty live slot or a forbidden token yields no candidate.
        valid = (s.live_log_probs[:, :, None] > NEG_INF / 2) & (logp > NEG_INF / 2)
        candidates = jnp.where(valid, candidates, NEG_INF).reshape(batch, K * vocab)
        # 2K candidates: even if K of them end in EOS, K remain to stay live.
        top_log_probs, top_index = jax.lax.top_k(candidates, 2 * K)
        top_beam = top_index // vocab
        top_token = (top_index % vocab).astype(jnp.int32)
        top_valid = top_log_probs > NEG_INF / 2
        top_seqs = _gather_beams(s.live_seqs, top_beam)
        top_seqs = jax.lax.dynamic_update_slice_in_dim(
            top_seqs, top_token[:, :, None], length, axis=2)
        ends = (top_token == EOS_ID) & top_valid

        # Live: the K best candidates that do not end in EOS.
        live_scores = jnp.where(ends | ~top_valid, NEG_INF, top_log_probs)
        live_log_probs, live_pick = jax.lax.top_k(live_scores, K)
        live_seqs = _gather_beams(top_seqs, live_pick)
        live_cache = _gather_cache(new_cache['self'], _gather_beams(top_beam, live_pick), K)

        # Finished: the K best of the finished so far and the candidates that end in EOS.
        new_scores = jnp.where(ends, top_log_probs / length_penalty(length, alpha), NEG_INF)
        all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
        all_seqs = jnp.concatenate([s.finished_seqs, top_seqs], axis=1)
        finished_scores, finished_pick = jax.lax.top_k(all_scores, K)
        finished_seqs = _gather_beams(all_seqs, finished_pick)
        return _BeamState(length, live_seqs, live_log_probs, finished_seqs, finished_scores,
                          live_cache)

    seqs = jnp.full((batch, K, bound + 1), PAD_ID, jnp.int32)
    # Only the first slot is live at the start: the others would repeat it.
    live_log_probs = jnp.where(jnp.arange(K) == 0, 0.0, NEG_INF)
    init = _BeamState(jnp.int32(0), seqs, jnp.broadcast_to(live_log_probs, (batch, K)),
                      seqs, jnp.full((batch, K), NEG_INF, jnp.float32), cache['self'])
    final = jax.lax.while_loop(cond, body, init)
    best = jnp.argmax(final.finished_scores, axis=1)
    tokens = jnp.take_along_axis(final.finished_seqs, best[:, None, None], axis=1)[:, 0, 1:]
    scores = jnp.max(final.finished_scores, axis=1)
    return tokens, scores, final.index


# -- public API -------------------------------------------------------------------------------


_jit_greedy = jax.jit(_greedy, static_argnames=('graphdef', 'max_extra_length'))
_jit_beam_search = jax.jit(
    _beam_search, static_argnames=('graphdef', 'beam_size', 'alpha', 'max_extra_length',
                                   'early_stop'))


def greedy(model, inputs, *, max_extra_length: int = 50):
    """Greedy decoding of `inputs` [B, S] (EOS-terminated, PAD-padded token ids).

    Returns (tokens [B, T] int32 without the start symbol, each row ending in EOS then PAD;
    log-probabilities [B] of those tokens, EOS included).
    """
    graphdef, params = nnx.split(model)
    tokens, log_prob, _ = _jit_greedy(graphdef, params, jnp.asarray(inputs, jnp.int32),
                                      max_extra_length)
    return tokens, log_prob


def beam_search(model, inputs, *, beam_size: int = 4, alpha: float = 0.6,
                max_extra_length: int = 50, early_stop: bool = True):
    """Beam search of `inputs` [B, S] (EOS-terminated, PAD-padded token ids).

    Returns (tokens [B, T] int32, the best hypothesis without the start symbol, ending in EOS
    then PAD; its score [B], log-probability / length penalty). T is
    min(S + max_extra_length, model.cfg.max_position). `early_stop=False` runs every sentence
    to its maximum length (for tests: the result must not change).
    """
    inputs = jnp.asarray(inputs, jnp.int32)
    if beam_size < 1:
        raise ValueError(f'beam_size={beam_size} must be >= 1')
    graphdef, params = nnx.split(model)
    tokens, scores, _ = search(graphdef, params, inputs, beam_size=beam_size, alpha=alpha,
                               max_extra_length=max_extra_length, early_stop=early_stop)
    return tokens, scores


def search(graphdef, params, inputs, *, beam_size: int, alpha: float, max_extra_length: int,
           early_stop: bool = True):
    """The jitted search on split model state: (tokens, scores, steps the loop ran).

    beam_size 1 is greedy (its score is then length-penalised too, for comparison).
    """
    alpha = float(alpha)
    if beam_size == 1:
        tokens, log_prob, steps = _jit_greedy(graphdef, params, inputs, max_extra_length)
        return tokens, log_prob / length_penalty(hypothesis_lengths(tokens), alpha), steps
    return _jit_beam_search(graphdef, params, inputs, beam_size, alpha, max_extra_length,
                            early_stop)


def hypothesis_lengths(tokens) -> jax.Array:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    tokens = jnp.asarray(tokens)
    is_eos = tokens == EOS_ID
    first = jnp.argmax(is_eos, axis=1)
    return jnp.where(jnp.any(is_eos, axis=1), first + 1, tokens.shape[1]).astype(jnp.int32)


def strip(tokens) -> list[list[int]]:
    """Host-side token lists, cut before the first EOS (and with PAD removed)."""
    out = []
    for row in np.asarray(tokens).tolist():
        kept = []
        for t in row:
            if t == EOS_ID:
                break
            if t != PAD_ID:
                kept.append(t)
        out.append(kept)
    return out


class Decoder:
    """Decodes batches of any size and length with few compilations.

    Batches are padded to `batch_size` rows (a multiple of the mesh's device count) and to a
    source length on the bucket ladder (`batching.ladder`, the one training uses), so a whole
    test set compiles a handful of shapes; the jitted function is cached per shape by jax.jit.
    With a mesh, inputs are laid out with `sharding.batch_sharding(mesh)` and parameters
    replicated.
    """

    def __init__(self, model, *, beam_size: int = 4, alpha: float = 0.6,
                 max_extra_length: int = 50, batch_size: int = 64, mesh=None,
                 bucket_step: int = 4, bucket_growth: float = 1.15):
        self.beam_size, self.alpha = beam_size, float(alpha)
        self.max_extra_length = max_extra_length
        self.max_position = model.cfg.max_position
        self.mesh = mesh
        devices = mesh.size if mesh is not None else 1
        self.batch_size = batching.round_up(max(batch_size, 1), devices)
        self.graphdef, params = nnx.split(model)
        if mesh is not None:
            params = jax.device_put(params, sharding.replicated(mesh))
            self._input_sharding = sharding.batch_sharding(mesh)
        else:
            self._input_sharding = None
        self.params = params
        # A source never exceeds max_position tokens (longer ones are truncated first).
        self._buckets = np.unique(np.minimum(
            batching.ladder(bucket_step, bucket_growth, self.max_position), self.max_position))
        self.shapes_compiled: set[tuple[int, int]] = set()
        self.steps = 0  # decoding steps run so far (over all batches)

    def bucket(self, length: int) -> int:
        """The padded source length of a batch whose longest source has `length` tokens."""
        return int(self._buckets[min(np.searchsorted(self._buckets, length),
                                     len(self._buckets) - 1)])

    def __call__(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        """inputs [n, S] (n <= batch_size) -> (tokens [n, T], scores [n]) as numpy."""
        inputs = np.asarray(inputs, np.int32)
        n, length = inputs.shape
        if n > self.batch_size:
            raise ValueError(f'{n} rows exceed the decoder batch size {self.batch_size}')
        real = int((inputs != PAD_ID).sum(axis=1).max(initial=1))
        if real > self.max_position:
            raise ValueError(f'a source of {real} tokens exceeds model.max_position='
                             f'{self.max_position}; truncate it first')
        width = self.bucket(max(real, 1))
        padded = np.full((self.batch_size, width), PAD_ID, np.int32)
        padded[:n, :min(length, width)] = inputs[:, :width]
        x = jnp.asarray(padded)
        if self._input_sharding is not None:
            x = jax.device_put(padded, self._input_sharding)
        self.shapes_compiled.add(padded.shape)
        tokens, scores, steps = search(self.graphdef, self.params, x, beam_size=self.beam_size,
                                       alpha=self.alpha, max_extra_length=self.max_extra_length)
        self.steps += int(steps)
        return np.asarray(tokens)[:n], np.asarray(scores)[:n]


# -- what the programs decode: splits and lines of text ---------------------------------------


def settings(config, beam_size=None, alpha=None, max_extra_length=None) -> dict:
    """Beam size, alpha and max_extra_length: the config's, unless given (checked)."""
    d = config.decode
    out = dict(beam_size=d.beam_size if beam_size is None else beam_size,
               alpha=float(d.length_penalty if alpha is None else alpha),
               max_extra_length=d.max_extra_length if max_extra_length is None
               else max_extra_length)
    if out['beam_size'] < 1:
        raise UsageError(f'--beam_size={out["beam_size"]} must be >= 1')
    if out['max_extra_length'] < 0:
        raise UsageError(f'--max_extra_length={out["max_extra_length"]} must be >= 0')
    return out


def make_decoder(model, config, decode_settings: dict, batch_sentences: int,
                 devices=None) -> Decoder:
    """A Decoder over this process's devices (batch split over them, parameters replicated)."""
    mesh = sharding.make_mesh(devices=jax.local_devices() if devices is None else devices)
    return Decoder(model, batch_size=batch_sentences, mesh=mesh,
                   bucket_step=config.data.bucket_step,
                   bucket_growth=config.data.bucket_growth, **decode_settings)


def translate_split(decoder: Decoder, config, tokenizer, split: str, batch_sentences: int,
                    limit: int | None = None):
    """Hypotheses (strings) of every sentence of `split` this process decodes.

    Returns (hypotheses dict: index in the split -> text, stats dict).
    """
    hypotheses: dict[int, str] = {}
    generated = 0
    # Read and encode first, so that the time is the decoding's (compilation included).
    batches = list(batching.eval_batches(config, tokenizer, split, batch_sentences,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count()))
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        index = batch['index']
        keep = index >= 0
        if limit is not None:
            keep &= index < limit
        if not keep.any():
            continue
        inputs = batch['inputs']
        width = max(int((inputs != PAD_ID).sum(axis=1).max()), 1)
        tokens, _ = decoder(inputs[:, :width])
        lengths = np.asarray(hypothesis_lengths(tokens))
        for row in np.flatnonzero(keep):
            hypotheses[int(index[row])] = tokenizer.decode(tokens[row].tolist())
            generated += int(lengths[row])
        if i % 10 == 0:
            logging.info('%s: %d sentences decoded', split, len(hypotheses))
    seconds = time.perf_counter() - start
    return hypotheses, {'decode_seconds': seconds, 'generated_tokens': generated,
                        'decode_steps': decoder.steps,
                        'compiled_shapes': len(decoder.shapes_compiled)}


class Translator:
    """Lines of text in, translations out, in order; batched, the decoder kept compiled."""

    def __init__(self, model, config, tokenizer, decode_settings: dict, batch_sentences: int,
                 warn=None, devices=None):
        self.tokenizer = tokenizer
        self.batch_sentences = batch_sentences
        self.limit = batching.max_tokens(config.model)
        self.decoder = make_decoder(model, config, decode_settings, batch_sentences, devices)
        self.warn = warn or (lambda message: logging.warning('%s', message))

    def __call__(self, lines: list[tuple[int, str]]) -> list[str]:
        """Translations of (line number, text) pairs, in the given order; blank -> empty."""
        out = [''] * len(lines)
        work = []
        for position, (number, text) in enumerate(lines):
            if not text.strip():
                continue
            ids = self.tokenizer.encode(text)
            if len(ids) > self.limit:
                self.warn(f'line {number}: {len(ids)} tokens; truncated to the first '
                          f'{self.limit} (model.max_position={self.limit + 1} with EOS)')
                ids = ids[:self.limit]
            work.append((position, ids + [EOS_ID]))
        work.sort(key=lambda item: len(item[1]))
        for start in range(0, len(work), self.batch_sentences):
            group = work[start:start + self.batch_sentences]
            width = max(len(ids) for _, ids in group)
            inputs = [ids + [PAD_ID] * (width - len(ids)) for _, ids in group]
            tokens, _ = self.decoder(inputs)
            for (position, _), row in zip(group, tokens):
                text = self.tokenizer.decode(row.tolist())
                out[position] = text.replace('\r', ' ').replace('\n', ' ')
        return out
