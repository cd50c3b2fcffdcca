"""The searches, on the device: beam search (section 6.1, with n-best lists), greedy decoding
and sampling, for one model or an ensemble, all built on one cached decoding step; and forced
decoding (the log-probability of given outputs).

The paper's settings: beam 4, length penalty alpha = 0.6, at most input length + 50 output
tokens, stopping early once no live hypothesis can win. The length penalty is GNMT's (Wu et al.
2016), as in tensor2tensor, the paper's code: a hypothesis of `n` tokens (its EOS counted) with
log-probability `logp` scores `logp / ((5 + n) / 6) ** alpha`.

How a search runs, per batch of sentences:

* The encoder runs once per sentence; the encoder-decoder keys and values are projected once and
  repeated for the beams (or samples) once, never per step.
* Each step is `_step`: one token per hypothesis through every member's
  `Transformer.decode_step`, which writes its key and value into the member's own fixed-size
  self-attention cache; a step never re-runs the prefix, so its cost does not depend on how many
  tokens came before. Beam reordering gathers only the self-attention caches.
* An ensemble's next-token distribution is the mean of its members' probabilities,
  p(y) = (1/M) sum_m p_m(y), computed in log space (log-sum-exp of the log-probabilities minus
  log M), as fairseq does: a proper distribution, so scores, sampling and perplexity mean what
  they mean for one model. An ensemble of one model twice is that model.
* Beam search chooses candidates as tensor2tensor does: the 2K best extensions of the K live
  hypotheses; those ending in EOS join the K best finished hypotheses (scored with the length
  penalty), the K best of the others stay live. The K finished ones are kept sorted, so the
  n-best list (n <= K) is their first n.
* Each sentence may produce at most `source length + max_extra_length` tokens (source length
  counts its EOS); at that length only EOS is allowed, so every sentence finishes. PAD, the
  decoder's start symbol, is never produced. Forbidden tokens get NEG_INF after the softmax, so
  allowed tokens keep the model's own log-probabilities (no renormalisation), and forced
  decoding of a search's output gives the search's own log-probability.
* Constraints are masks of the same step, never other searches: a target prefix forces each
  hypothesis's first tokens (only the prefix's token is allowed while it lasts, with the
  model's own log-probability, so a beam holds one live hypothesis until the prefix ends);
  `no_repeat_ngram_size` forbids every token that would complete an n-gram the hypothesis
  already holds (compared on the device against the hypothesis's history, fixed-size work a
  step). Without them (None, 0) nothing of theirs is compiled.
* A `lax.while_loop` stops as soon as, for every sentence, no live hypothesis can enter the
  n best finished ones even with the largest length bonus still open to it (the step cost is
  flat, so stopping early saves time in proportion). For the 1-best this is the paper's early
  stop; an n-best list runs until its n-th entry is settled.
* Sampling draws each next token from the (ensemble's) distribution, optionally sharpened or
  flattened by a temperature and cut to the top-k tokens and/or the nucleus (top-p, Holtzman et
  al. 2020). Every row has its own random key, derived from (seed, sentence id, sample number)
  and folded with the step index, so a sample does not depend on the batch it was decoded in.

`beam_size == 1` is greedy decoding, as in tensor2tensor (a 1-wide beam search with 2
candidates per step could return a shorter hypothesis that greedy never picks).

Everything is jitted as pure functions of (graphdefs, parameters, inputs); sharding follows the
inputs, so a batch laid out with `sharding.batch_sharding(mesh)` decodes across the mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.model import segments_and_positions
from transformer.tokenizer import EOS_ID, PAD_ID  # PAD is the start symbol; never produced

# A large finite stand-in for -inf: sums and differences of it stay finite (no NaN).
NEG_INF = -1.0e7


class Found(NamedTuple):
    """What a search found: K hypotheses per sentence, best first."""

    tokens: jax.Array  # [B, K, T] int32, without the start symbol, each ending in EOS then PAD
    scores: jax.Array  # [B, K] log_probs / length penalty; NEG_INF for a slot never filled
    log_probs: jax.Array  # [B, K] the plain log-probabilities, EOS included
    steps: jax.Array  # decoding steps the loop ran


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


def hypothesis_lengths(tokens) -> jax.Array:
    """Tokens up to and including the first EOS along the last axis (all when there is none)."""
    tokens = jnp.asarray(tokens)
    is_eos = tokens == EOS_ID
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(jnp.any(is_eos, axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)


# -- the members and the one cached step ------------------------------------------------------


def split(models) -> tuple[tuple, tuple]:
    """(graphdefs, parameters) of a model or a sequence of models (an ensemble)."""
    if not isinstance(models, Sequence):
        models = [models]
    parts = [nnx.split(m) for m in models]
    return tuple(g for g, _ in parts), tuple(p for _, p in parts)


def _members(graphdefs, params) -> list:
    return [nnx.merge(g, p) for g, p in zip(graphdefs, params)]


def _max_position(models) -> int:
    return min(m.cfg.max_position for m in models)


def _start(models, inputs, bound: int, repeat: int):
    """Runs each member's encoder once and builds its cache, repeated `repeat` times per row
    (the hypotheses of one sentence are adjacent rows b * repeat + k, axis 0 of every cache
    array).

    Returns (cross caches, self-attention caches, segmentation of the repeated rows).
    """
    segmentation, _ = segments_and_positions(inputs)
    crosses, selves = [], []
    for model in models:
        cache = model.init_cache(model.encode(inputs, segmentation), bound)
        if repeat > 1:
            cache = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), cache)
        crosses.append(cache['cross'])
        selves.append(cache['self'])
    if repeat > 1:
        segmentation = jnp.repeat(segmentation, repeat, axis=0)
    return crosses, selves, segmentation


def _step(models, crosses, selves, history, index, segmentation, max_len, prefix=None,
          no_repeat_ngram_size: int = 0):
    """The decoding step every search shares: feeds each hypothesis's token at position
    `index` of `history` [N, T + 1] (column 0 the start symbol) through each member with its
    own cache.

    Returns (log-probabilities [N, V] of the ensemble's next token, with PAD forbidden, only
    EOS allowed where the new token reaches `max_len` [N], no token that would repeat an
    n-gram of `no_repeat_ngram_size` (0: no such rule), and only the prefix's token where
    `prefix` [N, P] (PAD-padded) still forces one; the new self-attention caches).
    """
    tokens = jax.lax.dynamic_index_in_dim(history, index, axis=1, keepdims=False)
    log_probs, new_selves = [], []
    for model, cross, own in zip(models, crosses, selves):
        logits, cache = model.decode_step(tokens, index, {'self': own, 'cross': cross},
                                          segmentation)
        log_probs.append(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
        new_selves.append(cache['self'])
    logp = _mix(log_probs)
    vocab = jnp.arange(logp.shape[-1])
    forbidden = (vocab == PAD_ID)[None, :] | (
        (index + 1 >= max_len)[:, None] & (vocab != EOS_ID)[None, :])
    if no_repeat_ngram_size:
        forbidden |= _repeated_ngrams(history, index, logp.shape[-1], no_repeat_ngram_size)
    if prefix is not None:
        # A forced token overrides every other rule: the prefix is the user's.
        forced = _forced_tokens(prefix, index)
        forbidden = jnp.where((forced != PAD_ID)[:, None], vocab[None, :] != forced[:, None],
                              forbidden)
    return jnp.where(forbidden, NEG_INF, logp), new_selves


def _forced_tokens(prefix, index):
    """[N] the token the prefix [N, P] forces at output position `index`; PAD where none."""
    width = prefix.shape[1]
    token = jax.lax.dynamic_index_in_dim(prefix, jnp.minimum(index, width - 1), axis=1,
                                         keepdims=False)
    return jnp.where(index < width, token, PAD_ID)


def _repeated_ngrams(history, index, vocab: int, n: int):
    """[N, V] True for each token that would complete an n-gram the hypothesis already holds
    (its tokens are history[:, 1:index + 1]; column 0 is the start symbol, which no n-gram
    can repeat). Fixed-size work a step: the n-1 last tokens are compared with every window
    of the history, and the tokens that followed a match are scattered into the mask."""
    rows, width = history.shape
    start = jnp.arange(width)
    # Earlier n-grams start at 1 <= j and end by position `index`, before the new token.
    match = jnp.broadcast_to((start >= 1) & (start + n - 1 <= index), (rows, width))
    for m in range(n - 1):
        last = jax.lax.dynamic_index_in_dim(history, index - n + 2 + m, axis=1)  # [N, 1]
        # Wrapped-around columns of the roll lie past `index`, where match is False.
        match &= jnp.roll(history, -m, axis=1) == last
    follower = jnp.where(match, jnp.roll(history, -(n - 1), axis=1), vocab)
    banned = jnp.zeros((rows, vocab), bool)
    return banned.at[jnp.arange(rows)[:, None], follower].set(True, mode='drop')


def _mix(log_probs: list):
    """The ensemble's log-probabilities: log of the members' mean probability."""
    if len(log_probs) == 1:
        return log_probs[0]
    # Pairwise logaddexp, not logsumexp over a stacked copy: 8.6x faster on a CPU (4.6 against
    # 40 ms for two members' 512 x 8000 log-probabilities), the same to 2e-6.
    return functools.reduce(jnp.logaddexp, log_probs) - math.log(len(log_probs))


# -- greedy decoding and sampling --------------------------------------------------------------


class _DrawState(NamedTuple):
    index: jax.Array  # tokens generated so far
    tokens: jax.Array  # [R, T + 1], column 0 the start symbol
    log_prob: jax.Array  # [R]
    done: jax.Array  # [R]
    selves: list  # the members' self-attention caches


def _sampling_probs(logp, temperature, top_p, top_k: int, nucleus: bool):
    """Unnormalised probabilities to draw the next token from [N, V]: the model's at
    `temperature`, cut to the top_k best tokens, then to the nucleus (the fewest best tokens
    whose probability reaches top_p); cut tokens get 0."""
    x = jnp.where(logp > NEG_INF / 2, logp / temperature, NEG_INF)
    if top_k:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x >= kth, x, NEG_INF)
    probs = jax.nn.softmax(x, axis=-1)
    if nucleus:
        # The nucleus is every token at least as likely as t, the largest threshold whose
        # tokens' mass reaches top_p. t is found by bisection (40 halvings of [0, max p]: within
        # 1e-12 of the exact cut) rather than by sorting the vocabulary, which on a CPU costs 35
        # times as much (144 against 4 ms for 128 rows of 8000).
        def halve(_, bounds):
            low, high = bounds
            mid = (low + high) / 2
            enough = jnp.sum(jnp.where(probs >= mid, probs, 0.0), axis=-1,
                             keepdims=True) >= top_p
            return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

        low, _ = jax.lax.fori_loop(0, 40, halve, (jnp.zeros_like(probs[:, :1]),
                                                  jnp.max(probs, axis=-1, keepdims=True)))
        probs = jnp.where(probs >= low, probs, 0.0)
    return probs


def _inverse_cdf(probs, u):
    """The token whose share of the cumulative distribution of `probs` holds u in (0, 1]
    [N]: one uniform number per row (the Gumbel trick would draw one per token: 5x slower
    on a CPU); tokens of probability 0 are never drawn."""
    cumulative = jnp.cumsum(probs, axis=-1)
    return jnp.sum(cumulative < u[:, None] * cumulative[:, -1:], axis=-1)


def _row_keys(seed, sentence_ids, num_samples: int):
    """One key per row: sample j of sentence i has key fold_in(fold_in(key(seed), i), j)."""
    base = jax.random.key(seed)

    def sentence(i):
        key = jax.random.fold_in(base, i)
        return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_samples))

    return jax.vmap(sentence)(sentence_ids).reshape(-1)


def _draw(graphdefs, params, inputs, sentence_ids, seed, temperature, top_p, prefix=None, *,
          num_samples: int, top_k: int, nucleus: bool, greedy: bool, alpha: float,
          max_extra_length: int, no_repeat_ngram_size: int = 0) -> Found:
    """Greedy decoding (`greedy`) or `num_samples` samples of each sentence, each starting
    with its row of `prefix` [B, P] when given."""
    models = _members(graphdefs, params)
    batch, src_len = inputs.shape
    rows = batch * num_samples
    bound = output_bound(src_len, max_extra_length, _max_position(models))
    max_len = jnp.repeat(max_output_lengths(inputs, max_extra_length, bound), num_samples)
    crosses, selves, segmentation = _start(models, inputs, bound, num_samples)
    keys = None if greedy else _row_keys(seed, sentence_ids, num_samples)
    if prefix is not None:
        prefix = jnp.repeat(prefix, num_samples, axis=0)

    def cond(s: _DrawState):
        return (s.index < bound) & ~jnp.all(s.done)

    def body(s: _DrawState):
        logp, new_selves = _step(models, crosses, s.selves, s.tokens, s.index, segmentation,
                                 max_len, prefix, no_repeat_ngram_size)
        if greedy:
            token = jnp.argmax(logp, axis=-1)
        else:
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s.index))(keys)
            u = 1.0 - jax.vmap(jax.random.uniform)(step_keys)  # in (0, 1]
            token = _inverse_cdf(_sampling_probs(logp, temperature, top_p, top_k, nucleus), u)
        token = token.astype(jnp.int32)
        token_logp = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
        token = jnp.where(s.done, PAD_ID, token)
        log_prob = s.log_prob + jnp.where(s.done, 0.0, token_logp)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.index + 1, 1)
        return _DrawState(s.index + 1, tokens, log_prob, s.done | (token == EOS_ID),
                          new_selves)

    init = _DrawState(jnp.int32(0), jnp.full((rows, bound + 1), PAD_ID, jnp.int32),
                      jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), bool), selves)
    final = jax.lax.while_loop(cond, body, init)
    tokens = final.tokens[:, 1:]
    scores = final.log_prob / length_penalty(hypothesis_lengths(tokens), alpha)
    return Found(tokens.reshape(batch, num_samples, bound), scores.reshape(batch, num_samples),
                 final.log_prob.reshape(batch, num_samples), final.index)


# -- beam search -------------------------------------------------------------------------------


class _BeamState(NamedTuple):
    index: jax.Array  # tokens generated so far (the same for every hypothesis)
    live_seqs: jax.Array  # [B, K, T + 1], column 0 the start symbol
    live_log_probs: jax.Array  # [B, K]; NEG_INF for empty slots
    finished_seqs: jax.Array  # [B, K, T + 1]
    finished_scores: jax.Array  # [B, K], best first; length-penalised; NEG_INF for empty slots
    finished_log_probs: jax.Array  # [B, K]
    selves: list  # the members' self-attention caches, rows b * K + k


def _gather_beams(x, beam_index):
    """x [B, K', ...] -> [B, K, ...] picking x[b, beam_index[b, k]]."""
    index = beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _gather_cache(cache, beam_index, beam_size):
    """Reorders the rows [B * K, ...] of every cache array: row b * K + k becomes row
    b * K + beam_index[b, k] (a gather of whole rows)."""
    batch = beam_index.shape[0]
    rows = (jnp.arange(batch)[:, None] * beam_size + beam_index).reshape(-1)
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0, mode='clip'), cache)


