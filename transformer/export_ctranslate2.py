"""A trained model as a CTranslate2 model: a `TransformerSpec` filled from our parameters.

The spec is built directly, never through another format (ct2-transformers-converter assumes
OPUS-MT's vocabulary layout, PAD last, and fails on ours). It holds every configuration the
project trains:

* post-LN (the paper, section 3.1) or pre-LN with its final LayerNorm per stack;
* sinusoidal positions (section 3.5) given as an explicit table, so the interleaved sin/cos
  layout is kept as it is, or learned ones (Table 3 row E);
* h heads of any width: CTranslate2 has one head width for queries, keys and values, so when
  d_k != d_v (Table 3 row B) the narrower projections are padded with zero columns (and the
  output projection with zero rows) to max(d_k, d_v), and the queries are scaled by
  1/sqrt(d_k) explicitly: zero columns add nothing to a dot product, so the network is the same;
* attention projections with or without biases (section 3.2.2 has none);
* one embedding matrix for both inputs and the softmax (section 3.4), or separate ones.

Token ids are our own: the vocabulary is the SentencePiece model's pieces in id order (padded
with placeholders up to the model's vocab_size), PAD (id 0) is the decoder's start symbol, and
the source gets EOS appended, as in training.
"""

from __future__ import annotations

import numpy as np

# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES).
QUANTIZATIONS = ('float32', 'float16', 'bfloat16', 'int8', 'int8_float32', 'int8_float16',
                 'int8_bfloat16', 'int16')


def head_width(cfg) -> int:
    """The one head width CTranslate2 gets: max(d_k, d_v)."""
    return max(cfg.d_k, cfg.d_v)


