"""Beam search and greedy decoding against exhaustive search on a tiny model."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import config as config_lib
from transformer import decode, sharding
from transformer.model import create_model

VOCAB = 5  # PAD, EOS and three words
WORDS = (2, 3, 4)


def tiny_model(seed=0, vocab=VOCAB, max_position=32):
    c = config_lib.shrink(config_lib.base_config())
    c.vocab_size = vocab
    c.model.update(num_encoder_layers=2, num_decoder_layers=2, d_model=16, d_ff=32,
                   num_heads=2, d_k=8, d_v=8, max_position=max_position, dtype='float32')
    return create_model(c, seed=seed)


def sources(rows, length, seed=0):
    """Random sources of 1..length-1 words, EOS-terminated, PAD-padded."""
    rng = np.random.default_rng(seed)
    x = np.zeros((rows, length), np.int32)
    for r in range(rows):
        n = rng.integers(1, length)
        x[r, :n] = rng.choice(WORDS, n)
        x[r, n] = decode.EOS_ID
    return x


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, inputs, targets):
    return nnx.merge(graphdef, params)(inputs, targets)


def forward(model, inputs, targets):
    """Teacher-forced logits, jitted (eager NNX calls are slow)."""
    graphdef, params = nnx.split(model)
    return _forward(graphdef, params, jnp.asarray(inputs, jnp.int32),
                    jnp.asarray(targets, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _sequence_log_probs(graphdef, params, inputs, targets):
    logp = jax.nn.log_softmax(_forward(graphdef, params, inputs, targets), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(targets != decode.PAD_ID, picked, 0.0), axis=1)


def sequence_log_probs(model, inputs, targets):
    """log p(targets | inputs) from one teacher-forced pass, per row."""
    graphdef, params = nnx.split(model)
    return np.asarray(_sequence_log_probs(graphdef, params, jnp.asarray(inputs, jnp.int32),
                                          jnp.asarray(targets, jnp.int32)))


def exhaustive_best(model, source, max_len, alpha):
    """Every EOS-terminated hypothesis of at most max_len tokens, scored in one batch."""
    hyps = [list(words) + [decode.EOS_ID]
            for n in range(max_len) for words in itertools.product(WORDS, repeat=n)]
    targets = np.zeros((len(hyps), max_len), np.int32)
    for i, h in enumerate(hyps):
        targets[i, :len(h)] = h
    inputs = np.repeat(source[None], len(hyps), axis=0)
    lengths = np.array([len(h) for h in hyps])
    scores = sequence_log_probs(model, inputs, targets) / ((5 + lengths) / 6) ** alpha
    best = int(np.argmax(scores))
    return hyps[best], scores[best], scores


def as_list(row):
    return decode.strip(row[None])[0] + [decode.EOS_ID]


@pytest.mark.parametrize('seed, alpha', [(24, 0.6), (22, 2.0)])
def test_wide_beam_finds_the_exhaustive_best(seed, alpha):
    """Beam 27 holds every live hypothesis of 3 words over 3 words, so it is exhaustive."""
    model = tiny_model(seed=seed)
    inputs = sources(8, 3, seed=seed)  # 1-2 words + EOS: at most 3 or 4 output tokens
    tokens, scores = decode.beam_search(model, inputs, beam_size=27, alpha=alpha,
                                        max_extra_length=1)
    lengths = set()
    for r in range(len(inputs)):
        max_len = int((inputs[r] != 0).sum()) + 1
        best, best_score, _ = exhaustive_best(model, inputs[r], max_len, alpha)
        assert as_list(np.asarray(tokens[r])) == best
        np.testing.assert_allclose(scores[r], best_score, rtol=1e-5, atol=1e-5)
        lengths.add(len(best))
    assert lengths != {1}, 'the test model only ever prefers EOS'


def test_beam_respects_max_length_and_ends_with_eos():
    model = tiny_model(seed=3)
    inputs = sources(5, 6, seed=4)
    tokens, _ = decode.beam_search(model, inputs, beam_size=4, alpha=0.6, max_extra_length=2)
    tokens = np.asarray(tokens)
    src_len = (inputs != 0).sum(1)
    for r in range(len(inputs)):
        n = int(decode.hypothesis_lengths(tokens)[r])
        assert tokens[r, n - 1] == decode.EOS_ID
        assert n <= src_len[r] + 2
        assert (tokens[r, n:] == decode.PAD_ID).all()
        assert decode.PAD_ID not in tokens[r, :n]


def test_greedy_is_teacher_forced_argmax():
    model = tiny_model(seed=5, vocab=11)
    inputs = sources(4, 5, seed=6)
    tokens, log_probs = decode.greedy(model, inputs, max_extra_length=3)
    tokens = np.asarray(tokens)
    logits = np.array(forward(model, inputs, tokens))
    logits[..., decode.PAD_ID] = -np.inf  # PAD (the start symbol) is never produced
    max_len = (inputs != 0).sum(1) + 3
    for r in range(len(inputs)):
        n = int(decode.hypothesis_lengths(tokens)[r])
        expected = logits[r, :n].argmax(-1)
        if n == max_len[r]:
            expected[-1] = decode.EOS_ID  # forced at the maximum length
        np.testing.assert_array_equal(tokens[r, :n], expected)
    np.testing.assert_allclose(log_probs, sequence_log_probs(model, inputs, tokens), atol=1e-4)


def test_beam_one_is_greedy():
    model = tiny_model(seed=7, vocab=11)
    inputs = sources(4, 5, seed=8)
    greedy_tokens, log_probs = decode.greedy(model, inputs, max_extra_length=4)
    tokens, scores = decode.beam_search(model, inputs, beam_size=1, alpha=0.6,
                                        max_extra_length=4)
    np.testing.assert_array_equal(tokens, greedy_tokens)
    lengths = decode.hypothesis_lengths(tokens)
    np.testing.assert_allclose(scores, log_probs / ((5 + lengths) / 6) ** 0.6, rtol=1e-6)


def test_beam_scores_at_least_greedy():
    """Greedy's hypothesis is always among beam search's candidates."""
    model = tiny_model(seed=7, vocab=11)
    inputs = sources(6, 5, seed=9)
    greedy_tokens, _ = decode.beam_search(model, inputs, beam_size=1, alpha=0.6,
                                          max_extra_length=4)
    for beam in (4,):
        _, scores = decode.beam_search(model, inputs, beam_size=beam, alpha=0.6,
                                       max_extra_length=4)
        lengths = decode.hypothesis_lengths(greedy_tokens)
        greedy_scores = sequence_log_probs(model, inputs, greedy_tokens) / (
            (5 + lengths) / 6) ** 0.6
        assert np.all(np.asarray(scores) >= greedy_scores - 1e-5)


def test_early_stopping_does_not_change_the_result():
    model = tiny_model(seed=13, vocab=11)
    embedding = model.embed.embedding
    embedding[...] = embedding[...].at[decode.EOS_ID].multiply(2.0)  # ends after a word or two
    inputs = sources(6, 5, seed=12)
    graphdef, params = nnx.split(model)
    x = jnp.asarray(inputs)
    early = decode.search(graphdef, params, x, beam_size=4, alpha=0.6, max_extra_length=20)
    full = decode.search(graphdef, params, x, beam_size=4, alpha=0.6, max_extra_length=20,
                         early_stop=False)
    np.testing.assert_array_equal(early[0], full[0])
    np.testing.assert_allclose(early[1], full[1], rtol=1e-6)
    assert int(early[2]) < int(full[2]), 'early stopping never stopped early'


def test_sharded_decoding_matches_unsharded():
    assert jax.device_count() == 8
    model = tiny_model(seed=13, vocab=11)
    inputs = sources(8, 6, seed=14)
    mesh = sharding.make_mesh()
    for beam in (1, 3):
        want = decode.beam_search(model, inputs, beam_size=beam, alpha=0.6, max_extra_length=5)
        decoder = decode.Decoder(model, beam_size=beam, alpha=0.6, max_extra_length=5,
                                 batch_size=8, mesh=mesh)
        got = decoder(inputs)
        n = min(got[0].shape[1], want[0].shape[1])
        np.testing.assert_array_equal(got[0][:, :n], np.asarray(want[0])[:, :n])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


def test_decoder_buckets_lengths_and_pads_rows():
    model = tiny_model(seed=15, vocab=11, max_position=64)
    decoder = decode.Decoder(model, beam_size=2, max_extra_length=3, batch_size=4)
    a = sources(3, 5, seed=16)
    b = sources(2, 7, seed=17)
    ta, _ = decoder(a)
    tb, _ = decoder(b)
    assert ta.shape[0] == 3 and tb.shape[0] == 2
    assert decoder.shapes_compiled == {(4, 8)}
    # Padding the batch does not change a sentence's translation.
    alone, _ = decode.beam_search(model, a[:1], beam_size=2, max_extra_length=3)
    n = int(decode.hypothesis_lengths(alone)[0])
    np.testing.assert_array_equal(ta[0, :n], np.asarray(alone)[0, :n])
