"""`python -m transformer.score --workdir=DIR --source=F --target=F > scores.tsv`: forced decoding.

Scores given translations under the model (teacher forcing, no label smoothing), as fairseq's
`--score-reference` and Marian's scorer do: for each pair one line on stdout, in input order,

    log_prob <TAB> tokens <TAB> perplexity

the log-probability of the target given the source (natural log, EOS included), its length in
tokens (EOS counted) and the per-token perplexity exp(-log_prob / tokens). After the last
pair, one JSON line on stderr gives the corpus figures: sentences, tokens, log_prob and the
corpus perplexity exp(-sum log_prob / sum tokens), and the models used.

Pairs come from two files of as many lines (`--source`, `--target`), or from stdin as
`source<TAB>target` lines. Parameters are averaged as for evaluate (`--average`, `--step`), and
A translation made with a target prefix is scored whole: its log-probability counts the
prefix's tokens, as translate's n-best scores do. `--ensemble=DIR[:STEP],...` scores under an
ensemble (the mean of its members' probabilities at
each token, as its search uses). The log-probability of a beam search's own output equals the
log-probability the search reported for it (the text is tokenized afresh, so a hypothesis
whose pieces are not the tokenizer's own segmentation of its text, which is rare, is scored as
the tokenizer segments it). A side longer than the model's max_position is truncated with a
warning naming its line.
"""

from __future__ import annotations

import json
import math
import sys

from absl import flags

from transformer import cli, data, host_decode, run_config, saved_runs
from transformer.errors import UsageError

_WORKDIR = cli.define_workdir_flag()
_SOURCE = flags.DEFINE_string('source', None, 'File of source sentences, one per line.')
_TARGET = flags.DEFINE_string('target', None, 'File of their translations, as many lines.')
_DECODING = cli.define_decoding_flags()
_ENSEMBLE = cli.define_ensemble_flag()

CHUNK_BATCHES = 8  # batches read ahead and sorted by length together


def file_pairs(source: str, target: str) -> list[tuple[int, str, str]]:
    """(line number, source, target) of two files of as many lines."""
    sources, targets = data.read_lines(source), data.read_lines(target)
    if len(sources) != len(targets):
        raise UsageError(f'--source={source} has {len(sources)} lines but --target={target} '
                         f'has {len(targets)}')
    return [(n, s, t) for n, (s, t) in enumerate(zip(sources, targets), start=1)]


def stdin_pairs(chunk: int):
    """Chunks of (line number, source, target) from `source<TAB>target` lines on stdin."""
    for lines in cli.read_lines(sys.stdin.buffer, chunk):
        pairs = []
        for number, text in lines:
            if '\t' not in text:
                raise UsageError(f'stdin line {number} has no tab between source and target '
                                 '(or give --source and --target)')
            source, target = text.split('\t', 1)
            pairs.append((number, source, target))
        yield pairs


def main():
    d = _DECODING
    if (_SOURCE.value is None) != (_TARGET.value is None):
        raise UsageError('--source and --target go together (or give neither and pairs on '
                         'stdin as source<TAB>target)')
    for name in ('beam_size', 'alpha', 'max_extra_length', 'no_repeat_ngram_size'):
        if getattr(d, name).value is not None:
            raise UsageError(f'--{name} does not apply to score: nothing is searched')
    members, home = cli.models_to_load(_WORKDIR.value, _ENSEMBLE.value, d.step.value)
    config = run_config.load_config(home)
    batch_sentences = cli.batch_sentences(d.batch_sentences.value, config)
    if _SOURCE.value is not None:  # read and checked before any model is
        pairs = file_pairs(_SOURCE.value, _TARGET.value)
        chunks = (pairs[i:i + batch_sentences * CHUNK_BATCHES]
                  for i in range(0, len(pairs), batch_sentences * CHUNK_BATCHES))
    else:
        chunks = stdin_pairs(1 if sys.stdin.isatty() else batch_sentences * CHUNK_BATCHES)
    loaded = saved_runs.load(members, average=d.average.value, home=home,
                             raw_weights=d.raw_weights.value)
    scorer = host_decode.Scorer(loaded.models, config, loaded.tokenizer, batch_sentences)
    total_log_prob, total_tokens, sentences = 0.0, 0, 0
    out = sys.stdout
    for chunk in chunks:
        for log_prob, tokens in scorer(chunk):
            out.write(f'{log_prob:.6f}\t{tokens}\t{math.exp(-log_prob / tokens):.6f}\n')
            total_log_prob += log_prob
            total_tokens += tokens
            sentences += 1
        out.flush()
    summary = dict(sentences=sentences, tokens=total_tokens, log_prob=total_log_prob,
                   perplexity=math.exp(-total_log_prob / total_tokens) if total_tokens else None,
                   direction=f'{config.source_lang}->{config.target_lang}',
                   models=loaded.members)
    print(json.dumps(summary), file=sys.stderr)


if __name__ == '__main__':
    cli.run(main)
