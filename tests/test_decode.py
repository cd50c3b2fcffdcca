"""The searches against exhaustive search on a tiny model: beam search and its n-best lists,
greedy decoding, ensembles, sampling, and forced decoding."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import config as config_lib
from transformer import host_decode, search, sharding
from transformer.model import create_model
from transformer.tokenizer import EOS_ID, PAD_ID

VOCAB = 5  # PAD, EOS and three words
WORDS = (2, 3, 4)


def tiny_model(seed=0, vocab=VOCAB, max_position=32):
    c = config_lib.shrink(config_lib.base_config())
    c.vocab_size = vocab
    c.model.update(num_encoder_layers=2, num_decoder_layers=2, d_model=16, d_ff=32,
                   num_heads=2, d_k=8, d_v=8, max_position=max_position, dtype='float32')
    return create_model(c, seed=seed)


def sources(rows, length, seed=0, words=WORDS):
    """Random sources of 1..length-1 words, EOS-terminated, PAD-padded."""
    rng = np.random.default_rng(seed)
    x = np.zeros((rows, length), np.int32)
    for r in range(rows):
        n = rng.integers(1, length)
        x[r, :n] = rng.choice(words, n)
        x[r, n] = EOS_ID
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
def _token_log_probs(graphdef, params, inputs, targets):
    logp = jax.nn.log_softmax(_forward(graphdef, params, inputs, targets), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def sequence_log_probs(models, inputs, targets):
    """log p(targets | inputs) per row from teacher-forced passes; for several models, the
    log of their mean probability at each token, summed (written apart from search.py)."""
    models = models if isinstance(models, list) else [models]
    per_model = np.stack([np.asarray(_token_log_probs(*nnx.split(m), jnp.asarray(inputs),
                                                      jnp.asarray(targets))) for m in models])
    mixed = np.log(np.mean(np.exp(per_model.astype(np.float64)), axis=0))
    return np.sum(np.where(np.asarray(targets) != PAD_ID, mixed, 0.0), axis=1)


def all_hypotheses(models, source, max_len, alpha):
    """Every EOS-terminated hypothesis of at most max_len tokens: (hypotheses, scores,
    log-probabilities), scored in one batch."""
    hyps = [list(words) + [EOS_ID]
            for n in range(max_len) for words in itertools.product(WORDS, repeat=n)]
    targets = np.zeros((len(hyps), max_len), np.int32)
    for i, h in enumerate(hyps):
        targets[i, :len(h)] = h
    inputs = np.repeat(source[None], len(hyps), axis=0)
    lengths = np.array([len(h) for h in hyps])
    log_probs = sequence_log_probs(models, inputs, targets)
    return hyps, log_probs / ((5 + lengths) / 6) ** alpha, log_probs


def as_list(row):
    """A hypothesis up to and including its EOS."""
    row = np.asarray(row)
    return row[:int(search.hypothesis_lengths(row))].tolist()


def max_lengths(inputs, extra):
    return (np.asarray(inputs) != PAD_ID).sum(1) + extra


@pytest.mark.parametrize('seed, alpha', [(24, 0.6), (22, 2.0)])
def test_wide_beam_finds_the_exhaustive_best(seed, alpha):
    """Beam 27 holds every live hypothesis of 3 words over 3 words, so it is exhaustive."""
    model = tiny_model(seed=seed)
    inputs = sources(8, 3, seed=seed)  # 1-2 words + EOS: at most 3 or 4 output tokens
    found = search.beam_search(model, inputs, beam_size=27, alpha=alpha, max_extra_length=1)
    lengths = set()
    for r in range(len(inputs)):
        hyps, scores, _ = all_hypotheses(model, inputs[r], int(max_lengths(inputs, 1)[r]),
                                         alpha)
        best = int(np.argmax(scores))
        assert as_list(found.tokens[r, 0]) == hyps[best]
        np.testing.assert_allclose(found.scores[r, 0], scores[best], rtol=1e-5, atol=1e-5)
        lengths.add(len(hyps[best]))
    assert lengths != {1}, 'the test model only ever prefers EOS'


def test_nbest_is_the_exhaustive_k_best_in_order():
    model = tiny_model(seed=24)
    inputs = sources(6, 3, seed=24)
    k = 6
    found = search.beam_search(model, inputs, beam_size=27, alpha=0.6, max_extra_length=1,
                               nbest=k)
    assert found.tokens.shape[:2] == (6, k)
    for r in range(len(inputs)):
        hyps, scores, log_probs = all_hypotheses(model, inputs[r],
                                                 int(max_lengths(inputs, 1)[r]), 0.6)
        order = np.argsort(-scores)[:k]
        assert [as_list(t) for t in found.tokens[r]] == [hyps[i] for i in order]
        np.testing.assert_allclose(found.scores[r], scores[order], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(found.log_probs[r], log_probs[order], rtol=1e-5, atol=1e-5)


def eos_happy_model():
    """A model that ends after a word or two, so that early stopping has work to do."""
    model = tiny_model(seed=13, vocab=11)
    embedding = model.embed.embedding
    embedding[...] = embedding[...].at[EOS_ID].multiply(2.0)
    return model


def test_early_stopping_changes_nothing_and_an_nbest_list_waits_for_its_last_entry():
    """Stopping early gives what running every sentence to its maximum length gives, for the
    1-best and for a 4-best list; the 4-best list stops later than the 1-best (its 4th entry
    must be settled), and its first entry is the 1-best."""
    model = eos_happy_model()
    inputs = sources(6, 5, seed=12)
    one = search.beam_search(model, inputs, beam_size=4, max_extra_length=20)
    four = search.beam_search(model, inputs, beam_size=4, max_extra_length=20, nbest=4)
    full = search.beam_search(model, inputs, beam_size=4, max_extra_length=20, nbest=4,
                              early_stop=False)
    np.testing.assert_array_equal(one.tokens, full.tokens[:, :1])
    np.testing.assert_allclose(one.scores, full.scores[:, :1], rtol=1e-6)
    np.testing.assert_array_equal(four.tokens, full.tokens)
    assert np.all(np.diff(np.asarray(four.scores), axis=1) <= 0)  # best first
    assert int(one.steps) < int(four.steps) < int(full.steps), 'no early stop to test'


def test_beam_respects_max_length_and_ends_with_eos():
    model = tiny_model(seed=3)
    inputs = sources(5, 6, seed=4)
    found = search.beam_search(model, inputs, beam_size=4, alpha=0.6, max_extra_length=2)
    tokens = np.asarray(found.tokens[:, 0])
    src_len = (inputs != 0).sum(1)
    for r in range(len(inputs)):
        n = int(search.hypothesis_lengths(tokens)[r])
        assert tokens[r, n - 1] == EOS_ID
        assert n <= src_len[r] + 2
        assert (tokens[r, n:] == PAD_ID).all()
        assert PAD_ID not in tokens[r, :n]


def test_greedy_is_teacher_forced_argmax_and_cold_sampling_is_greedy():
    model = tiny_model(seed=5, vocab=11)
    inputs = sources(4, 5, seed=6)
    found = search.greedy(model, inputs, max_extra_length=3)
    tokens = np.asarray(found.tokens[:, 0])
    logits = np.array(forward(model, inputs, tokens))
    logits[..., PAD_ID] = -np.inf  # PAD (the start symbol) is never produced
    max_len = max_lengths(inputs, 3)
    for r in range(len(inputs)):
        n = int(search.hypothesis_lengths(tokens)[r])
        expected = logits[r, :n].argmax(-1)
        if n == max_len[r]:
            expected[-1] = EOS_ID  # forced at the maximum length
        np.testing.assert_array_equal(tokens[r, :n], expected)
    np.testing.assert_allclose(found.log_probs[:, 0], sequence_log_probs(model, inputs, tokens),
                               atol=1e-4)
    # Sampling at a temperature near 0 is greedy decoding.
    cold = draw(model, inputs, seed=1, num_samples=2, temperature=1e-4, max_extra_length=3)
    for j in range(2):
        np.testing.assert_array_equal(cold.tokens[:, j], found.tokens[:, 0])
    np.testing.assert_allclose(cold.log_probs[:, 1], found.log_probs[:, 0], rtol=1e-5)


def test_beam_one_is_greedy_and_beam_four_scores_at_least_greedy():
    model = tiny_model(seed=7, vocab=11)
    inputs = sources(6, 5, seed=8)
    greedy = search.greedy(model, inputs, max_extra_length=4)
    one = search.beam_search(model, inputs, beam_size=1, alpha=0.6, max_extra_length=4)
    np.testing.assert_array_equal(one.tokens, greedy.tokens)
    lengths = search.hypothesis_lengths(greedy.tokens[:, 0])
    np.testing.assert_allclose(one.scores[:, 0],
                               greedy.log_probs[:, 0] / ((5 + lengths) / 6) ** 0.6, rtol=1e-6)
    # Greedy's hypothesis is always among beam search's candidates.
    four = search.beam_search(model, inputs, beam_size=4, alpha=0.6, max_extra_length=4)
    assert np.all(np.asarray(four.scores[:, 0]) >= np.asarray(one.scores[:, 0]) - 1e-5)


# -- ensembles ----------------------------------------------------------------------------------


def test_an_ensemble_of_one_model_twice_is_that_model():
    model = tiny_model(seed=7, vocab=11)
    inputs = sources(4, 5, seed=3)
    alone = search.beam_search(model, inputs, beam_size=3, max_extra_length=4, nbest=3)
    twice = search.beam_search([model, model], inputs, beam_size=3, max_extra_length=4, nbest=3)
    np.testing.assert_array_equal(twice.tokens, alone.tokens)
    np.testing.assert_allclose(twice.scores, alone.scores, rtol=1e-5, atol=1e-6)


def test_an_ensemble_of_two_models_is_the_brute_force_ensemble():
    """The exhaustive beam over two models finds the best hypotheses under the mean of their
    probabilities at each token, computed here from each model's teacher-forced pass."""
    models = [tiny_model(seed=24), tiny_model(seed=22)]
    inputs = sources(6, 3, seed=5)
    found = search.beam_search(models, inputs, beam_size=27, alpha=0.6, max_extra_length=1,
                               nbest=3)
    differs = False
    for r in range(len(inputs)):
        max_len = int(max_lengths(inputs, 1)[r])
        hyps, scores, log_probs = all_hypotheses(models, inputs[r], max_len, 0.6)
        order = np.argsort(-scores)[:3]
        assert [as_list(t) for t in found.tokens[r]] == [hyps[i] for i in order]
        np.testing.assert_allclose(found.log_probs[r], log_probs[order], rtol=1e-5, atol=1e-5)
        alone = [list(np.argsort(-all_hypotheses(m, inputs[r], max_len, 0.6)[1])[:3])
                 for m in models]
        differs |= list(order) not in alone
    assert differs, 'the ensemble always ranks as one of its members: a weak test'


