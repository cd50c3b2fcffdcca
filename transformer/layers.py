"""The layers of section 3: the position-wise feed-forward network (3.3), the residual
wrapper with layer normalisation (3.1, 5.4), encoder and decoder layers built of
multi-head attention (3.2), and stacks of identical layers run in a scan.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from transformer.multi_head_attention import MultiHeadAttention, resolve_implementation


class FeedForward(nnx.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (section 3.3)."""

    def __init__(self, d_model, d_ff, relu_dropout_rate, dtype, param_dtype, rngs):
        init = nnx.initializers.xavier_uniform()
        zeros = nnx.initializers.zeros
        self.w1 = nnx.Linear(d_model, d_ff, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=nnx.with_partitioning(init, ('embed', 'mlp')),
                             bias_init=nnx.with_partitioning(zeros, ('mlp',)), rngs=rngs)
        self.w2 = nnx.Linear(d_ff, d_model, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=nnx.with_partitioning(init, ('mlp', 'embed')),
                             bias_init=nnx.with_partitioning(zeros, ('embed',)), rngs=rngs)
        self.dropout = nnx.Dropout(relu_dropout_rate) if relu_dropout_rate > 0 else None

    def __call__(self, x, rngs=None):
        h = jax.nn.relu(self.w1(x))
        if self.dropout is not None and rngs is not None:
            h = self.dropout(h, rngs=rngs)
        return self.w2(h)


def layer_norm(cfg, dtype, param_dtype, rngs):
    return nnx.LayerNorm(
        cfg.d_model, epsilon=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ('embed',)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('embed',)), rngs=rngs)


class Residual(nnx.Module):
    """The residual wrapper around each sub-layer (sections 3.1 and 5.4).

    post-LN (the paper): LayerNorm(x + Dropout(Sublayer(x))).
    pre-LN (option):     x + Dropout(Sublayer(LayerNorm(x))).

    A layer reads its sub-layer's input from `sublayer_input(x)` and adds the sub-layer's
    output with `residual(x, y)`: a sub-layer returns whatever it returns (a decoding step's
    cache too), and nothing passes through a callback.
    """

    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.pre = cfg.norm == 'pre'
        self.norm = layer_norm(cfg, dtype, param_dtype, rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def sublayer_input(self, x):
        return self.norm(x) if self.pre else x

    def __call__(self, x, y, rngs=None):
        """x + Dropout(y), normalised after (post-LN) or not (pre-LN); y = Sublayer(..)."""
        if rngs is not None:
            y = self.dropout(y, rngs=rngs)
        return x + y if self.pre else self.norm(x + y)


def _attention(cfg, dtype, param_dtype, rngs):
    return MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.d_k, cfg.d_v,
                              dropout_rate=cfg.attention_dropout_rate,
                              implementation=resolve_implementation(cfg.attention_impl, dtype,
                                                                    cfg.d_k, cfg.d_v),
                              use_bias=cfg.attention_bias, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.self_attention = _attention(cfg, dtype, param_dtype, rngs)
        self.attention_residual = Residual(cfg, dtype, param_dtype, rngs)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.relu_dropout_rate, dtype, param_dtype,
                               rngs)
        self.ffn_residual = Residual(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, mask, rngs=None):
        h = self.attention_residual.sublayer_input(x)
        x = self.attention_residual(x, self.self_attention(h, h, mask, rngs=rngs), rngs)
        return self.ffn_residual(x, self.ffn(self.ffn_residual.sublayer_input(x), rngs), rngs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        self.self_attention = _attention(cfg, dtype, param_dtype, rngs)
        self.self_residual = Residual(cfg, dtype, param_dtype, rngs)
        self.cross_attention = _attention(cfg, dtype, param_dtype, rngs)
        self.cross_residual = Residual(cfg, dtype, param_dtype, rngs)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.relu_dropout_rate, dtype, param_dtype,
                               rngs)
        self.ffn_residual = Residual(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, encoded, self_mask, cross_mask, rngs=None):
        h = self.self_residual.sublayer_input(x)
        x = self.self_residual(x, self.self_attention(h, h, self_mask, rngs=rngs), rngs)
        h = self.cross_residual.sublayer_input(x)
        x = self.cross_residual(x, self.cross_attention(h, encoded, cross_mask, rngs=rngs), rngs)
        return self.ffn_residual(x, self.ffn(self.ffn_residual.sublayer_input(x), rngs), rngs)

    def step(self, x, self_cache, cross_kv, cross_mask, index):
        """One cached decoding step (no dropout): x is [batch, 1, d_model]. Returns (x, this
        layer's self-attention cache with the step's key and value written in)."""
        y, self_cache = self.self_attention.cached_self_attention(
            self.self_residual.sublayer_input(x), self_cache, index)
        x = self.self_residual(x, y)
        y = self.cross_attention.cached_cross_attention(
            self.cross_residual.sublayer_input(x), cross_kv, cross_mask)
        x = self.cross_residual(x, y)
        return self.ffn_residual(x, self.ffn(self.ffn_residual.sublayer_input(x))), self_cache


