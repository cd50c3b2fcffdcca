"""Figures: attention maps of one sentence; the curves and BLEU of a set of runs.

matplotlib runs headless (Agg); each function writes one PNG.
"""

from __future__ import annotations

import matplotlib

from transformer import errors

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

ATTENTION_KINDS = (('encoder', 'encoder self-attention'),
                   ('decoder', 'decoder self-attention (masked)'),
                   ('cross', 'encoder-decoder attention'))


def attention_maps(weights: dict, source_pieces, target_pieces, out: str, title: str = '') -> None:
    """Draws the three kinds of attention of one sentence into one PNG.

    weights: {'encoder': [layers, heads, S, S], 'decoder': [layers, heads, T, T],
    'cross': [layers, heads, T, S]} as numpy; pieces label the axes.
    """
    decoder_inputs = ['<s>'] + list(target_pieces[:-1])
    axes_labels = {'encoder': (source_pieces, source_pieces),
                   'decoder': (target_pieces, decoder_inputs),
                   'cross': (target_pieces, source_pieces)}
    layers, heads = weights['encoder'].shape[:2]
    n_layers_dec = weights['decoder'].shape[0]
    longest = max(len(source_pieces), len(target_pieces))
    cell = max(1.6, min(0.16 * longest + 0.6, 4.0))  # inches per heat map
    heights = [layers, n_layers_dec, n_layers_dec]
    kinds = len(ATTENTION_KINDS)
    fig = plt.figure(figsize=(cell * heads + 1.5, cell * sum(heights) + 1.2 * kinds + 0.5),
                     layout='constrained')
    if title:
        fig.suptitle(title, fontsize=10)
    subfigs = fig.subfigures(kinds, 1, height_ratios=[h * cell + 1.2 for h in heights])
    fontsize = max(4, min(8, int(200 / max(longest, 1))))
    for subfig, (kind, name) in zip(subfigs, ATTENTION_KINDS):
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
    with errors.written(out, 'the figure') as f:
        fig.savefig(f, format='png', dpi=110)
    plt.close(fig)


def runs_figure(curves: dict, bleu: dict, out: str) -> None:
    """Two panels into one PNG: validation perplexity against steps of every run, and
    validation BLEU against parameters.

    curves: run -> [(step, perplexity)]; bleu: run -> (parameters, BLEU).
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), layout='constrained')
    for name, curve in curves.items():
        if curve:
            steps, ppl = zip(*curve)
            left.plot(steps, ppl, marker='.', label=name)
    left.set_xlabel('training step')
    left.set_ylabel('validation perplexity (per word-piece)')
    left.set_yscale('log')
    left.grid(True, which='both', alpha=0.3)
    if any(curves.values()):
        left.legend(fontsize=7, ncol=2)
    left.set_title('validation perplexity')
    for name, (parameters, score) in bleu.items():
        right.scatter(parameters / 1e6, score)
        right.annotate(name, (parameters / 1e6, score), fontsize=8, xytext=(3, 3),
                       textcoords='offset points')
    right.set_xscale('log')
    right.set_xlabel('parameters (millions)')
    right.set_ylabel('validation BLEU (beam search, no averaging)')
    right.grid(True, which='both', alpha=0.3)
    right.set_title('BLEU against parameters')
    with errors.written(out, 'the figure') as f:
        fig.savefig(f, format='png', dpi=110)
    plt.close(fig)