def _pad_heads(kernel: np.ndarray, heads: int, width: int, axis: int) -> np.ndarray:
    """A projection's head axis (`axis`, heads * w long) padded with zeros to heads * width."""
    moved = np.moveaxis(kernel, axis, 0)
    per_head = moved.reshape((heads, moved.shape[0] // heads) + moved.shape[1:])
    pad = [(0, 0)] * per_head.ndim
    pad[1] = (0, width - per_head.shape[1])
    padded = np.pad(per_head, pad).reshape((heads * width,) + moved.shape[1:])
    return np.moveaxis(padded, 0, axis)


def _linear(spec, kernel, bias=None) -> None:
    """Our kernel is [in, out]; CTranslate2's weight is [out, in]."""
    spec.weight = np.ascontiguousarray(kernel.T)
    if bias is not None:
        spec.bias = np.ascontiguousarray(bias)


def _layer_norm(spec, norm) -> None:
    spec.gamma = norm['scale']
    spec.beta = norm['bias']


def _attention(spec, p, cfg, self_attention: bool) -> None:
    """Fills a MultiHeadAttentionSpec: QKV fused for self-attention, KV for cross-attention."""
    h, width = cfg.num_heads, head_width(cfg)

    def proj(name):
        kernel = _pad_heads(p[name]['kernel'], h, width, axis=1)
        bias = p[name].get('bias')
        return kernel, None if bias is None else _pad_heads(bias, h, width, axis=0)

    q, k, v = proj('query'), proj('key'), proj('value')
    out_kernel = _pad_heads(p['out']['kernel'], h, width, axis=0)
    fused = lambda parts: (np.concatenate([kk for kk, _ in parts], axis=1),
                           None if parts[0][1] is None else
                           np.concatenate([b for _, b in parts], axis=0))
    if self_attention:
        _linear(spec.linear[0], *fused([q, k, v]))
    else:
        _linear(spec.linear[0], *q)
        _linear(spec.linear[1], *fused([k, v]))
    _linear(spec.linear[-1], out_kernel, p['out'].get('bias'))
    if cfg.d_k != width:  # section 3.2.1's 1/sqrt(d_k), not 1/sqrt(the padded width)
        spec.queries_scale = np.float32(1.0 / np.sqrt(cfg.d_k))


def _ffn(spec, p) -> None:
    _linear(spec.linear_0, p['w1']['kernel'], p['w1']['bias'])
    _linear(spec.linear_1, p['w2']['kernel'], p['w2']['bias'])


def _layer(stack: dict, i: int) -> dict:
    """Layer i's parameters of a stack stored with a leading layer axis."""
    return _map(stack, lambda a: a[i])


def _map(tree, fn):
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def build_spec(params: dict, cfg, tokens: list[str], positions: np.ndarray,
               pieces: dict[str, str]):
    """The `ctranslate2.specs.TransformerSpec` of a model: `params` are its parameters as
    float32 numpy arrays (the nested dict of `nnx.to_pure_dict`), `cfg` its config.model,
    `tokens` the vocabulary in id order, `positions` the position table [max_position,
    d_model] (the sinusoid of section 3.5 or the learned one), `pieces` the pad, eos and unk
    pieces."""
    from ctranslate2.specs import transformer_spec

    pre = cfg.norm == 'pre'
    width = head_width(cfg)
    head_dim = None if width * cfg.num_heads == cfg.d_model else width
    encoder = transformer_spec.TransformerEncoderSpec(
        cfg.num_encoder_layers, cfg.num_heads, pre_norm=pre, head_dim=head_dim)
    decoder = transformer_spec.TransformerDecoderSpec(
        cfg.num_decoder_layers, cfg.num_heads, pre_norm=pre, head_dim=head_dim)
    spec = transformer_spec.TransformerSpec(encoder, decoder)

    source_embed = params['embed']['embedding']
    target_embed = source_embed if cfg.share_embeddings else params['target_embed']['embedding']
    # Section 3.4: embeddings x sqrt(d_model), then positions added (3.5); positions count
    # from 0 in both stacks, as ours do.
    encoder.embeddings[0].weight = source_embed
    encoder.scale_embeddings = True
    encoder.position_encodings.encodings = positions
    decoder.embeddings.weight = target_embed
    decoder.scale_embeddings = True
    decoder.position_encodings.encodings = positions
    if cfg.share_embeddings:
        decoder.projection.weight = target_embed  # aliased by spec.optimize(): stored once
    else:
        _linear(decoder.projection, params['output_projection']['kernel'])

    for i, layer_spec in enumerate(encoder.layer):
        p = _layer(params['encoder_layers'], i)
        _attention(layer_spec.self_attention, p['self_attention'], cfg, True)
        _layer_norm(layer_spec.self_attention.layer_norm, p['attention_residual']['norm'])
        _ffn(layer_spec.ffn, p['ffn'])
        _layer_norm(layer_spec.ffn.layer_norm, p['ffn_residual']['norm'])
    for i, layer_spec in enumerate(decoder.layer):
        p = _layer(params['decoder_layers'], i)
        _attention(layer_spec.self_attention, p['self_attention'], cfg, True)
        _layer_norm(layer_spec.self_attention.layer_norm, p['self_residual']['norm'])
        _attention(layer_spec.attention, p['cross_attention'], cfg, False)
        _layer_norm(layer_spec.attention.layer_norm, p['cross_residual']['norm'])
        _ffn(layer_spec.ffn, p['ffn'])
        _layer_norm(layer_spec.ffn.layer_norm, p['ffn_residual']['norm'])
    if pre:
        _layer_norm(encoder.layer_norm, params['encoder_norm'])
        _layer_norm(decoder.layer_norm, params['decoder_norm'])

    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    config = spec.config
    config.layer_norm_epsilon = float(cfg.layer_norm_epsilon)
    config.unk_token, config.eos_token = pieces['unk'], pieces['eos']
    # No BOS: PAD starts the decoder (as in training) and the source ends with EOS.
    config.bos_token = config.decoder_start_token = pieces['pad']
    config.add_source_bos, config.add_source_eos = False, True
    return spec


def save(spec, directory: str, quantization: str) -> None:
    """Checks the spec, converts its weights to `quantization` and writes model.bin, config.json
    and shared_vocabulary.json into `directory` (which must exist)."""
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(directory)