# -- stacks of identical layers -------------------------------------------------------------------
# A stack's parameters are stacked on a leading 'layers' axis and the layers run in a
# lax.scan: the step traces and compiles one layer per stack instead of N (trace time of the
# base step: see benchmarks/step_cost.py), and rematerialisation is one jax.checkpoint around
# the scanned layer.


def layer_stack(layer_class, count: int, cfg, dtype, param_dtype, rngs: nnx.Rngs):
    """`count` layers built as one module whose parameters have a leading axis of `count`."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def create(rngs):
        return layer_class(cfg, dtype, param_dtype, rngs)

    return create(rngs)


def each_layer(stack) -> list:
    """The layers of a stack as separate modules (static slices of the stacked parameters),
    for code that runs them one by one: a decoding step (see Transformer.decode_step)."""
    graphdef, state = nnx.split(stack)
    count = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], state)) for i in range(count)]


def scan_layers(stack, x, body, *, rngs=None, remat: bool = False, unroll: bool = False):
    """Runs `body(layer, x, layer_rngs) -> x` over the layers of `stack`, each layer with its
    own dropout key when `rngs` is given; returns the last layer's x.

    What the layers sow (nnx.Intermediate: the attention weights of a model viewed with
    sow_weights=True) comes out of the scan stacked on a leading layer axis and is sown on
    `stack`'s own sub-modules, where an nnx.capture of the whole model finds it. A model that
    sows nothing (training, decoding) scans exactly what it scanned before sowing existed.
    """
    graphdef, state = nnx.split(stack)
    count = jax.tree.leaves(state)[0].shape[0]
    keys = jax.random.split(rngs.dropout(), count) if rngs is not None else None

    def step(carry, layer_inputs):
        layer_state, key = layer_inputs
        layer_rngs = nnx.Rngs(dropout=key) if key is not None else None
        return nnx.capture(body, nnx.Intermediate)(nnx.merge(graphdef, layer_state), carry,
                                                    layer_rngs)

    if remat:  # keep only each layer's input for the backward pass; recompute the rest
        # Unrolled, XLA's common-subexpression elimination would merge the recomputation with
        # the forward pass and keep every activation (prevent_cse=False suits a scan only).
        step = jax.checkpoint(step, prevent_cse=unroll)
    x, sown = jax.lax.scan(step, x, (state, keys), unroll=count if unroll else 1)
    for path, stacked in nnx.to_flat_state(sown):
        module = functools.reduce(getattr, path[:-1], stack)
        module.sow(nnx.Intermediate, path[-1], stacked.get_value(),
                   reduce_fn=lambda _, value: value)  # already a tuple, as sow makes it
    return x
