"""Counts of a model that need no accelerator: parameters, FLOPs, memory; and the peak FLOP/s
of known chips, for model FLOPs utilisation.

Parameters are counted on `nnx.eval_shape` of the real model, so nothing is allocated and the
count is the architecture's, not a formula's. FLOPs are counted analytically (a multiply-add is
2 FLOPs); a test checks them against XLA's own count of the compiled forward pass.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from transformer.model import abstract_model, resolve_dtype

# Dense bfloat16 peak FLOP/s per chip, for model FLOPs utilisation (vendors' data sheets).
PEAK_BF16_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'V100': 125e12, 'L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}
# A training step costs the forward pass and a backward pass of about twice its FLOPs.
TRAINING_FLOPS_PER_FORWARD = 3


def peak_flops(device=None) -> float | None:
    """The bfloat16 peak of `device` (default: the first), None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def count_parameters(config) -> dict:
    """Total, embedding (token and learned position tables) and non-embedding parameters."""
    _, state = abstract_model(config)
    params = nnx.filter_state(state, nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    embedding = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
        if 'embedding' in names:
            embedding += int(np.prod(leaf.shape))
    return {'total': total, 'embedding': embedding, 'non_embedding': total - embedding}


def forward_flops(m, vocab_size: int, src_len: int, tgt_len: int) -> dict:
    """Forward FLOPs of one (source, target) pair, as the code computes them.

    Attention scores are counted over the full key length (masked entries are still computed).
    """
    qk, vv = m.num_heads * m.d_k, m.num_heads * m.d_v
    proj_q = 2 * m.d_model * qk
    proj_kv = 2 * m.d_model * (qk + vv)
    proj_o = 2 * vv * m.d_model
    ffn = 4 * m.d_model * m.d_ff

    def attend(keys):
        return 2 * keys * (qk + vv)

    encoder = src_len * m.num_encoder_layers * (
        proj_q + proj_kv + proj_o + attend(src_len) + ffn)
    decoder = m.num_decoder_layers * (
        tgt_len * (proj_q + proj_kv + proj_o + attend(tgt_len))  # self-attention
        + tgt_len * (proj_q + proj_o + attend(src_len)) + src_len * proj_kv  # cross-attention
        + tgt_len * ffn)
    logits = tgt_len * 2 * m.d_model * vocab_size
    return {'encoder': encoder, 'decoder': decoder, 'logits': logits,
            'total': encoder + decoder + logits}


def training_flops(m, vocab_size: int, rows: int, src_len: int, tgt_len: int) -> float:
    """FLOPs of one training step (forward and backward) on `rows` pairs of these lengths."""
    forward = forward_flops(m, vocab_size, src_len, tgt_len)['total']
    return TRAINING_FLOPS_PER_FORWARD * rows * forward


def summarize(config, seq_len: int | None = None) -> dict:
    """Everything `summary` prints, as a dict."""
    m = config.model
    length = seq_len or config.data.max_length
    params = count_parameters(config)
    fwd = forward_flops(m, config.vocab_size, length, length)['total']
    param_bytes = params['total'] * np.dtype(resolve_dtype(m.param_dtype)).itemsize
    # Adam keeps two float32 moments per parameter (section 5.3).
    optimizer_bytes = 2 * params['total'] * 4
    return {
        'parameters': params,
        'seq_len': length,
        # Per target token of a (source, target) pair of equal length.
        'forward_flops_per_token': fwd / length,
        'training_flops_per_token': training_flops(m, config.vocab_size, 1, length,
                                                   length) / length,
        'memory_bytes': {'parameters': param_bytes, 'optimizer_state': optimizer_bytes,
                         'total': param_bytes + optimizer_bytes},
        'model': {k: m[k] for k in ('num_encoder_layers', 'num_decoder_layers', 'd_model', 'd_ff',
                                    'num_heads', 'd_k', 'd_v', 'positional', 'norm')},
        'vocab_size': config.vocab_size,
    }
