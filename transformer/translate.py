"""`python -m transformer.translate --workdir=DIR [--beam_size=4] [--average=K] < in > out`.

Reads source sentences from stdin, one per line, and writes their translations to stdout, in
order. Input must be UTF-8; a line that is not is refused with its line number (exit status 2).
A line longer than the model's max_position tokens is truncated, with a warning on stderr.
Lines are read in chunks, sorted by length within a chunk and decoded in batches; from a
terminal, each line is translated as soon as it is typed.

What is written:

* By default one line per input line, the best hypothesis of beam search (section 6.1); an
  empty (or blank) line gives an empty line.
* `--nbest=K` (K <= beam size): the K best hypotheses of each line, best first, in Moses'
  n-best format, which Moses, Marian and the usual reranking scripts read:

      i ||| hypothesis ||| log_prob= L tokens= N ||| score

  `i` is the 0-based line index, L the plain log-probability of the hypothesis (EOS
  included), N its length in tokens (EOS counted), `score` L / ((5 + N) / 6) ** alpha, the
  length-normalised score beam search ranks by. A blank line gets one entry with an empty
  hypothesis and zeros, so that every index appears. Fewer than K entries appear only when
  fewer than K distinct hypotheses exist.
* `--sampling [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S] [--num_samples=N]`: samples
  instead of the search, one line per input line, or with N > 1 the N samples of each line in
  the n-best format above (unsorted; log_prob and score are the model's own, temperature 1 and
  nothing cut, as for beam hypotheses). Sample j of line n depends only on (S, n, j): the same
  seed gives the same output whatever the batch size or the order of the lines.
* `--ensemble=DIR[:STEP],...` decodes with several models at once (see `saved_runs.py`).

Constraints and what else is written:

* Target prefixes (as fairseq's prefix tokens, CTranslate2's target_prefix): an input line
  `source<TAB>prefix` (split at its first tab), or `--prefix=FILE` with one prefix a line
  for as many lines as stdin has (stdin is then read whole first, and its lines are sources
  only). Every hypothesis starts with the prefix's tokens, forced, and is then searched as
  usual (beam, n-best, sampling, ensembles); the output is the whole translation, prefix
  included, and log_prob, tokens and score count the prefix's tokens (as `score` of the
  whole translation does). The prefix is tokenized on its own, so the search may extend its
  last word. An empty prefix changes nothing; one that leaves no room for EOS within the
  line's length bound is refused naming the line.
* `--no_repeat_ngram_size=N`: no hypothesis or sample holds the same N tokens (pieces) in a
  row twice; the prefix's n-grams count, its own tokens are kept even if they repeat.
* `--alignment [--alignment_layer=L]`: after each hypothesis, ` ||| ` and its word alignment
  to the source, `i-j` pairs (source word i, target word j, 0-based, whitespace-separated
  words), as Marian writes it; in the n-best format it is a field of its own after the
  hypothesis: `i ||| hypothesis ||| alignment ||| log_prob= L tokens= N ||| score`. See
  `alignment.py` for how it is read off the attention (default layer: the penultimate).
"""

from __future__ import annotations

import sys

from transformer import alignment, cli, host_decode, run_config, saved_runs
from transformer.errors import UsageError

_WORKDIR = cli.define_workdir_flag()
_DECODING = cli.define_decoding_flags()
_SEARCH = cli.define_search_flags()
_ENSEMBLE = cli.define_ensemble_flag()

CHUNK_BATCHES = 8  # batches read ahead and sorted by length together


def nbest_lines(number: int, hypotheses: list[host_decode.Hypothesis],
                aligned: bool = False) -> list[str]:
    """The Moses n-best entries of input line `number` (1-based; written 0-based), with an
    alignment field after the hypothesis when `aligned`."""
    if not hypotheses:
        hypotheses = [host_decode.Hypothesis('', 0.0, 0.0, 0, '')]

    def entry(h: host_decode.Hypothesis) -> str:
        scores = (f'log_prob= {h.log_prob:.6f} tokens= {h.tokens} ||| {h.score:.6f}'
                  if h.tokens else 'log_prob= 0 tokens= 0 ||| 0')
        return f'{number - 1} ||| {h.text} ||| {h.alignment + " ||| " if aligned else ""}{scores}'

    return [entry(h) for h in hypotheses]


def split_prefixes(lines: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], list[str]]:
    """`source<TAB>prefix` lines -> (lines of sources, their prefixes; '' without a tab)."""
    pairs = [(number, *text.split('\t', 1)) for number, text in lines]
    return ([(p[0], p[1]) for p in pairs], [p[2] if len(p) > 2 else '' for p in pairs])


def main():
    d, s = _DECODING, _SEARCH
    members, home = cli.models_to_load(_WORKDIR.value, _ENSEMBLE.value, d.step.value)
    config = run_config.load_config(home)  # flags are checked before any model is read
    settings = cli.decoding_settings(
        config, beam_size=d.beam_size.value, alpha=d.alpha.value,
        max_extra_length=d.max_extra_length.value, nbest=s.nbest.value,
        sampling=s.sampling.value or None, temperature=s.temperature.value,
        top_k=s.top_k.value, top_p=s.top_p.value, num_samples=s.num_samples.value,
        seed=s.seed.value, no_repeat_ngram_size=d.no_repeat_ngram_size.value)
    if s.alignment_layer.value is not None and not s.alignment.value:
        raise UsageError('--alignment_layer applies to --alignment only')
    layer = None
    if s.alignment.value:
        layer = alignment.resolve_layer(s.alignment_layer.value,
                                        config.model.num_decoder_layers)
    batch_sentences = cli.batch_sentences(d.batch_sentences.value, config)
    chunk = 1 if sys.stdin.isatty() else batch_sentences * CHUNK_BATCHES
    if s.prefix.value is not None:  # read and checked before any model is
        chunks = cli.prefixed_chunks(sys.stdin.buffer, s.prefix.value, chunk)
    else:
        chunks = (split_prefixes(lines) for lines in cli.read_lines(sys.stdin.buffer, chunk))
    loaded = saved_runs.load(members, average=d.average.value, home=home,
                             raw_weights=d.raw_weights.value)
    if layer is not None:  # members may be shallower than the config's model
        layer = alignment.resolve_layer(s.alignment_layer.value, min(
            m.cfg.num_decoder_layers for m in loaded.models))
    models = ', '.join(f'{m["workdir"]} steps {m["steps"]}'
                       + (' (moving average)' if m['weights'] == 'ema' else '')
                       for m in loaded.members)
    aligned = f'; alignments from decoder layer {layer}' if layer is not None else ''
    print(f'translate: {config.source_lang}->{config.target_lang}, {settings.describe()}; '
          f'{"ensemble of " if len(loaded.models) > 1 else ""}{models}{aligned}',
          file=sys.stderr)
    translator = host_decode.Translator(loaded.models, config, loaded.tokenizer, settings,
                                        batch_sentences, alignment_layer=layer)
    scored = s.nbest.value is not None or settings.outputs > 1
    out = sys.stdout.buffer
    for lines, prefixes in chunks:
        for (number, _), hypotheses in zip(lines, translator(lines, prefixes)):
            if scored:
                text = '\n'.join(nbest_lines(number, hypotheses, layer is not None))
            else:
                text = hypotheses[0].text if hypotheses else ''
                if layer is not None:
                    text += f' ||| {hypotheses[0].alignment if hypotheses else ""}'
            out.write(text.encode('utf-8') + b'\n')
        out.flush()


if __name__ == '__main__':
    cli.run(main)