# -- sampling -------------------------------------------------------------------------------------


def draw(models, inputs, ids=None, **kwargs):
    graphdefs, params = search.split(models)
    ids = np.arange(len(inputs)) if ids is None else ids
    return search.sample(graphdefs, params, inputs, ids, **kwargs)


def first_token_distribution(model, source, temperature=1.0, top_p=1.0):
    """What the first token should be drawn from, computed from the teacher-forced logits in
    float64: PAD removed, temperature applied, cut to the nucleus, renormalised."""
    logits = np.asarray(forward(model, source[None], np.full((1, 1), EOS_ID)))[0, 0]
    x = logits.astype(np.float64) / temperature
    x[PAD_ID] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.cumsum(p[order]) - p[order] < top_p
    q = np.zeros_like(p)
    q[order[keep]] = p[order[keep]]
    return q / q.sum()


@pytest.mark.parametrize('temperature, top_p', [(1.0, 1.0), (0.7, 0.8)])
def test_first_tokens_follow_the_models_distribution(temperature, top_p):
    """4000 samples of one sentence: the empirical first-token distribution is within a total
    variation of 0.04 of the expected one and passes a chi-square test at the 0.1 % level."""
    model = tiny_model(seed=9, vocab=11)
    source = sources(1, 5, seed=2, words=range(2, 11))
    n = 4000
    found = draw(model, source, seed=3, num_samples=n, temperature=temperature, top_p=top_p,
                 max_extra_length=0)
    counts = np.bincount(np.asarray(found.tokens[0, :, 0]), minlength=11)
    expected = first_token_distribution(model, source[0], temperature, top_p)
    assert counts[expected == 0].sum() == 0, 'a token outside the nucleus was drawn'
    assert 0.5 * np.abs(counts / n - expected).sum() < 0.04
    seen = expected > 0
    chi2 = np.sum((counts[seen] - n * expected[seen]) ** 2 / (n * expected[seen]))
    assert float(jax.scipy.stats.chi2.sf(chi2, seen.sum() - 1)) > 1e-3, chi2
    if top_p < 1:
        assert 2 <= seen.sum() < 10, 'the nucleus should cut some tokens, not all'


