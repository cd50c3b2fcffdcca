"""The model of section 3: positions, masks, tying, parameter counts, cached decoding, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import hand_count, tiny_config
from flax import nnx

from transformer import config as config_lib
from transformer import model as model_lib
from transformer import multi_head_attention as mha
from transformer import sharding
from transformer.model_stats import count_parameters
from transformer.multi_head_attention import attention_mask


def random_tokens(rng, shape, pad_from=None):
    x = rng.integers(3, 40, shape)
    if pad_from is not None:
        for row, start in enumerate(pad_from):
            x[row, start:] = 0
    return jnp.asarray(x, jnp.int32)


def test_sinusoids_match_section_3_5():
    table = model_lib.sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_attention_mask_padding_future_and_segments():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(seg, seg, causal=True))[0, 0]
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize('norm', ['post', 'pre'])
def test_padding_and_future_tokens_have_no_influence(norm):
    c = tiny_config(norm=norm)
    m = model_lib.create_model(c, seed=0)
    rng = np.random.default_rng(0)
    inputs = random_tokens(rng, (2, 9), pad_from=[9, 5])
    targets = random_tokens(rng, (2, 8), pad_from=[8, 6])
    logits = m(inputs, targets)
    # Padding of the source: change the padded ids (keeping them padding is implicit in
    # segments), here by passing explicit segments and garbage tokens at padded places.
    seg = (inputs != 0).astype(jnp.int32)
    garbage = jnp.where(seg == 0, 7, inputs)
    logits_garbage = m(garbage, targets, inputs_segmentation=seg)
    real = np.asarray(targets != 0)  # outputs at padded target positions are never used
    np.testing.assert_allclose(logits[real], logits_garbage[real], atol=1e-5)
    # The future: changing target t+1.. leaves logits at 0..t unchanged (they read targets
    # shifted right, so position t sees targets < t).
    t = 4
    changed = targets.at[:, t:].set(5)
    logits_changed = m(inputs, changed)
    np.testing.assert_allclose(logits[:, :t + 1], logits_changed[:, :t + 1], atol=1e-5)
    assert not np.allclose(logits[0, t + 1:], logits_changed[0, t + 1:], atol=1e-3)


def test_packed_examples_do_not_see_each_other():
    c = tiny_config()
    m = model_lib.create_model(c, seed=0)
    rng = np.random.default_rng(1)
    a_in, b_in = random_tokens(rng, (1, 4)), random_tokens(rng, (1, 3))
    a_out, b_out = random_tokens(rng, (1, 5)), random_tokens(rng, (1, 2))
    packed_in = jnp.concatenate([a_in, b_in, jnp.zeros((1, 2), jnp.int32)], 1)
    packed_out = jnp.concatenate([a_out, b_out, jnp.zeros((1, 1), jnp.int32)], 1)
    in_seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0]])
    in_pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0, 0]])
    out_seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 0]])
    out_pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 0]])
    packed = m(packed_in, packed_out, in_seg, out_seg, in_pos, out_pos)
    np.testing.assert_allclose(packed[:, :5], m(a_in, a_out), atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:7], m(b_in, b_out), atol=1e-5)


def test_one_embedding_matrix_is_shared_three_ways():
    c = tiny_config()
    m = model_lib.create_model(c, seed=0)
    params = nnx.state(m, nnx.Param)
    vocab_sized = [p for p, x in jax.tree_util.tree_leaves_with_path(params)
                   if c.vocab_size in x.shape]
    assert len(vocab_sized) == 1
    # The output projection is the embedding transposed: logits of a zeroed decoder state
    # direction e_j equal E e_j.
    x = jnp.eye(c.model.d_model)[:3][None]
    np.testing.assert_allclose(m.output_logits(x)[0], m.embed.embedding[...][:, :3].T, atol=1e-6)
    # Input embeddings read the same matrix (times sqrt(d_model), section 3.4).
    emb = m.embed_tokens(jnp.array([[5]]), jnp.array([[0]]), target=True) \
        - jnp.asarray(model_lib.sinusoidal_table(c.model.max_position, c.model.d_model))[0]
    np.testing.assert_allclose(emb[0, 0], m.embed.embedding[...][5] * math.sqrt(c.model.d_model),
                               atol=1e-5)


@pytest.mark.parametrize('preset,bias,expected', [
    ('base', False, 63_045_632), ('big', False, 214_171_648),
    ('base', True, 63_082_496), ('big', True, 214_245_376)])
def test_parameter_counts_of_base_and_big(preset, bias, expected):
    c = config_lib.apply_preset(config_lib.base_config(), preset)
    c.model.attention_bias = bias
    m = c.model
    assert hand_count(37000, m.num_encoder_layers, m.num_decoder_layers, m.d_model, m.d_ff,
                      m.num_heads, m.d_k, m.d_v, attention_bias=bias) == expected
    counts = count_parameters(c)
    assert counts['total'] == expected
    assert counts['embedding'] == 37000 * m.d_model


@pytest.mark.parametrize('norm', ['post', 'pre'])
def test_forward_returns_the_attention_it_used(norm):
    c = tiny_config(norm=norm)
    m = model_lib.create_model(c, seed=1)
    rng = np.random.default_rng(3)
    inputs = random_tokens(rng, (2, 7), pad_from=[7, 4])
    targets = random_tokens(rng, (2, 5), pad_from=[5, 3])
    logits, weights = model_lib.attention_weights(m, inputs, targets)
    np.testing.assert_allclose(logits, m(inputs, targets), atol=1e-5)
    # Only the view sows: the model itself (what training runs) computes no weights.
    _, sown = nnx.capture(m, nnx.Intermediate)(inputs, targets)
    assert not jax.tree.leaves(sown)
    layers, heads = c.model.num_encoder_layers, c.model.num_heads
    assert weights['encoder'].shape == (layers, 2, heads, 7, 7)
    assert weights['decoder'].shape == (c.model.num_decoder_layers, 2, heads, 5, 5)
    assert weights['cross'].shape == (c.model.num_decoder_layers, 2, heads, 5, 7)
    for w in weights.values():
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)  # each query's weights
    # No weight on padding keys (second row: 4 real source tokens) or on future targets
    # (first row, no padding; padding queries see nothing and spread their weight evenly).
    assert float(jnp.abs(weights['cross'][:, 1, :, :3, 4:]).max()) == 0.0
    assert float(jnp.abs(jnp.triu(weights['decoder'][:, 0], k=1)).max()) == 0.0


@pytest.mark.parametrize('overrides', [
    dict(norm='post'), dict(norm='pre'), dict(positional='learned'),
    dict(share_embeddings=False), dict(num_heads=2, d_k=4, d_v=12)])
def test_cached_decoding_equals_full_forward(overrides):
    c = tiny_config(**overrides)
    m = model_lib.create_model(c, seed=3)
    rng = np.random.default_rng(2)
    inputs = random_tokens(rng, (3, 7), pad_from=[7, 4, 2])
    targets = random_tokens(rng, (3, 6))
    full = m(inputs, targets)
    seg = (inputs != 0).astype(jnp.int32)
    cache = m.init_cache(m.encode(inputs), max_length=6)
    step = jax.jit(lambda tok, i, cache: m.decode_step(tok, i, cache, seg))
    previous = jnp.zeros((3,), jnp.int32)
    for i in range(6):
        logits, cache = step(previous, i, cache)
        np.testing.assert_allclose(logits, full[:, i], atol=1e-5, rtol=1e-5)
        previous = targets[:, i]


def create_sharded(make_model, mesh):
    """The model with every parameter created directly in its sharding (as train does)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def test_forward_sharded_over_8_devices_equals_one_device():
    assert jax.device_count() == 8
    c = tiny_config()
    rng = np.random.default_rng(4)
    inputs = random_tokens(rng, (8, 6), pad_from=[6, 5, 4, 3, 6, 5, 4, 3])
    targets = random_tokens(rng, (8, 5))
    single = model_lib.create_model(c, seed=5)
    expected = jax.jit(lambda m, x, y: m(x, y))(single, inputs, targets)
    for data, fsdp in ((8, 1), (4, 2)):
        mesh = sharding.make_mesh(data=data, fsdp=fsdp)
        m = create_sharded(lambda: model_lib.create_model(c, seed=5), mesh)
        # Same initial values as the unsharded model (up to float rounding of the init).
        for a, b in zip(jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(m))):
            np.testing.assert_allclose(a, b, atol=1e-6)
        nnx.update(m, nnx.state(single))
        bs = sharding.batch_sharding(mesh)
        x, y = jax.device_put(inputs, bs), jax.device_put(targets, bs)
        out = jax.jit(lambda m, x, y: m(x, y))(m, x, y)
        assert len(out.sharding.device_set) == 8
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_gradient_descent_lowers_the_loss_on_a_copy_task():
    c = tiny_config()
    m = model_lib.create_model(c, seed=0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(np.concatenate(
        [rng.integers(3, 40, (16, 6)), np.ones((16, 1), np.int64)], 1), jnp.int32)
    optimizer = nnx.Optimizer(m, optax.sgd(0.5), wrt=nnx.Param)

    def loss_fn(m):
        logits = m(tokens, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    @nnx.jit
    def step(m, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        optimizer.update(m, grads)
        return loss

    losses = [float(step(m, optimizer)) for _ in range(30)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]


def test_fused_attention_path_equals_the_formula():
    """jax.nn.dot_product_attention (what the model calls) against softmax(QK^T/sqrt(d))V
    written out, in float32, with padding, causal and fully masked (padding) query rows."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32) for _ in range(3))
    seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
    for causal in (False, True):
        mask = attention_mask(seg, seg, causal=causal)
        fused = mha.dot_product_attention(q, k, v, mask, implementation='xla')
        explicit, weights = mha.explicit_attention(q, k, v, mask)
        logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8)
        logits = np.where(mask, logits, -np.inf)
        with np.errstate(invalid='ignore'):  # rows with no visible key: NaN, not compared
            by_hand = np.exp(logits - logits.max(-1, keepdims=True))
            by_hand = by_hand / by_hand.sum(-1, keepdims=True)
        real = np.asarray(seg > 0)  # queries of padding see nothing; their output is unused
        np.testing.assert_allclose(np.asarray(weights).transpose(0, 2, 1, 3)[real],
                                   by_hand.transpose(0, 2, 1, 3)[real], atol=1e-6)
        np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(explicit)[real],
                                   atol=1e-6)
    assert mha.resolve_implementation('auto', jnp.bfloat16, 64, 64) == 'xla'  # on a CPU
    assert mha.resolve_implementation('cudnn', jnp.float32, 64, 64) == 'cudnn'
    with pytest.raises(ValueError, match='attention_impl'):
        mha.resolve_implementation('flash', jnp.float32, 64, 64)


def test_attention_dropout_still_applies():
    c = tiny_config(attention_dropout_rate=0.5)
    graphdef, params = nnx.split(model_lib.create_model(c, seed=0))
    rng = np.random.default_rng(8)
    inputs, targets = random_tokens(rng, (2, 6)), random_tokens(rng, (2, 5))
    plain = jax.jit(lambda p: nnx.merge(graphdef, p)(inputs, targets))(params)
    with_dropout = jax.jit(lambda p, key: nnx.merge(graphdef, p)(
        inputs, targets, rngs=nnx.Rngs(dropout=key)))  # jitted: eager NNX calls are slow
    dropped = [with_dropout(params, jax.random.key(seed)) for seed in (1, 1, 2)]
    assert not np.allclose(plain, dropped[0], atol=1e-3)
    np.testing.assert_array_equal(dropped[0], dropped[1])  # the same key, the same masks
    assert not np.allclose(dropped[0], dropped[2], atol=1e-3)


def test_logits_are_computed_in_float32_in_bfloat16_models():
    c = tiny_config(dtype='bfloat16')
    m = model_lib.create_model(c, seed=1)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 3, c.model.d_model)), jnp.bfloat16)
    logits = m.output_logits(x)
    assert logits.dtype == jnp.float32
    # The reference: the same bfloat16 inputs, multiplied and summed in float64.
    table = np.asarray(m.embed.embedding[...].astype(jnp.bfloat16), np.float64)
    exact = np.asarray(x, np.float64) @ table.T
    error = np.abs(np.asarray(logits) - exact).max()
    rounded = np.abs(np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64) - exact).max()
    assert error < 1e-4 < rounded  # bfloat16 outputs would be off by the rounding


def test_remat_gives_the_same_gradients_in_less_memory():
    rng = np.random.default_rng(10)
    inputs, targets = random_tokens(rng, (4, 12)), random_tokens(rng, (4, 10))

    def loss(graphdef, params):
        logits = nnx.merge(graphdef, params)(inputs, targets, rngs=nnx.Rngs(dropout=3))
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    grads, temps = [], []
    for remat in ('none', 'block'):
        c = tiny_config(remat=remat, dropout_rate=0.1)
        graphdef, params = nnx.split(model_lib.create_model(c, seed=2))
        fn = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
        grads.append(fn(graphdef, params))
        temps.append(fn.lower(graphdef, params).compile().memory_analysis().temp_size_in_bytes)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert temps[1] < temps[0]


def test_explicit_attention_accumulates_logits_in_float32_under_bfloat16():
    """The explicit formula (attention weights returned, attention dropout, d_k != d_v) must
    not round Q K^T to bfloat16 before the softmax: logits near 100 would lose everything
    below 0.5. Its weights equal a float32 softmax of the same bfloat16 inputs, and its output
    that of jax.nn.dot_product_attention."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 2, 16)) * 8, jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(2, 7, 2, 16)) * 8, jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(2, 7, 2, 16)), jnp.bfloat16)
    mask = jnp.ones((2, 1, 5, 7), bool)
    out, weights = mha.explicit_attention(q, k, v, mask)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32)) / 4.0
    assert float(jnp.abs(logits).max()) > 50  # large enough for bfloat16 rounding to matter
    np.testing.assert_allclose(weights, jax.nn.softmax(logits, axis=-1), atol=1e-5)
    fused = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
    np.testing.assert_allclose(out.astype(jnp.float32), fused.astype(jnp.float32), atol=2e-2)


def test_label_smoothed_cross_entropy_equals_the_soft_target_formula():
    """Section 5.4 with tensor2tensor's smoothing: 1 - eps on the reference, eps / (V - 1) on
    each other word; against float64 NumPy on the soft-target table the step never builds."""
    from transformer.train_step import cross_entropy
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)) * 4
    targets = rng.integers(0, 11, size=(3, 5))
    weights = rng.random((3, 5)) > 0.3
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    eps = 0.1
    soft = np.full(logits.shape, eps / 10)
    np.put_along_axis(soft, targets[..., None], 1 - eps, axis=-1)
    smoothed, nll, count = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                         jnp.asarray(weights), eps)
    want_nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    assert float(count) == weights.sum()
    np.testing.assert_allclose(float(nll), (want_nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(smoothed), (-(soft * log_p).sum(-1) * weights).sum(),
                               rtol=1e-5)
    plain, nll0, _ = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                   jnp.asarray(weights), 0.0)
    assert float(plain) == float(nll0) == pytest.approx(float(nll))