def _beam_search(graphdefs, params, inputs, beam_size: int, alpha: float,
                 max_extra_length: int, nbest: int = 1, early_stop: bool = True, prefix=None,
                 no_repeat_ngram_size: int = 0) -> Found:
    models = _members(graphdefs, params)
    batch, src_len = inputs.shape
    K = beam_size
    bound = output_bound(src_len, max_extra_length, _max_position(models))
    max_len = max_output_lengths(inputs, max_extra_length, bound)  # [B]
    crosses, selves, segmentation = _start(models, inputs, bound, K)
    if prefix is not None:
        # While a prefix forces tokens, each beam has one candidate, so only the first slot
        # (the only live one at the start) is live until the prefix ends.
        prefix = jnp.repeat(prefix, K, axis=0)
    # The largest length penalty open to a live hypothesis: at the next length or at the
    # maximum one (the penalty is monotonic in the length, whatever the sign of alpha).
    final_penalty = length_penalty(max_len, alpha)

    def row_done(s: _BeamState):
        """[B] True where no live hypothesis can still enter the n best finished ones."""
        best_live = jnp.max(s.live_log_probs, axis=1)
        # Log-probabilities only fall as hypotheses grow; the score divides by a penalty of
        # at most max(penalty at the next length, penalty at the max length).
        penalty = jnp.maximum(length_penalty(s.index + 1, alpha), final_penalty)
        best_possible = best_live / penalty
        nth_finished = s.finished_scores[:, nbest - 1]  # kept sorted, best first
        no_live = best_live <= NEG_INF / 2
        out_of_length = s.index >= max_len
        if not early_stop:
            return out_of_length | no_live
        return out_of_length | no_live | (nth_finished >= best_possible)

    def cond(s: _BeamState):
        return (s.index < bound) & ~jnp.all(row_done(s))

    def body(s: _BeamState):
        logp, new_selves = _step(models, crosses, s.selves,
                                 s.live_seqs.reshape(batch * K, -1), s.index, segmentation,
                                 jnp.repeat(max_len, K), prefix, no_repeat_ngram_size)
        vocab = logp.shape[-1]
        length = s.index + 1
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
        live_beams = _gather_beams(top_beam, live_pick)
        live_selves = [_gather_cache(c, live_beams, K) for c in new_selves]

        # Finished: the K best of the finished so far and the candidates that end in EOS
        # (top_k returns them sorted, best first).
        new_scores = jnp.where(ends, top_log_probs / length_penalty(length, alpha), NEG_INF)
        all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
        finished_scores, finished_pick = jax.lax.top_k(all_scores, K)
        finished_seqs = _gather_beams(jnp.concatenate([s.finished_seqs, top_seqs], axis=1),
                                      finished_pick)
        finished_log_probs = _gather_beams(
            jnp.concatenate([s.finished_log_probs, jnp.where(ends, top_log_probs, NEG_INF)],
                            axis=1), finished_pick)
        return _BeamState(length, live_seqs, live_log_probs, finished_seqs, finished_scores,
                          finished_log_probs, live_selves)

    seqs = jnp.full((batch, K, bound + 1), PAD_ID, jnp.int32)
    empty = jnp.full((batch, K), NEG_INF, jnp.float32)
    # Only the first slot is live at the start: the others would repeat it.
    live_log_probs = jnp.where(jnp.arange(K) == 0, 0.0, NEG_INF)
    init = _BeamState(jnp.int32(0), seqs, jnp.broadcast_to(live_log_probs, (batch, K)),
                      seqs, empty, empty, selves)
    final = jax.lax.while_loop(cond, body, init)
    return Found(final.finished_seqs[:, :nbest, 1:], final.finished_scores[:, :nbest],
                 final.finished_log_probs[:, :nbest], final.index)