def test_top_k_never_draws_outside_the_k_best():
    model = tiny_model(seed=9, vocab=11)
    inputs = sources(4, 5, seed=4, words=range(2, 11))
    found = draw(model, inputs, seed=5, num_samples=50, top_k=3, temperature=2.0,
                 max_extra_length=4)
    tokens = np.asarray(found.tokens).reshape(200, -1)
    rows = np.repeat(inputs, 50, axis=0)
    logits = np.array(forward(model, rows, tokens))
    logits[..., PAD_ID] = -np.inf
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    lengths = np.asarray(search.hypothesis_lengths(tokens))
    max_len = max_lengths(rows, 4)
    checked = 0
    for r in range(len(tokens)):
        for t in range(lengths[r]):
            if t + 1 == max_len[r]:
                assert tokens[r, t] == EOS_ID  # forced at the maximum length
            else:
                assert tokens[r, t] in top3[r, t], (r, t)
                checked += 1
    assert checked > 400
    assert len(np.unique(tokens[:, 0])) > 1, 'top-k 3 at temperature 2 should vary'


def test_samples_do_not_depend_on_the_batch():
    """Sample j of sentence i comes from (seed, i, j): the same whatever else is in the batch
    and wherever in it (other batch sizes and orders: test_evaluate_cli's Translator test),
    and asking for more samples keeps the first ones."""
    model = tiny_model(seed=9, vocab=11)
    inputs = sources(5, 6, seed=7, words=range(2, 11))
    ids = np.array([10, 11, 12, 13, 14])
    settings = host_decode.Settings(sampling=True, num_samples=3, seed=4, max_extra_length=3)
    decoder = host_decode.Decoder(model, settings, batch_size=8)
    batch8 = decoder(inputs, ids)
    part = decoder(inputs[[3, 1]], ids[[3, 1]])  # other rows around them, other positions
    n = min(part.tokens.shape[2], batch8.tokens.shape[2])  # each shape has its own bound
    np.testing.assert_array_equal(part.tokens[:, :, :n], batch8.tokens[[3, 1], :, :n])
    more = host_decode.Decoder(model, dataclasses.replace(settings, num_samples=5),
                               batch_size=8)(inputs, ids)
    np.testing.assert_array_equal(more.tokens[:, :3, :batch8.tokens.shape[2]], batch8.tokens)
    other = host_decode.Decoder(model, dataclasses.replace(settings, seed=5), batch_size=8)
    assert not np.array_equal(other(inputs, ids).tokens, batch8.tokens)


