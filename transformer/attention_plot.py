"""Attention heat maps for one sentence: `python -m transformer.attention --workdir=DIR
--text="..." --out=attention.png [--target="..."] [--beam_size=4]`.

The sentence is translated (beam search with the config's settings, or `--target` is taken
as the translation), then one teacher-forced pass over (source, translation) records the
attention weights of every head: encoder self-attention, decoder self-attention and
encoder-decoder attention, each drawn as a grid of layers (rows) x heads (columns) with the
token pieces on the axes. Rows of a map are queries, columns keys; decoder rows are labelled
with the token each position predicts, decoder self-attention columns with the token it reads
(`<s>` is the start symbol).

The pass reuses the model's own modules (embeddings, residual wrappers, attention layers), asks
each attention layer for its weights, and is checked against the model's forward pass.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from transformer import cli, decode
from transformer import evaluate as evaluate_lib
from transformer.model import shift_right
from transformer.multi_head_attention import attention_mask
from transformer.tokenizer import EOS_ID, PAD_ID

KINDS = (('encoder', 'encoder self-attention'),
         ('decoder', 'decoder self-attention (masked)'),
         ('cross', 'encoder-decoder attention'))


def attention_weights(model, inputs, targets):
    """Teacher-forced pass that records attention weights (no dropout).

    inputs [B, S], targets [B, T] token ids (EOS-terminated, PAD-padded). Returns (logits
    [B, T, V], {'encoder': [layers, B, heads, S, S], 'decoder': [layers, B, heads, T, T],
    'cross': [layers, B, heads, T, S]}).
    """
    weights = {'encoder': [], 'decoder': [], 'cross': []}

    def attend(attention, kind, mask, kv_input=None):
        def sublayer(h):
            out, w = attention(h, h if kv_input is None else kv_input, mask, return_weights=True)
            weights[kind].append(w)
            return out
        return sublayer

    in_seg = (inputs != PAD_ID).astype(jnp.int32)
    in_pos = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    x = model._embed(inputs, in_pos, target=False)
    mask = attention_mask(in_seg, in_seg)
    for layer in model.encoder_layers:
        x = layer.attention_residual(x, attend(layer.self_attention, 'encoder', mask))
        x = layer.ffn_residual(x, layer.ffn)
    encoded = model.encoder_norm(x) if model.cfg.norm == 'pre' else x

    t_seg = (targets != PAD_ID).astype(jnp.int32)
    t_pos = jnp.broadcast_to(jnp.arange(targets.shape[1]), targets.shape)
    y = model._embed(shift_right(targets, t_pos), t_pos, target=True)
    self_mask = attention_mask(t_seg, t_seg, causal=True)
    cross_mask = attention_mask(t_seg, in_seg)
    for layer in model.decoder_layers:
        y = layer.self_residual(y, attend(layer.self_attention, 'decoder', self_mask))
        y = layer.cross_residual(y, attend(layer.cross_attention, 'cross', cross_mask, encoded))
        y = layer.ffn_residual(y, layer.ffn)
    if model.cfg.norm == 'pre':
        y = model.decoder_norm(y)
    return model._logits(y), {k: jnp.stack(v) for k, v in weights.items()}


@functools.partial(jax.jit, static_argnums=0)
def _recorded_pass(graphdef, params, inputs, targets):
    """attention_weights and the model's own forward pass, in one compiled program."""
    model = nnx.merge(graphdef, params)
    logits, weights = attention_weights(model, inputs, targets)
    return logits, weights, model(inputs, targets)


def _labels(tokenizer, ids):
    return ['<s>' if i == PAD_ID else p for i, p in zip(ids, tokenizer.pieces(ids))]


