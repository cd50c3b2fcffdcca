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
* `--ensemble=DIR[:STEP],...` decodes with several models at once (see `ensemble.py`).
"""

from __future__ import annotations

import sys

from transformer import cli, decode, ensemble
from transformer import workdir as workdir_lib

_WORKDIR = cli.define_workdir_flag()
_DECODING = cli.define_decoding_flags()
_SEARCH = cli.define_search_flags()
_ENSEMBLE = cli.define_ensemble_flag()

CHUNK_BATCHES = 8  # batches read ahead and sorted by length together


def nbest_lines(number: int, hypotheses: list[decode.Hypothesis]) -> list[str]:
    """The Moses n-best entries of input line `number` (1-based; written 0-based)."""
    if not hypotheses:
        return [f'{number - 1} |||  ||| log_prob= 0 tokens= 0 ||| 0']
    return [f'{number - 1} ||| {h.text} ||| log_prob= {h.log_prob:.6f} tokens= {h.tokens} '
            f'||| {h.score:.6f}' for h in hypotheses]


def main():
    d, s = _DECODING, _SEARCH
    members, home = cli.models_to_load(_WORKDIR.value, _ENSEMBLE.value, d.step.value)
    config = workdir_lib.load_config(home)  # flags are checked before any model is read
    settings = cli.decoding_settings(
        config, beam_size=d.beam_size.value, alpha=d.alpha.value,
        max_extra_length=d.max_extra_length.value, nbest=s.nbest.value,
        sampling=s.sampling.value or None, temperature=s.temperature.value,
        top_k=s.top_k.value, top_p=s.top_p.value, num_samples=s.num_samples.value,
        seed=s.seed.value)
    batch_sentences = cli.batch_sentences(d.batch_sentences.value, config)
    loaded = ensemble.load(members, average=d.average.value, home=home)
    models = ', '.join(f'{m["workdir"]} steps {m["steps"]}' for m in loaded.members)
    print(f'translate: {config.source_lang}->{config.target_lang}, {settings.describe()}; '
          f'{"ensemble of " if len(loaded.models) > 1 else ""}{models}', file=sys.stderr)
    translator = decode.Translator(
        loaded.models, config, loaded.tokenizer, settings, batch_sentences)
    scored = s.nbest.value is not None or settings.outputs > 1
    chunk = 1 if sys.stdin.isatty() else batch_sentences * CHUNK_BATCHES
    out = sys.stdout.buffer
    for lines in cli.read_lines(sys.stdin.buffer, chunk):
        for (number, _), hypotheses in zip(lines, translator(lines)):
            if scored:
                text = '\n'.join(nbest_lines(number, hypotheses))
            else:
                text = hypotheses[0].text if hypotheses else ''
            out.write(text.encode('utf-8') + b'\n')
        out.flush()


if __name__ == '__main__':
    cli.run(main)