# -- forced decoding ---------------------------------------------------------------------------


def _forced(graphdefs, params, inputs, targets):
    """(log p(targets | inputs) [B], target tokens [B]) under the ensemble, teacher-forced."""
    picked = []
    for model in _members(graphdefs, params):
        logp = jax.nn.log_softmax(model(inputs, targets).astype(jnp.float32), axis=-1)
        picked.append(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])
    # Mixing the members' probabilities of the given token is mixing their distributions
    # and reading that token's entry, as the search does.
    real = targets != PAD_ID
    log_prob = jnp.sum(jnp.where(real, _mix(picked), 0.0), axis=1)
    return log_prob, jnp.sum(real, axis=1).astype(jnp.int32)


# -- the entry points ----------------------------------------------------------------------------


_jit_draw = jax.jit(_draw, static_argnames=('graphdefs', 'num_samples', 'top_k', 'nucleus',
                                            'greedy', 'alpha', 'max_extra_length',
                                            'no_repeat_ngram_size'))
_jit_beam_search = jax.jit(
    _beam_search, static_argnames=('graphdefs', 'beam_size', 'alpha', 'max_extra_length',
                                   'nbest', 'early_stop', 'no_repeat_ngram_size'))
_jit_forced = jax.jit(_forced, static_argnames=('graphdefs',))