# -- forced decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize('ensemble', [False, True])
def test_forced_decoding_gives_the_beams_own_scores(ensemble):
    models = [tiny_model(seed=13, vocab=11), tiny_model(seed=14, vocab=11)][:1 + ensemble]
    inputs = sources(6, 6, seed=15, words=range(2, 11))
    decoder = host_decode.Decoder(
        models, host_decode.Settings(beam_size=3, nbest=3, max_extra_length=3), batch_size=18)
    found = decoder(inputs)
    targets = found.tokens.reshape(18, -1)
    log_probs, tokens = decoder.score(np.repeat(inputs, 3, axis=0), targets)
    np.testing.assert_allclose(log_probs, found.log_probs.reshape(-1), rtol=1e-4, atol=1e-4)
    lengths = np.asarray(search.hypothesis_lengths(targets))
    np.testing.assert_array_equal(tokens, lengths)
    np.testing.assert_allclose(log_probs / ((5 + lengths) / 6) ** 0.6, found.scores.reshape(-1),
                               rtol=1e-4, atol=1e-4)


# -- the host-side Decoder ------------------------------------------------------------------------


def test_sharded_decoding_matches_unsharded():
    assert jax.device_count() == 8
    model = tiny_model(seed=13, vocab=11)
    inputs = sources(8, 6, seed=14)
    mesh = sharding.make_mesh()
    for beam in (1, 3):
        want = search.beam_search(model, inputs, beam_size=beam, alpha=0.6, max_extra_length=5)
        decoder = host_decode.Decoder(
            model, host_decode.Settings(beam_size=beam, max_extra_length=5), batch_size=8,
            mesh=mesh)
        got = decoder(inputs)
        n = min(got.tokens.shape[2], want.tokens.shape[2])
        np.testing.assert_array_equal(got.tokens[..., :n], np.asarray(want.tokens)[..., :n])
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)