def plot(weights: dict, source_pieces, target_pieces, out: str, title: str = '') -> None:
    """Draws the three kinds of attention of one sentence into one PNG.

    weights: {'encoder': [layers, heads, S, S], 'decoder': [layers, heads, T, T],
    'cross': [layers, heads, T, S]} as numpy; pieces label the axes.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    decoder_inputs = ['<s>'] + list(target_pieces[:-1])
    axes_labels = {'encoder': (source_pieces, source_pieces),
                   'decoder': (target_pieces, decoder_inputs),
                   'cross': (target_pieces, source_pieces)}
    layers, heads = weights['encoder'].shape[:2]
    n_layers_dec = weights['decoder'].shape[0]
    longest = max(len(source_pieces), len(target_pieces))
    cell = max(1.6, min(0.16 * longest + 0.6, 4.0))  # inches per heat map
    heights = [layers, n_layers_dec, n_layers_dec]
    fig = plt.figure(figsize=(cell * heads + 1.5, cell * sum(heights) + 1.2 * len(KINDS) + 0.5),
                     layout='constrained')
    if title:
        fig.suptitle(title, fontsize=10)
    subfigs = fig.subfigures(len(KINDS), 1, height_ratios=[h * cell + 1.2 for h in heights])
    fontsize = max(4, min(8, int(200 / max(longest, 1))))
    for subfig, (kind, name) in zip(subfigs, KINDS):
        w = weights[kind]
        rows, cols = axes_labels[kind]
        grid = subfig.subplots(w.shape[0], w.shape[1], squeeze=False)
        subfig.suptitle(name, fontsize=11)
        image = None
        for layer in range(w.shape[0]):
            for head in range(w.shape[1]):
                ax = grid[layer, head]
                image = ax.imshow(w[layer, head], cmap='viridis', vmin=0.0, vmax=1.0,
                                  aspect='auto', interpolation='nearest')
                ax.set_xticks(range(len(cols)))
                ax.set_yticks(range(len(rows)))
                if layer == w.shape[0] - 1:
                    ax.set_xticklabels(cols, rotation=90, fontsize=fontsize)
                else:
                    ax.set_xticklabels([])
                if head == 0:
                    ax.set_yticklabels(rows, fontsize=fontsize)
                    ax.set_ylabel(f'layer {layer + 1}', fontsize=9)
                else:
                    ax.set_yticklabels([])
                if layer == 0:
                    ax.set_title(f'head {head + 1}', fontsize=9)
                ax.tick_params(length=0)
        subfig.colorbar(image, ax=grid, shrink=0.6, label='weight')
    fig.savefig(out, dpi=110)
    plt.close(fig)


def define_flags():
    flags.DEFINE_string('workdir', None, 'Work directory of a training run.')
    flags.DEFINE_string('text', None, 'The source sentence.')
    flags.DEFINE_string('target', None, 'A translation to show instead of the model\'s own.')
    flags.DEFINE_string('out', 'attention.png', 'Where to write the PNG.')
    evaluate_lib.define_decoding_flags()


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    f = flags.FLAGS
    if not f.text or not f.text.strip():
        raise cli.UsageError('--text is required: the source sentence to show')
    if not f.out.lower().endswith('.png'):
        raise cli.UsageError(f'--out={f.out!r} must name a .png file')
    model, config, tokenizer, steps = evaluate_lib.load(f.workdir, average=f.average,
                                                        step=f.step)
    settings = evaluate_lib.decode_settings(config, f.beam_size, f.alpha, f.max_extra_length)
    limit = config.model.max_position - 1
    source = tokenizer.encode(f.text)
    if len(source) > limit:
        print(f'warning: --text has {len(source)} tokens; truncated to {limit}', file=sys.stderr)
        source = source[:limit]
    source = source + [EOS_ID]
    inputs = jnp.asarray([source], jnp.int32)
    if f.target is not None:
        target = tokenizer.encode(f.target)[:limit] + [EOS_ID]
    else:
        tokens, _ = decode.beam_search(model, inputs, **settings)
        target = decode.strip(tokens)[0] + [EOS_ID]
    targets = jnp.asarray([target], jnp.int32)
    logits, weights, expected = _recorded_pass(*nnx.split(model), inputs, targets)
    if not np.allclose(np.asarray(logits), np.asarray(expected), atol=1e-3, rtol=1e-3):
        raise RuntimeError('the recorded pass differs from the model\'s forward pass')
    weights = {k: np.asarray(v[:, 0], np.float32) for k, v in weights.items()}
    translation = tokenizer.decode(target)
    title = f'{f.text.strip()}  ->  {translation}   (steps {steps})'
    out_dir = os.path.dirname(os.path.abspath(f.out))
    os.makedirs(out_dir, exist_ok=True)
    plot(weights, _labels(tokenizer, source), _labels(tokenizer, target), f.out, title)
    print(json.dumps({'out': f.out, 'source': f.text, 'translation': translation,
                      'source_pieces': len(source), 'target_pieces': len(target),
                      'steps': steps}, ensure_ascii=False))


def run():
    define_flags()
    cli.run(main)