def _searcher(graphdefs, params, inputs, *, beam_size: int, alpha: float,
              max_extra_length: int, nbest: int = 1, early_stop: bool = True, prefix=None,
              no_repeat_ngram_size: int = 0):
    """(the jitted search, its arguments) of `search`: greedy decoding for beam 1. The
    constraints' defaults (no prefix, no n-gram rule) constrain nothing and compile nothing
    for them."""
    if not 1 <= nbest <= beam_size:
        raise ValueError(f'nbest={nbest} must be between 1 and beam_size={beam_size}')
    if no_repeat_ngram_size < 0:
        raise ValueError(f'no_repeat_ngram_size={no_repeat_ngram_size} must be >= 0')
    constraints = dict(no_repeat_ngram_size=no_repeat_ngram_size)
    if beam_size == 1:
        zeros = jax.ShapeDtypeStruct(inputs.shape[:1], jnp.int32, sharding=inputs.sharding) \
            if isinstance(inputs, jax.ShapeDtypeStruct) else jnp.zeros(inputs.shape[:1], jnp.int32)
        return _jit_draw, (graphdefs, params, inputs, zeros, jnp.uint32(0), 1.0, 1.0,
                           prefix), dict(num_samples=1, top_k=0, nucleus=False, greedy=True,
                                         alpha=float(alpha), max_extra_length=max_extra_length,
                                         **constraints)
    return _jit_beam_search, (graphdefs, params, inputs, beam_size, float(alpha),
                              max_extra_length, nbest, early_stop, prefix), constraints


