"""Scaled dot-product and multi-head attention (section 3.2), masks, and the decoding cache.

Attention goes through `jax.nn.dot_product_attention`, so that GPUs can run cuDNN's fused
(flash) kernel: `model.attention_impl` 'auto' picks 'cudnn' where the backend, dtype and head
width allow it and 'xla' otherwise. Two cases need the attention weights themselves and take
the explicit formula below: attention-probability dropout (an option, off by default) and
a module built or viewed with `sow_weights=True`, which sows them (`nnx.Intermediate`
'attention_weights', as Flax's own attention does) for `nnx.capture` to collect: the
attention plot and the alignments (model.attention_weights). Nothing else computes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Masked logits get this instead of -inf (section 3.2.3): identical weights wherever a row has
# at least one visible key, and no NaN in the all-masked rows of padding queries.
MASK_VALUE = -1e9
IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'explicit')


def attention_mask(q_segmentation: jax.Array, k_segmentation: jax.Array,
                   causal: bool = False) -> jax.Array:
    """Boolean mask [batch, 1, q_len, k_len]: True where a query may attend to a key.

    Segment ids are 1, 2, ... for the packed examples of a row and 0 for padding, so a query sees
    only keys of its own example, never padding, and (causal) never a later position.
    """
    mask = (q_segmentation[:, :, None] == k_segmentation[:, None, :])
    mask &= (k_segmentation[:, None, :] > 0)
    if causal:
        q_len, k_len = q_segmentation.shape[1], k_segmentation.shape[1]
        mask &= jnp.arange(q_len)[:, None] >= jnp.arange(k_len)[None, :]
    return mask[:, None]


def resolve_implementation(name: str, dtype, d_k: int, d_v: int,
                           platform: str | None = None) -> str:
    """'xla', 'cudnn' or 'explicit' for model.attention_impl `name` ('auto' decides between
    the first two for `platform`, default: JAX's default backend)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f'model.attention_impl={name!r}; valid: {", ".join(IMPLEMENTATIONS)}')
    if name != 'auto':
        return name
    # cuDNN's fused kernel: GPU, 16-bit inputs, equal query/value widths, a multiple of 8 up
    # to 128 (jax.nn.dot_product_attention checks the rest and says what it refuses).
    fits = ((platform or jax.default_backend()) == 'gpu' and jnp.dtype(dtype).itemsize == 2
            and d_k == d_v and d_k % 8 == 0 and d_k <= 128)
    return 'cudnn' if fits else 'xla'


def einsum_f32(spec: str, a, b):
    """jnp.einsum accumulated and returned in float32. XLA:CPU has no float16 x float16 ->
    float32 product ('F16_F16_F32 is not supported by dot_general on CPU'): there float16
    operands are widened first, which gives the same numbers (a product of two float16
    values is exact in float32), so float16 runs (and their tests) work on a CPU too. It
    goes by the host's backend: a float16 pre-flight for a GPU planned on a CPU host compiles
    the widened products (float16 only; bfloat16 is untouched)."""
    if jax.default_backend() == 'cpu' and jnp.float16 in (a.dtype, b.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def attention_weights(q, k, mask, dropout: nnx.Dropout | None = None, rngs=None):
    """softmax(Q K^T / sqrt(d_k)) (section 3.2.1) as weights [batch, heads, q_len, k_len],
    in float32 whatever the compute dtype; q, k are [batch, len, heads, d_k]. Q K^T is
    accumulated and scaled in float32, as jax.nn.dot_product_attention does, not rounded to a
    16-bit compute dtype before the softmax."""
    depth = q.shape[-1]
    logits = einsum_f32('bqhd,bkhd->bhqk', q, k)
    logits = jnp.where(mask, logits / np.sqrt(depth).astype(np.float32), MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout is not None and rngs is not None:
        weights = dropout(weights, rngs=rngs)
    return weights


def explicit_attention(q, k, v, mask, dropout: nnx.Dropout | None = None, rngs=None):
    """(output [batch, q_len, heads, d_v], weights [batch, heads, q_len, k_len]) by the
    formula of section 3.2.1, for q, k [.., d_k], v [.., d_v] under `mask`."""
    weights = attention_weights(q, k, mask, dropout, rngs)
    return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v), weights


def dot_product_attention(q, k, v, mask, *, implementation: str = 'xla',
                          dropout: nnx.Dropout | None = None, rngs=None):
    """Attention output [batch, q_len, heads, d_v] of q, k [.., d_k], v [.., d_v] under `mask`."""
    explicit = (implementation == 'explicit' or (dropout is not None and rngs is not None)
                or q.shape[-1] != v.shape[-1]  # jax's function wants one head width
                # and on the CPU multiplies float16 into float32, which XLA:CPU lacks
                or (q.dtype == jnp.float16 and jax.default_backend() == 'cpu'))
    if not explicit:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return explicit_attention(q, k, v, mask, dropout, rngs)[0]


def attend_step(q, k, v, mask):
    """One decoding step's attention (section 3.2.1) over keys and values laid out head-major,
    k [batch, heads, len, d_k] and v [batch, heads, len, d_v], the layout of the decoding
    cache: the einsums read the cache as it lies (no per-step transpose copy of it, which cost
    as much as the attention itself on a CPU). q is [batch, 1, heads, d_k], `mask` broadcasts to
    [batch, heads, 1, len]; logits and softmax in float32, as jax.nn.dot_product_attention.
    Returns [batch, 1, heads, d_v]."""
    qh = jnp.swapaxes(q, 1, 2)  # [batch, heads, 1, d_k]: one query per row, a cheap transpose
    logits = einsum_f32('bhqd,bhkd->bhqk', qh, k)
    logits = jnp.where(mask, logits / np.sqrt(q.shape[-1]).astype(np.float32), MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bhkd->bhqd', weights.astype(v.dtype), v)
    return jnp.swapaxes(out, 1, 2)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention (section 3.2.2): h heads of width d_k (queries, keys), d_v (values)."""

    def __init__(self, d_model: int, num_heads: int, d_k: int, d_v: int, *, dropout_rate=0.0,
                 implementation: str = 'xla', use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, sow_weights: bool = False, rngs: nnx.Rngs):
        self.num_heads, self.d_k, self.d_v = num_heads, d_k, d_v
        self.implementation = implementation
        # Static: a module that sows its weights is another graph, compiled apart from the
        # training step's (nnx.with_attributes(model, sow_weights=True) makes one).
        self.sow_weights = sow_weights
        init = nnx.initializers.xavier_uniform()
        zeros = nnx.initializers.zeros

        def dense(n_in, n_out, names):  # no biases by default: section 3.2.2
            return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype,
                              param_dtype=param_dtype,
                              kernel_init=nnx.with_partitioning(init, names),
                              bias_init=nnx.with_partitioning(zeros, names[1:]), rngs=rngs)

        self.query = dense(d_model, num_heads * d_k, ('embed', 'heads'))
        self.key = dense(d_model, num_heads * d_k, ('embed', 'heads'))
        self.value = dense(d_model, num_heads * d_v, ('embed', 'heads'))
        self.out = dense(num_heads * d_v, d_model, ('heads', 'embed'))
        self.dropout = nnx.Dropout(dropout_rate) if dropout_rate > 0 else None

    def _split(self, x, depth):
        return x.reshape(x.shape[:-1] + (self.num_heads, depth))

    def _merge(self, out):
        return self.out(out.reshape(out.shape[:-2] + (self.num_heads * self.d_v,)))

    def project_kv(self, x):
        """Keys and values [batch, len, heads, d] of `x`."""
        return self._split(self.key(x), self.d_k), self._split(self.value(x), self.d_v)

    def cache_kv(self, x):
        """Keys and values of `x` laid out for decoding, head-major [batch, heads, len, d]
        (the encoder output's, once per sentence; see attend_step)."""
        k, v = self.project_kv(x)
        return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def __call__(self, x, kv_input, mask, *, rngs=None):
        """Attends from `x` [batch, q_len, d_model] to `kv_input` [batch, k_len, d_model].

        With `sow_weights`, also sows the weights [batch, heads, q_len, k_len] as
        nnx.Intermediate 'attention_weights'.
        """
        q = self._split(self.query(x), self.d_k)
        k, v = self.project_kv(kv_input)
        if not self.sow_weights:
            return self._merge(dot_product_attention(
                q, k, v, mask, implementation=self.implementation, dropout=self.dropout,
                rngs=rngs))
        out, weights = explicit_attention(q, k, v, mask, self.dropout, rngs)
        self.sow(nnx.Intermediate, 'attention_weights', weights)
        return self._merge(out)

    def cached_self_attention(self, x, cache, index):
        """One decoding step of causal self-attention over a key/value cache.

        `x` is [batch, 1, d_model], `cache` a (k, v) pair of head-major [batch, heads, max_len,
        d] buffers, `index` the position being decoded. Writes this step's key and value into
        the buffers at `index` (in place: the buffers are the decoding loop's own) and attends
        to positions 0..index, so a step never recomputes the prefix.
        """
        k_new, v_new = self.cache_kv(x)
        k_cache = jax.lax.dynamic_update_slice_in_dim(
            cache[0], k_new.astype(cache[0].dtype), index, 2)
        v_cache = jax.lax.dynamic_update_slice_in_dim(
            cache[1], v_new.astype(cache[1].dtype), index, 2)
        mask = (jnp.arange(k_cache.shape[2]) <= index)[None, None, None, :]
        q = self._split(self.query(x), self.d_k)
        return self._merge(attend_step(q, k_cache, v_cache, mask)), (k_cache, v_cache)

    def cached_cross_attention(self, x, kv, mask):
        """One decoding step of encoder-decoder attention over the encoder output's keys and
        values `kv` (cache_kv), `mask` [batch, 1, 1, src_len]."""
        q = self._split(self.query(x), self.d_k)
        return self._merge(attend_step(q, kv[0], kv[1], mask))
