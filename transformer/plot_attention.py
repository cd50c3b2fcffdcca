"""`python -m transformer.plot_attention --workdir=DIR --text="..." --out=attention.png
[--target="..."] [--beam_size=4]`: attention maps of one sentence.

The sentence is translated (beam search with the config's settings, or `--target` is taken
as the translation), then the model's own teacher-forced forward pass over (source,
translation) returns the attention weights of every head: encoder self-attention, decoder
self-attention and encoder-decoder attention, each drawn as a grid of layers (rows) x heads
(columns) with the token pieces on the axes. Rows of a map are queries, columns keys; decoder
rows are labelled with the token each position predicts, decoder self-attention columns with
the token it reads (`<s>` is the start symbol).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from transformer import alignment, batching, cli, plots, saved_runs, search
from transformer.errors import UsageError
from transformer.tokenizer import PAD_ID

_WORKDIR = cli.define_workdir_flag()
_TEXT = flags.DEFINE_string('text', None, 'The source sentence.')
_TARGET = flags.DEFINE_string('target', None, 'A translation to show instead of the model\'s own.')
_OUT = flags.DEFINE_string('out', 'attention.png', 'Where to write the PNG.')
_DECODING = cli.define_decoding_flags()


def _labels(tokenizer, ids):
    return ['<s>' if i == PAD_ID else p for i, p in zip(ids, tokenizer.pieces(ids))]


def main():
    if not _TEXT.value or not _TEXT.value.strip():
        raise UsageError('--text is required: the source sentence to show')
    if not _OUT.value.lower().endswith('.png'):
        raise UsageError(f'--out={_OUT.value!r} must name a .png file')
    model, config, tokenizer, steps = saved_runs.load_model(
        _WORKDIR.value, average=_DECODING.average.value,
        step=cli.step_value(_DECODING.step.value), raw_weights=_DECODING.raw_weights.value)
    settings = cli.decoding_settings(config, beam_size=_DECODING.beam_size.value,
                                     alpha=_DECODING.alpha.value,
                                     max_extra_length=_DECODING.max_extra_length.value,
                                     no_repeat_ngram_size=_DECODING.no_repeat_ngram_size.value)
    (source,), _ = batching.fit_sentences([tokenizer.encode(_TEXT.value)],
                                          config.model.max_position, '--text')
    inputs = jnp.asarray([source], jnp.int32)
    if _TARGET.value is not None:
        (target,), _ = batching.fit_sentences([tokenizer.encode(_TARGET.value)],
                                              config.model.max_position, '--target')
    else:
        found = search.beam_search(model, inputs, beam_size=settings.beam_size,
                                   alpha=settings.alpha,
                                   max_extra_length=settings.max_extra_length,
                                   no_repeat_ngram_size=settings.no_repeat_ngram_size)
        best = np.asarray(found.tokens[0, 0])
        target = best[:int(search.hypothesis_lengths(best))].tolist()  # EOS included
    targets = jnp.asarray([target], jnp.int32)
    _, weights = alignment.forward_with_attention(*nnx.split(model), inputs, targets)
    weights = {k: np.asarray(v[:, 0], np.float32) for k, v in weights.items()}
    translation = tokenizer.decode(target)
    title = f'{_TEXT.value.strip()}  ->  {translation}   (steps {steps})'
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    plots.attention_maps(weights, _labels(tokenizer, source), _labels(tokenizer, target),
                         _OUT.value, title)
    print(json.dumps({'out': _OUT.value, 'source': _TEXT.value, 'translation': translation,
                      'source_pieces': len(source), 'target_pieces': len(target),
                      'steps': steps}, ensure_ascii=False))


if __name__ == '__main__':
    cli.run(main)
