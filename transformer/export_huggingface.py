"""A trained model as a Hugging Face `MarianMTModel`: the paper's architecture in Transformers.

Marian is the Transformer of the paper (post-LN, sinusoidal positions, embeddings x
sqrt(d_model), one matrix for both embeddings and the softmax, no final LayerNorm), with four
differences, each handled here:

* Its position table puts sin(pos / 10000^(2i/d)) in the first half of the vector and the
  matching cos in the second half, where section 3.5 (and we) interleave them (sin at 2i, cos at
  2i+1). Permuting the residual dimension by P = [0, 2, 4, ..., 1, 3, 5, ...] everywhere
  (embedding columns, LayerNorm scales and biases, the input rows of Q, K, V and W1, the output
  columns and biases of W_O and W2) is an exact symmetry of the network: every residual vector
  is permuted the same way, LayerNorm and dot products over it do not see the order, and the
  logits x . E_v are unchanged. Copying the weights without it is off by up to 1.1 in
  log-probability.
* Its attention projections always have biases: zeros are exported where ours have none.
* Its LayerNorm epsilon is fixed at 1e-5 (ours 1e-6): log-probabilities differ by about 1e-5.
* It has one head width, d_model / h, for queries, keys and values, no learned positions and
  no pre-LN: those configs are refused (`unsupported`), pointing to CTranslate2.

PAD (id 0) is our decoder's start symbol, never an output (section 6.1's search never produces
it): the generation config forbids it (`bad_words_ids`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from transformer import errors

# safetensors weight types a MarianMTModel loads as they are.
QUANTIZATIONS = ('float32', 'float16', 'bfloat16')


def unsupported(cfg) -> str | None:
    """Why a MarianMTModel cannot hold the model of `cfg` (config.model), or None."""
    width = cfg.d_model // cfg.num_heads
    if cfg.d_k != cfg.d_v or cfg.d_k * cfg.num_heads != cfg.d_model:
        return (f'model.d_k={cfg.d_k}, model.d_v={cfg.d_v}: Marian\'s heads are d_model / h = '
                f'{cfg.d_model} / {cfg.num_heads} = {width} wide (Table 3 rows A and B)'
                if cfg.d_model % cfg.num_heads == 0 else
                f'model.d_model={cfg.d_model} is not a multiple of model.num_heads='
                f'{cfg.num_heads}')
    if cfg.positional != 'sinusoidal':
        return (f'model.positional={cfg.positional}: Marian has only sinusoidal positions '
                '(Table 3 row E)')
    if cfg.norm != 'post':
        return f'model.norm={cfg.norm}: Marian is post-LN only'
    if not cfg.share_embeddings:
        return 'model.share_embeddings=False: this export ties Marian\'s embeddings and softmax'
    return None


def residual_permutation(d_model: int) -> np.ndarray:
    """P with marian_vector = our_vector[P]: the sines first, then the cosines."""
    return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def marian_config(cfg, vocab_size: int):
    """The MarianConfig of our config.model."""
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.num_encoder_layers, decoder_layers=cfg.num_decoder_layers,
        encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function='relu',
        max_position_embeddings=cfg.max_position, scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1,
        bos_token_id=None)


def generation_config(cfg, beam_size: int, alpha: float):
    """Beam search as section 6.1 (beam 4, alpha 0.6), PAD never produced. Marian's length
    penalty divides by length^alpha, not GNMT's ((5 + length) / 6)^alpha, and its length bound
    is one number, max_position, not input length + 50."""
    from transformers import GenerationConfig

    return GenerationConfig(
        num_beams=beam_size, length_penalty=alpha, max_length=cfg.max_position,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, forced_eos_token_id=1,
        bad_words_ids=[[0]], early_stopping=False)


def state_dict(params: dict, cfg) -> dict[str, np.ndarray]:
    """MarianMTModel's weights (torch layout: Linear weights [out, in]) from ours, permuted."""
    perm = residual_permutation(cfg.d_model)
    out: dict[str, np.ndarray] = {}

    def linear(name, kernel, bias, rows_in: bool):
        # Our kernel is [in, out]. rows_in: the input is the residual stream (Q, K, V, W1);
        # otherwise the output is (W_O, W2).
        if rows_in:
            kernel = kernel[perm, :]
        else:
            kernel = kernel[:, perm]
            bias = None if bias is None else bias[perm]
        out[f'{name}.weight'] = np.ascontiguousarray(kernel.T)
        out[f'{name}.bias'] = np.zeros(kernel.shape[1], np.float32) if bias is None else bias

    def norm(name, p):
        out[f'{name}.weight'] = p['scale'][perm]
        out[f'{name}.bias'] = p['bias'][perm]

    def attention(name, p):
        for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
            linear(f'{name}.{theirs}', p[ours]['kernel'], p[ours].get('bias'), True)
        linear(f'{name}.out_proj', p['out']['kernel'], p['out'].get('bias'), False)

    def ffn(name, p):
        linear(f'{name}.fc1', p['w1']['kernel'], p['w1']['bias'], True)
        linear(f'{name}.fc2', p['w2']['kernel'], p['w2']['bias'], False)

    embed = params['embed']['embedding'][:, perm]
    for key in ('model.shared.weight', 'model.encoder.embed_tokens.weight',
                'model.decoder.embed_tokens.weight', 'lm_head.weight'):
        out[key] = embed  # one matrix, tied (section 3.4)
    out['final_logits_bias'] = np.zeros((1, embed.shape[0]), np.float32)
    for i in range(cfg.num_encoder_layers):
        p = {k: _take(v, i) for k, v in params['encoder_layers'].items()}
        name = f'model.encoder.layers.{i}'
        attention(f'{name}.self_attn', p['self_attention'])
        norm(f'{name}.self_attn_layer_norm', p['attention_residual']['norm'])
        ffn(name, p['ffn'])
        norm(f'{name}.final_layer_norm', p['ffn_residual']['norm'])
    for i in range(cfg.num_decoder_layers):
        p = {k: _take(v, i) for k, v in params['decoder_layers'].items()}
        name = f'model.decoder.layers.{i}'
        attention(f'{name}.self_attn', p['self_attention'])
        norm(f'{name}.self_attn_layer_norm', p['self_residual']['norm'])
        attention(f'{name}.encoder_attn', p['cross_attention'])
        norm(f'{name}.encoder_attn_layer_norm', p['cross_residual']['norm'])
        ffn(name, p['ffn'])
        norm(f'{name}.final_layer_norm', p['ffn_residual']['norm'])
    return out