def search(graphdefs, params, inputs, *, beam_size: int, alpha: float, max_extra_length: int,
           nbest: int = 1, early_stop: bool = True, prefix=None,
           no_repeat_ngram_size: int = 0) -> Found:
    """Beam search of `inputs` [B, S] (EOS-terminated, PAD-padded token ids) on split model
    state (see `split`): the `nbest` best hypotheses of each sentence, best first.

    T is min(S + max_extra_length, the members' smallest max_position). beam_size 1 is greedy
    (its score is then length-penalised too, for comparison). `early_stop=False` runs every
    sentence to its maximum length (for tests: the result must not change).

    Constraints: `prefix` [B, P] (PAD-padded, no EOS) forces the first tokens of every
    hypothesis of a row, which then continues as searched; its tokens' log-probabilities
    count in the scores. Each row's prefix must be shorter than its maximum length (the
    caller checks: host_decode.Decoder). `no_repeat_ngram_size` N > 0 forbids any hypothesis from
    holding the same N tokens in a row twice (the prefix's n-grams count; its own tokens are
    forced regardless).
    """
    fn, args, kwargs = _searcher(graphdefs, params, jnp.asarray(inputs, jnp.int32),
                                 beam_size=beam_size, alpha=alpha,
                                 max_extra_length=max_extra_length, nbest=nbest,
                                 early_stop=early_stop, prefix=_as_prefix(prefix),
                                 no_repeat_ngram_size=no_repeat_ngram_size)
    return fn(*args, **kwargs)


