"""The Transformer of "Attention Is All You Need" (section 3, Figure 1) in Flax NNX: the
embeddings and positions, the two stacks, the output logits, and cached decoding steps (its
layers are in layers.py).

Batches may be packed: segment ids (1, 2, ... per example, 0 for padding) and positions keep
examples of one row from seeing each other. Without them, padding (token 0) is masked and
positions count from 0. Dropout runs only when an `nnx.Rngs` with a 'dropout' stream is passed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from transformer.layers import (
    DecoderLayer,
    EncoderLayer,
    each_layer,
    layer_norm,
    layer_stack,
    scan_layers,
)
from transformer.multi_head_attention import (
    MultiHeadAttention,
    attention_mask,
    einsum_f32,
    resolve_implementation,
)
from transformer.sharding import constrain_batch
from transformer.tokenizer import PAD_ID  # also the decoder's start symbol

# What 'auto' model settings become on each platform: the platform of the devices a run's mesh
# spans, which for a pre-flight plan compiled on a CPU host is not the host's. scan_layers by
# compiled memory per device at the paper's batch (python -m transformer.preflight,
# benchmarks/results/2026-12-03-preflight.json): base unrolled needs 2.50 GiB a chip on
# tpu:v5e:2x4 against 4.07 scanned, 12.4 GiB on gpu:h100 against 17.0, and unrolled steps run
# faster; on the CPU scanned needs less (31.1 against 38.7 GiB, XLA:CPU keeps each unrolled
# layer's buffers apart) and compiles faster.
PLATFORM_DEFAULTS = {
    'cpu': dict(dtype='float32', scan_layers=True),
    'gpu': dict(dtype='bfloat16', scan_layers=False),
    'tpu': dict(dtype='bfloat16', scan_layers=False),
}


def _platform(platform: str | None) -> str:
    platform = platform or jax.default_backend()
    return platform if platform in PLATFORM_DEFAULTS else 'gpu'  # 'cuda', 'rocm'


def resolve_dtype(name: str, platform: str | None = None):
    """Maps a config dtype name to a jnp dtype; 'auto' is bfloat16 on accelerators (on
    `platform`, default: JAX's default backend)."""
    if name == 'auto':
        return jnp.dtype(PLATFORM_DEFAULTS[_platform(platform)]['dtype'])
    return jnp.dtype(name)


def resolve_scan(value, platform: str | None = None) -> bool:
    """model.scan_layers: True, False or 'auto' (also as the strings a command line gives)."""
    text = str(value).lower()
    if text == 'auto':
        return PLATFORM_DEFAULTS[_platform(platform)]['scan_layers']
    return text == 'true'


def resolved(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
    """A copy of `config` with its 'auto' model settings decided for `platform`'s devices."""
    config = ml_collections.ConfigDict(config.to_dict())
    m = config.model
    dtype = resolve_dtype(m.dtype, platform)
    with m.ignore_type():
        m.attention_impl = resolve_implementation(m.attention_impl, dtype, m.d_k, m.d_v,
                                                  _platform(platform))
        m.scan_layers = resolve_scan(m.scan_layers, platform)
        m.dtype = dtype.name
    return config


@functools.lru_cache(maxsize=8)
def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...): section 3.5,
    interleaved by dimension."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, two_i / d_model)
    table = np.zeros((max_len, d_model), np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    return table.astype(np.float32)


def shift_right(targets, positions):
    """Decoder input: the targets shifted one step right, starting each example with PAD_ID."""
    shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]
    return jnp.where(positions == 0, PAD_ID, shifted)


def segments_and_positions(tokens, segmentation=None, position=None):
    """Segment ids and positions of a batch; by default one example per row, PAD is padding."""
    if segmentation is None:
        segmentation = (tokens != PAD_ID).astype(jnp.int32)
    if position is None:
        position = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return segmentation, position


class Transformer(nnx.Module):
    """Encoder-decoder Transformer (section 3, Figure 1)."""

    def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: it is static graph data
        self.cfg = cfg
        self.vocab_size = vocab_size
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        self.dtype = dtype
        # Section 3.4 does not give an initialiser; N(0, d_model^-0.5) makes the scaled
        # embedding (x sqrt(d_model)) unit-variance, as in tensor2tensor.
        embed_init = nnx.with_partitioning(
            nnx.initializers.normal(stddev=cfg.d_model ** -0.5), ('vocab', 'embed'))

        def embedding():
            return nnx.Embed(vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                             embedding_init=embed_init, rngs=rngs)

        # Section 3.4: one matrix shared by both embeddings and the pre-softmax projection.
        self.embed = embedding()
        if not cfg.share_embeddings:
            self.target_embed = embedding()
            self.output_projection = nnx.Linear(
                cfg.d_model, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(),
                                                  ('embed', 'vocab')), rngs=rngs)
        if cfg.positional == 'learned':  # Table 3 row E
            self.position_embed = nnx.Embed(
                cfg.max_position, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                     (None, 'embed')), rngs=rngs)
        self.embed_dropout = nnx.Dropout(cfg.dropout_rate)
        self.encoder_layers = layer_stack(EncoderLayer, cfg.num_encoder_layers, cfg, dtype,
                                           param_dtype, rngs)
        self.decoder_layers = layer_stack(DecoderLayer, cfg.num_decoder_layers, cfg, dtype,
                                           param_dtype, rngs)
        if cfg.norm == 'pre':  # pre-LN needs a final normalisation of each stack's output
            self.encoder_norm = layer_norm(cfg, dtype, param_dtype, rngs)
            self.decoder_norm = layer_norm(cfg, dtype, param_dtype, rngs)

    # -- the two ends: embeddings and logits ------------------------------------------------

    def embed_tokens(self, tokens, positions, *, target: bool, rngs=None):
        """Token embeddings x sqrt(d_model) plus positions (sections 3.4, 3.5)."""
        table = self.target_embed if (target and not self.cfg.share_embeddings) else self.embed
        x = table(tokens) * jnp.sqrt(self.cfg.d_model).astype(self.dtype)  # section 3.4
        if self.cfg.positional == 'learned':
            pe = self.position_embed(positions)
        else:
            # A constant, not a parameter: built once per trace from the cached table.
            pe = jnp.asarray(sinusoidal_table(self.cfg.max_position, self.cfg.d_model))[positions]
        x = (x + pe).astype(self.dtype)
        if rngs is not None:  # section 5.4: dropout on the sums of embeddings and positions
            x = self.embed_dropout(x, rngs=rngs)
        return x

    def output_logits(self, x):
        """The pre-softmax projection of decoder outputs (the shared embedding, 3.4), computed
        and returned in float32 whatever the compute dtype: the loss and the beam scores see
        unrounded logits."""
        if self.cfg.share_embeddings:
            weights, spec = self.embed.embedding[...], 'btd,vd->btv'
        else:
            weights, spec = self.output_projection.kernel[...], 'btd,dv->btv'
        return einsum_f32(spec, x.astype(self.dtype), weights.astype(self.dtype))

    # -- full passes --------------------------------------------------------------------------

    def encode(self, inputs, inputs_segmentation=None, inputs_position=None, *, rngs=None):
        """Encoder stack: token ids [batch, src_len] -> representations [batch, src_len,
        d_model]."""
        seg, pos = segments_and_positions(inputs, inputs_segmentation, inputs_position)
        x = constrain_batch(self.embed_tokens(inputs, pos, target=False, rngs=rngs))
        mask = attention_mask(seg, seg)
        x = scan_layers(self.encoder_layers, x,
                        lambda layer, x, layer_rngs: constrain_batch(layer(x, mask, layer_rngs)),
                        rngs=rngs, remat=self.cfg.remat == 'block',
                        unroll=not resolve_scan(self.cfg.scan_layers))
        return self.encoder_norm(x) if self.cfg.norm == 'pre' else x

    def decode_teacher_forced(self, encoded, inputs_segmentation, targets,
                              targets_segmentation=None, targets_position=None, *, rngs=None):
        """Decoder stack with teacher forcing: logits [batch, tgt_len, vocab] in float32.

        `targets` are the outputs to predict; the decoder reads them shifted right, all
        positions at once (decode_step is the autoregressive, one-position-a-step decoder).
        """
        seg, pos = segments_and_positions(targets, targets_segmentation, targets_position)
        x = self.embed_tokens(shift_right(targets, pos), pos, target=True, rngs=rngs)
        x = constrain_batch(x)
        self_mask = attention_mask(seg, seg, causal=True)
        cross_mask = attention_mask(seg, inputs_segmentation)

        def body(layer, x, layer_rngs):
            return constrain_batch(layer(x, encoded, self_mask, cross_mask, layer_rngs))

        x = scan_layers(self.decoder_layers, x, body, rngs=rngs,
                        remat=self.cfg.remat == 'block',
                        unroll=not resolve_scan(self.cfg.scan_layers))
        if self.cfg.norm == 'pre':
            x = self.decoder_norm(x)
        return constrain_batch(self.output_logits(x))

    def __call__(self, inputs, targets, inputs_segmentation=None, targets_segmentation=None,
                 inputs_position=None, targets_position=None, *, rngs=None):
        """Teacher-forced forward pass: logits [batch, tgt_len, vocab] in float32
        (attention_weights(model, ...) also gives the attention of every layer and head)."""
        in_seg, _ = segments_and_positions(inputs, inputs_segmentation, inputs_position)
        encoded = self.encode(inputs, in_seg, inputs_position, rngs=rngs)
        return self.decode_teacher_forced(encoded, in_seg, targets, targets_segmentation,
                                          targets_position, rngs=rngs)

    # -- cached autoregressive decoding ------------------------------------------------------

    def init_cache(self, encoded, max_length: int):
        """Decoding state for `encoded` [batch, src_len, d_model], one entry per decoder layer,
        each array with its rows (batch) first.

        'self': per layer a (key, value) pair of head-major buffers [batch, heads, max_length,
        d], zeroed (the only part beam search reorders); 'cross': per layer the encoder
        output's keys and values [batch, heads, src_len, d], projected once per sentence.

        A decoding step runs the layers one by one, each on its own buffers, not in a scan
        over stacked ones: a scan's per-layer slices and stacked outputs copy the whole cache
        every step (beam 4 at batch 32 decoded 1.2x faster unrolled on the 2-core CPU,
        benchmarks/versus_flax.py), and the head-major layout spares the transposes of it.
        """
        batch, cfg = encoded.shape[0], self.cfg
        zeros = lambda d: jnp.zeros((batch, cfg.num_heads, max_length, d), self.dtype)
        layers = each_layer(self.decoder_layers)
        return {'self': tuple((zeros(cfg.d_k), zeros(cfg.d_v)) for _ in layers),
                'cross': tuple(layer.cross_attention.cache_kv(encoded) for layer in layers)}

    def decode_step(self, tokens, index, cache, inputs_segmentation):
        """Feeds one token per row at position `index`; returns (logits [batch, vocab], cache).

        `tokens` [batch] are the previous outputs (PAD_ID at index 0). The encoder does not run.
        """
        positions = jnp.full((tokens.shape[0], 1), index, jnp.int32)
        x = self.embed_tokens(tokens[:, None], positions, target=True)
        cross_mask = (inputs_segmentation > 0)[:, None, None, :]
        new_self = []
        for layer, own, cross in zip(each_layer(self.decoder_layers), cache['self'],
                                     cache['cross']):
            x, own = layer.step(x, own, cross, cross_mask, index)
            new_self.append(own)
        if self.cfg.norm == 'pre':
            x = self.decoder_norm(x)
        return self.output_logits(x)[:, 0], {'self': tuple(new_self), 'cross': cache['cross']}


