"""`python -m transformer.evaluate --workdir=DIR [--split=test] [--average=K] [--beam_size=4]`.

Translates every sentence of a split with beam search (section 6.1: beam 4, alpha 0.6, at most
input length + 50 tokens) and scores it against the references:

* sacreBLEU, detokenized and cased, with its signature (the number to compare across papers);
* the paper's tokenized BLEU: Moses-tokenized, hyphenated compounds split, multi-bleu;
* lowercased sacreBLEU (how Multi30k results are often given) and chrF.

The split is never length-filtered; sources longer than model.max_position tokens (EOS
included) are truncated, and their count is reported. Parameters are averaged over the last
`--average` checkpoints (default: the config's decode.average_last, or as many as there are).
`--ensemble=DIR[:STEP],...` decodes with several models at once (see `saved_runs.py`); its
files are named `<split>_ensembleN-<hash of the members>_...` and its JSON lists the members.
`--limit=N` reads, tokenizes and decodes only the first N sentences (a quick look, not the
split's score). `--no_repeat_ngram_size=N` decodes without repeated N-grams (file names get
`_norepeatN`). Target prefixes and alignments are translate's: a prefix taken from the
reference would leak it into the score.

Writes DIR/eval/<name>.hyp (one hypothesis per source line, in the split's official order:
newstest2014's SGML order for WMT14, file order for local data), .src and .ref beside it (the
sources and references scored against, in the same order, so that `sacrebleu X.ref -i X.hyp`
gives the printed score) and .json (the scores, settings and speed), <name> as
workdir.eval_name makes it, and prints the JSON.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags

from transformer import (
    batching,
    bleu,
    cli,
    data,
    distributed,
    host_decode,
    run_config,
    saved_runs,
    stopping,
)
from transformer import workdir as workdir_lib
from transformer.errors import RunError, UsageError

_WORKDIR = cli.define_workdir_flag()
_SPLIT = flags.DEFINE_string('split', 'test', 'Split to translate: test, validation or train.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Score only the first N sentences (for quick '
                              'looks; the result is then not a test-set score).')
_DECODING = cli.define_decoding_flags()
_ENSEMBLE = cli.define_ensemble_flag()


def evaluate_split(workdir: str | None, *, split: str, average: int | None,
                   step: int | str | None, decoding: dict, batch_sentences: int | None,
                   limit: int | None, ensemble: str | None = None,
                   raw_weights: bool = False) -> dict:
    """Decodes and scores a split; writes the .hyp, .src, .ref and .json files; returns the
    JSON dict."""
    if split not in data.SPLITS:
        raise UsageError(f'--split={split!r}; valid: {", ".join(data.SPLITS)}')
    if limit is not None and limit < 1:
        raise UsageError(f'--limit={limit} must be >= 1')
    members, workdir = cli.models_to_load(workdir, ensemble, step)
    config = run_config.load_config(workdir)  # flags are checked before any model is read
    settings = cli.decoding_settings(config, **decoding)
    batch_sentences = cli.batch_sentences(batch_sentences, config)
    loaded = saved_runs.load(members, average=average, home=workdir, raw_weights=raw_weights)
    config, tokenizer = loaded.config, loaded.tokenizer
    # Read and tokenized once (only the first `limit` sentences with --limit); the truncated
    # sources are counted in the same pass.
    encoded = batching.encode_split(config, tokenizer, split, limit)
    sources, references = encoded.sources, encoded.references
    truncated = int(encoded.source_truncated.sum())

    decoder = host_decode.make_decoder(loaded.models, config, settings, batch_sentences)
    hypotheses, stats = host_decode.translate_split(decoder, config, tokenizer, encoded,
                                                    batch_sentences,
                                                    check=stopping.raise_if_interrupted)

    label = workdir_lib.eval_name(split, loaded.members, settings.beam_size, settings.alpha,
                                  limit, settings.no_repeat_ngram_size)
    out_dir = workdir_lib.path(workdir, workdir_lib.EVAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    hypotheses = distributed.merge(hypotheses, out_dir, label)
    if len(hypotheses) != len(sources):  # a process's share went missing
        raise RunError(f'decoded {len(hypotheses)} of {len(sources)} sentences of {split}')
    ordered = [hypotheses[i] for i in range(len(sources))]
    result = {
        'workdir': workdir,
        'split': split,
        'limit': limit,
        'sentences': len(sources),
        'truncated_sources': truncated,
        **({'steps': loaded.steps, 'checkpoints_averaged': len(loaded.steps),
            'weights': loaded.members[0]['weights']}
           if len(loaded.members) == 1 else {'ensemble': loaded.members}),
        'beam_size': settings.beam_size, 'alpha': settings.alpha,
        'max_extra_length': settings.max_extra_length,
        'no_repeat_ngram_size': settings.no_repeat_ngram_size or None,
        'direction': f'{config.source_lang}->{config.target_lang}',
        # A lowercasing vocabulary (data.lowercase) writes lowercase: read the lowercased scores.
        'lowercase': bool(config.data.lowercase),
        **bleu.all_scores(ordered, references, config.target_lang),
        'decode_seconds': stats['decode_seconds'],
        'sentences_per_second': len(sources) / stats['decode_seconds'],
        'tokens_per_second': stats['generated_tokens'] / stats['decode_seconds'],
        'generated_tokens': stats['generated_tokens'],
        'decode_steps': stats['decode_steps'],
        'decoded_batches': stats['decoded_batches'],
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
            workdir_lib.atomic_write(path, text.encode('utf-8'), 'the evaluation output')
            result[key] = path
        workdir_lib.atomic_write(os.path.join(out_dir, label + '.json'),
                                 json.dumps(result, indent=2).encode(), 'the evaluation output')
    return result


def main():
    d = _DECODING
    result = evaluate_split(_WORKDIR.value, split=_SPLIT.value, average=d.average.value,
                            step=d.step.value, batch_sentences=d.batch_sentences.value,
                            limit=_LIMIT.value, ensemble=_ENSEMBLE.value,
                            raw_weights=d.raw_weights.value,
                            decoding=dict(beam_size=d.beam_size.value, alpha=d.alpha.value,
                                          max_extra_length=d.max_extra_length.value,
                                          no_repeat_ngram_size=d.no_repeat_ngram_size.value))
    if distributed.is_main():
        print(json.dumps(result, indent=2))


if __name__ == '__main__':
    cli.run(main)