def _take(tree, i):
    if isinstance(tree, dict):
        return {k: _take(v, i) for k, v in tree.items()}
    return tree[i]


def save(params: dict, cfg, tokens: list[str], pieces: dict[str, str], vocab_model: str,
         directory: str, *,
         source_lang: str, target_lang: str, dtype: str = 'float32', beam_size: int = 4,
         alpha: float = 0.6) -> None:
    """Writes a MarianMTModel directory: model.safetensors, config.json,
    generation_config.json and MarianTokenizer's files (our SentencePiece model as
    source.spm and target.spm, vocab.json mapping its pieces to our ids)."""
    import torch
    from transformers import MarianMTModel, MarianTokenizer

    config = marian_config(cfg, len(tokens))
    model = MarianMTModel(config)
    weights = state_dict(params, cfg)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()},
        strict=False)
    missing = [k for k in missing if 'embed_positions' not in k]  # Marian builds its table
    if missing or unexpected:
        raise RuntimeError(f'MarianMTModel weights not matched: missing {missing}, '
                           f'unexpected {unexpected}')
    model.generation_config = generation_config(cfg, beam_size, alpha)
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(directory, safe_serialization=True)

    vocab = os.path.join(directory, 'vocab.json')
    with errors.written(vocab, 'the exported vocabulary') as f:
        f.write(json.dumps({piece: i for i, piece in enumerate(tokens)},
                           ensure_ascii=False).encode('utf-8'))
    tokenizer = MarianTokenizer(
        source_spm=vocab_model, target_spm=vocab_model, vocab=vocab, source_lang=source_lang,
        target_lang=target_lang, unk_token=pieces['unk'], eos_token=pieces['eos'],
        pad_token=pieces['pad'],
        model_max_length=cfg.max_position)
    tokenizer.save_pretrained(directory)