def test_decoder_buckets_lengths_and_pads_rows():
    model = tiny_model(seed=15, vocab=11, max_position=64)
    decoder = host_decode.Decoder(model, host_decode.Settings(beam_size=2, max_extra_length=3),
                                  batch_size=4)
    a = sources(3, 5, seed=16)
    b = sources(2, 7, seed=17)
    ta = decoder(a).tokens
    tb = decoder(b).tokens
    assert ta.shape[0] == 3 and tb.shape[0] == 2
    assert decoder.shapes_compiled == {(4, 8)}
    # Padding the batch does not change a sentence's translation.
    alone = search.beam_search(model, a[:1], beam_size=2, max_extra_length=3).tokens[0, 0]
    n = int(search.hypothesis_lengths(alone))
    np.testing.assert_array_equal(ta[0, 0, :n], np.asarray(alone)[:n])


def test_settings_name_the_field_out_of_range():
    config = config_lib.shrink(config_lib.base_config())
    for given, message in [
            (dict(beam_size=0), 'decode.beam_size=0 must be >= 1'),
            (dict(nbest=5), 'nbest=5 must be at most the beam size (4)'),
            (dict(sampling=True, temperature=0.0), 'temperature=0.0 must be > 0'),
            (dict(sampling=True, top_p=1.5), 'top_p=1.5 must be in (0, 1]'),
            (dict(sampling=True, top_p=0.0), 'top_p=0.0 must be in (0, 1]'),
            (dict(top_k=3), 'top_k=3 applies to sampling only'),
            (dict(sampling=True, nbest=2), 'nbest=2 is for beam search'),
            (dict(sampling=True, top_k=999), 'top_k=999 must be at most the vocabulary size')]:
        with pytest.raises(host_decode.SettingError, match=message.replace('(', r'\(').replace(
                ')', r'\)')):
            host_decode.settings(config, **given)
    with pytest.raises(host_decode.SettingError, match=r'top_k=20 must be at most the vocabulary'):
        host_decode.Decoder(tiny_model(vocab=11), host_decode.Settings(sampling=True, top_k=20))


# -- constraints: a forced target prefix, no repeated n-grams -----------------------------------


def prefix_rows(prefixes, width):
    rows = np.zeros((len(prefixes), width), np.int32)
    for r, p in enumerate(prefixes):
        rows[r, :len(p)] = p
    return rows


def has_repeated_ngram(hypothesis, n):
    grams = [tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1)]
    return len(grams) != len(set(grams))


