"""`python -m transformer.evaluate --workdir=DIR [--split=test] [--average=K] [--beam_size=4]`.

Translates every sentence of a split with beam search (section 6.1: beam 4, alpha 0.6, at most
input length + 50 tokens) and scores it against the references:

* sacreBLEU, detokenized and cased, with its signature (the number to compare across papers);
* the paper's tokenized BLEU: Moses-tokenized, hyphenated compounds split, multi-bleu;
* lowercased sacreBLEU (how Multi30k results are often given) and chrF.

The split is never length-filtered; sources longer than model.max_position tokens (EOS
included) are truncated, and their count is reported. Parameters are averaged over the last
`--average` checkpoints (default: the config's decode.average_last, or as many as there are).

Writes DIR/eval/<split>_<what>.hyp (one hypothesis per source line, in the split's official
order: newstest2014's SGML order for WMT14, file order for local data), .src and .ref beside it
(the sources and references scored against, in the same order, so that `sacrebleu X.ref -i
X.hyp` gives the printed score) and DIR/eval/<split>_<what>.json (the scores, settings and
speed), and prints the JSON.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags, logging

from transformer import batching, bleu, cli, data, decode, distributed, trained
from transformer import workdir as workdir_lib
from transformer.errors import UsageError

_WORKDIR = cli.define_workdir_flag()
_SPLIT = flags.DEFINE_string('split', 'test', 'Split to translate: test, validation or train.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Score only the first N sentences (for quick '
                              'looks; the result is then not a test-set score).')
_DECODING = cli.define_decoding_flags()


def evaluate(workdir: str, *, split: str, average: int | None, step: int | None,
             decoding: dict, batch_sentences: int | None, limit: int | None) -> dict:
    """Decodes and scores a split; writes the .hyp and .json files; returns the JSON dict."""
    if split not in data.SPLITS:
        raise UsageError(f'--split={split!r}; valid: {", ".join(data.SPLITS)}')
    model, config, tokenizer, steps = trained.load_model(workdir, average=average, step=step)
    settings = decode.settings(config, **decoding)
    batch_sentences = cli.batch_sentences(batch_sentences, config)
    sources, references = data.load_text(config, split)
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    limit_tokens = batching.max_tokens(config.model)
    truncated = sum(len(ids) > limit_tokens for ids in tokenizer.encode_batch(sources))
    if truncated:
        logging.warning('%s: %d source sentences longer than model.max_position=%d tokens are '
                        'truncated', split, truncated, config.model.max_position)

    decoder = decode.make_decoder(model, config, settings, batch_sentences)
    hypotheses, stats = decode.translate_split(decoder, config, tokenizer, split,
                                               batch_sentences, limit)

    label = workdir_lib.eval_name(split, steps, settings['beam_size'], settings['alpha'], limit)
    out_dir = workdir_lib.path(workdir, workdir_lib.EVAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    hypotheses = distributed.merge(hypotheses, out_dir, label)
    if len(hypotheses) != len(sources):
        raise RuntimeError(f'decoded {len(hypotheses)} of {len(sources)} sentences')
    ordered = [hypotheses[i] for i in range(len(sources))]
    result = {
        'workdir': workdir,
        'split': split,
        'limit': limit,
        'sentences': len(sources),
        'truncated_sources': truncated,
        'steps': steps,
        'checkpoints_averaged': len(steps),
        **settings,
        'direction': f'{config.source_lang}->{config.target_lang}',
        **bleu.all_scores(ordered, references, config.target_lang),
        'decode_seconds': stats['decode_seconds'],
        'sentences_per_second': len(sources) / stats['decode_seconds'],
        'tokens_per_second': stats['generated_tokens'] / stats['decode_seconds'],
        'generated_tokens': stats['generated_tokens'],
        'decode_steps': stats['decode_steps'],
        'compiled_shapes': stats['compiled_shapes'],
        'devices': f'{jax.process_count()} process(es) x {jax.local_device_count()} '
                   f'{jax.devices()[0].platform} device(s)',
    }
    if distributed.is_main():
        # The hypotheses, and beside them the sources and references they were scored
        # against, line by line in the split's official order (newstest2014's SGML order for
        # WMT14, file order for local data): sacreBLEU run by hand on the .hyp and .ref files
        # gives the score printed here.
        for suffix, lines, key in (('.hyp', ordered, 'hypotheses_file'),
                                   ('.src', sources, 'sources_file'),
                                   ('.ref', references, 'references_file')):
            path = os.path.join(out_dir, label + suffix)
            # A line never holds a newline (read split on them, SentencePiece cannot make
            # one), but be sure.
            text = ''.join(line.replace('\n', ' ') + '\n' for line in lines)
            workdir_lib.atomic_write(path, text.encode('utf-8'))
            result[key] = path
        workdir_lib.atomic_write(os.path.join(out_dir, label + '.json'),
                                 json.dumps(result, indent=2).encode())
    return result


def main():
    d = _DECODING
    result = evaluate(_WORKDIR.value, split=_SPLIT.value, average=d.average.value,
                      step=d.step.value, batch_sentences=d.batch_sentences.value,
                      limit=_LIMIT.value,
                      decoding=dict(beam_size=d.beam_size.value, alpha=d.alpha.value,
                                    max_extra_length=d.max_extra_length.value))
    if distributed.is_main():
        print(json.dumps(result, indent=2))


if __name__ == '__main__':
    cli.run(main)