def attention_weights(model: Transformer, inputs, targets):
    """(logits, weights) of `model`'s teacher-forced pass over `inputs` [batch, src_len] and
    `targets` [batch, tgt_len] (the attention plot's and the alignments' pass), with the
    attention weights of every layer and head: {'encoder': [layers, batch, heads, src, src],
    'decoder': [layers, batch, heads, tgt, tgt], 'cross': [layers, batch, heads, tgt, src]},
    in float32.

    A view of the model whose attention sows its weights (MultiHeadAttention.sow_weights),
    run under nnx.capture: `model` itself is left as it is, and the training step, which never
    asks, neither computes nor keeps a weight.
    """
    viewed = nnx.with_attributes(model, only=MultiHeadAttention, sow_weights=True)
    logits, sown = nnx.capture(viewed, nnx.Intermediate)(inputs, targets)

    def sown_by(stack, attention):
        return sown[stack][attention]['attention_weights'][0]

    return logits, {'encoder': sown_by('encoder_layers', 'self_attention'),
                    'decoder': sown_by('decoder_layers', 'self_attention'),
                    'cross': sown_by('decoder_layers', 'cross_attention')}


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> Transformer:
    """Builds the model of `config` (uses config.model and config.vocab_size).

    Parameters carry logical axis names ('layers', 'vocab', 'embed', 'heads', 'mlp');
    `sharding.py` maps them onto the mesh, so they are not sharded eagerly here.
    """
    nnx.use_eager_sharding(False)  # also inside the layer stacks' vmap
    return Transformer(config.model, config.vocab_size, rngs=nnx.Rngs(params=seed))


def abstract_model(config: ml_collections.ConfigDict, seed: int = 0):
    """(graphdef, abstract state) of the config's model, from `nnx.eval_shape`: shapes and
    dtypes only, nothing allocated (the big models plan on a laptop)."""
    return nnx.split(nnx.eval_shape(lambda: create_model(config, seed)))