def _as_prefix(prefix):
    return None if prefix is None else jnp.asarray(prefix, jnp.int32)


def lower_search(graphdefs, params, inputs, **settings) -> jax.stages.Lowered:
    """The search `search` runs, lowered for abstract `params` and `inputs`
    (jax.ShapeDtypeStruct with shardings, e.g. on a pre-flight target's devices): nothing is
    allocated, and `.compile()` gives the target's executable."""
    fn, args, kwargs = _searcher(graphdefs, params, inputs, **settings)
    return fn.lower(*args, **kwargs)


def sample(graphdefs, params, inputs, sentence_ids, *, seed: int, num_samples: int = 1,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, alpha: float = 0.6,
           max_extra_length: int = 50, prefix=None, no_repeat_ngram_size: int = 0) -> Found:
    """`num_samples` samples of each sentence of `inputs` [B, S], drawn with the keys of
    (`seed`, `sentence_ids` [B], sample number): the same sentence id and seed give the same
    samples in any batch. top_k 0 and top_p 1 cut nothing.

    Scores and log-probabilities are the model's own (temperature 1, nothing cut), as for beam
    search, so that samples and beam hypotheses compare. `prefix` and `no_repeat_ngram_size`
    constrain every sample as they constrain `search`'s hypotheses.
    """
    return _jit_draw(graphdefs, params, jnp.asarray(inputs, jnp.int32),
                     jnp.asarray(sentence_ids, jnp.int32), jnp.uint32(seed),
                     jnp.float32(temperature), jnp.float32(top_p), _as_prefix(prefix),
                     num_samples=num_samples, top_k=top_k, nucleus=top_p < 1.0, greedy=False,
                     alpha=float(alpha), max_extra_length=max_extra_length,
                     no_repeat_ngram_size=no_repeat_ngram_size)


def forced(graphdefs, params, inputs, targets) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced log p(targets | inputs) [B] (no label smoothing) and the target tokens
    counted [B], for EOS-terminated, PAD-padded `inputs` and `targets`."""
    return _jit_forced(graphdefs, params, jnp.asarray(inputs, jnp.int32),
                       jnp.asarray(targets, jnp.int32))


def beam_search(models, inputs, *, beam_size: int = 4, alpha: float = 0.6,
                max_extra_length: int = 50, nbest: int = 1, early_stop: bool = True,
                prefix=None, no_repeat_ngram_size: int = 0) -> Found:
    """`search` on a model or a sequence of models (an ensemble)."""
    graphdefs, params = split(models)
    return search(graphdefs, params, inputs, beam_size=beam_size, alpha=alpha,
                  max_extra_length=max_extra_length, nbest=nbest, early_stop=early_stop,
                  prefix=prefix, no_repeat_ngram_size=no_repeat_ngram_size)


def greedy(models, inputs, *, max_extra_length: int = 50) -> Found:
    """Greedy decoding on a model or an ensemble; scores are log_probs / length penalty 0.6."""
    return beam_search(models, inputs, beam_size=1, max_extra_length=max_extra_length)