def test_a_prefix_gives_the_exhaustive_best_continuations_and_an_empty_one_changes_nothing():
    """Exhaustive beam search (27 wide) of an ensemble with a prefix of 0, 1 or 2 words per
    sentence: its 3-best list is the 3 best of every hypothesis that starts with the prefix,
    its log-probabilities count the prefix's tokens; a row without a prefix gets the
    unconstrained exhaustive 3-best. Samples start with the prefix too (greedy decoding is the
    same loop, test_evaluate_cli runs it)."""
    models = [tiny_model(seed=24), tiny_model(seed=22)]
    inputs = sources(6, 3, seed=5)
    prefixes = [[], [2], [4, 3], [], [3, 3], [4]]
    prefix = prefix_rows(prefixes, 4)
    found = search.beam_search(models, inputs, beam_size=27, max_extra_length=1, nbest=3,
                               prefix=prefix)
    for r, p in enumerate(prefixes):
        hyps, scores, log_probs = all_hypotheses(models, inputs[r],
                                                 int(max_lengths(inputs, 1)[r]), 0.6)
        allowed = np.array([h[:len(p)] == p and len(h) > len(p) for h in hyps])
        scores = np.where(allowed, scores, -np.inf)
        k = min(3, int(allowed.sum()))  # [3, 3] fits one hypothesis: 3 3 EOS
        order = np.argsort(-scores)[:k]
        assert [as_list(t) for t in found.tokens[r, :k]] == [hyps[i] for i in order]
        np.testing.assert_allclose(found.log_probs[r, :k], log_probs[order], rtol=1e-5,
                                   atol=1e-5)
        assert np.all(np.asarray(found.scores[r, k:]) <= search.NEG_INF / 2)
    graphdefs, params = search.split(models)
    drawn = search.sample(graphdefs, params, inputs, np.arange(6), seed=1, num_samples=3,
                          max_extra_length=3, prefix=prefix)
    for r, p in enumerate(prefixes):
        for j in range(3):
            assert as_list(drawn.tokens[r, j])[:len(p)] == p
    np.testing.assert_allclose(
        drawn.log_probs[:, 0], sequence_log_probs(models, inputs, drawn.tokens[:, 0]),
        atol=1e-4)


def repeating_model():
    """A model that never wants to stop and says the same words again and again."""
    model = tiny_model(seed=13, vocab=11)
    embedding = model.embed.embedding
    embedding[...] = embedding[...].at[EOS_ID].multiply(-3.0)
    return model


def test_no_repeated_ngrams_in_any_search_of_a_repeating_model():
    model = repeating_model()
    inputs = sources(4, 6, seed=12, words=range(2, 11))
    graphdefs, params = search.split(model)

    def outputs(n, sampled=True):
        found = [search.beam_search(model, inputs, beam_size=4, max_extra_length=12, nbest=4,
                                    no_repeat_ngram_size=n)]
        if sampled:  # the loop greedy decoding runs too
            found.append(search.sample(graphdefs, params, inputs, np.arange(4), seed=3,
                                       num_samples=4, max_extra_length=12,
                                       no_repeat_ngram_size=n))
        return [as_list(t) for f in found
                for t in np.asarray(f.tokens).reshape(-1, f.tokens.shape[-1])]

    assert any(has_repeated_ngram(h, 2) for h in outputs(0, False)), 'the model does not repeat'
    for h in outputs(2):
        assert not has_repeated_ngram(h, 2), h


@pytest.mark.parametrize('n, beam, extra', [(1, 27, 2), (2, 81, 2)])
def test_no_repeat_ngram_beam_is_the_exhaustive_best_under_the_rule(n, beam, extra):
    """A beam wide enough to hold every hypothesis allowed finds the exhaustive 3-best among
    those without a repeated n-gram; with a prefix that itself repeats one, the prefix is kept
    and its n-grams still count."""
    model = tiny_model(seed=24)
    inputs = sources(6, 3, seed=24)
    prefixes = [[], [], [2, 2], [], [3], []] if n == 1 else [[]] * 6
    found = search.beam_search(model, inputs, beam_size=beam, max_extra_length=extra, nbest=3,
                               no_repeat_ngram_size=n, prefix=prefix_rows(prefixes, 2))
    for r, p in enumerate(prefixes):
        hyps, scores, _ = all_hypotheses(model, inputs[r], int(max_lengths(inputs, extra)[r]),
                                         0.6)
        allowed = np.array([h[:len(p)] == p and len(h) > len(p)
                            and not has_repeated_ngram(h[len(p):] if p else h, n)
                            and not set(h[len(p):-1]) & set(p) for h in hyps])
        scores = np.where(allowed, scores, -np.inf)
        k = min(3, int(allowed.sum()))
        order = np.argsort(-scores)[:k]
        assert [as_list(t) for t in found.tokens[r, :k]] == [hyps[i] for i in order], r
        np.testing.assert_allclose(found.scores[r, :k], scores[order], rtol=1e-5, atol=1e-5)
