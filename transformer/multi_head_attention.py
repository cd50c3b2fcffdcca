"""Scaled dot-product and multi-head attention (section 3.2), masks, and the decoding cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Masked logits get this instead of -inf (section 3.2.3): identical weights wherever a row has
# at least one visible key, and no NaN in the all-masked rows of padding queries.
MASK_VALUE = -1e9


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


def dot_product_attention(q, k, v, mask, dropout: nnx.Dropout | None = None, rngs=None):
    """softmax(Q K^T / sqrt(d_k)) V (section 3.2.1); q,k,v are [batch, len, heads, dim].

    Returns the output [batch, q_len, heads, d_v] and the weights [batch, heads, q_len, k_len].
    """
    depth = q.shape[-1]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(depth).astype(q.dtype)
    # Softmax in float32 whatever the compute dtype, for stability.
    logits = jnp.where(mask, logits.astype(jnp.float32), MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout is not None and rngs is not None:
        weights = dropout(weights, rngs=rngs)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    return out, weights


class MultiHeadAttention(nnx.Module):
    """Multi-head attention (section 3.2.2): h heads of width d_k (queries, keys), d_v (values)."""

    def __init__(self, d_model: int, num_heads: int, d_k: int, d_v: int, *, dropout_rate=0.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.d_k, self.d_v = num_heads, d_k, d_v
        init = nnx.initializers.xavier_uniform()
        zeros = nnx.initializers.zeros

        def dense(n_in, n_out, names):
            return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=nnx.with_partitioning(init, names),
                              bias_init=nnx.with_partitioning(zeros, names[1:]), rngs=rngs)

        self.query = dense(d_model, num_heads * d_k, ('embed', 'heads'))
        self.key = dense(d_model, num_heads * d_k, ('embed', 'heads'))
        self.value = dense(d_model, num_heads * d_v, ('embed', 'heads'))
        self.out = dense(num_heads * d_v, d_model, ('heads', 'embed'))
        self.dropout = nnx.Dropout(dropout_rate) if dropout_rate > 0 else None

    def _split(self, x, depth):
        return x.reshape(x.shape[:-1] + (self.num_heads, depth))

    def project_kv(self, x):
        """Keys and values [batch, len, heads, d] of `x` (once per sentence when decoding)."""
        return self._split(self.key(x), self.d_k), self._split(self.value(x), self.d_v)

    def __call__(self, x, kv_input, mask, *, rngs=None, kv=None, weights=None):
        """Attends from `x` [batch, q_len, d_model] to `kv_input` (or precomputed `kv`).

        `weights`, a list, receives the attention weights [batch, heads, q_len, k_len].
        """
        q = self._split(self.query(x), self.d_k)
        k, v = kv if kv is not None else self.project_kv(kv_input)
        out, probs = dot_product_attention(q, k, v, mask, self.dropout, rngs)
        if weights is not None:
            weights.append(probs)
        return self.out(out.reshape(out.shape[:-2] + (self.num_heads * self.d_v,)))

    def cached_self_attention(self, x, cache, index):
        """One decoding step of causal self-attention over a key/value cache.

        `x` is [batch, 1, d_model], `cache` a (k, v) pair of [batch, max_len, heads, d] buffers,
        `index` the position being decoded. Writes this step's key and value into the buffers at
        `index` and attends to positions 0..index, so a step never recomputes the prefix.
        """
        k_new, v_new = self.project_kv(x)
        k_cache = jax.lax.dynamic_update_slice_in_dim(
            cache[0], k_new.astype(cache[0].dtype), index, 1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(
            cache[1], v_new.astype(cache[1].dtype), index, 1)
        mask = (jnp.arange(k_cache.shape[1]) <= index)[None, None, None, :]
        q = self._split(self.query(x), self.d_k)
        out, _ = dot_product_attention(q, k_cache, v_cache, mask)
        out = self.out(out.reshape(out.shape[:-2] + (self.num_heads * self.d_v,)))
        return out, (k_cache, v_cache)
