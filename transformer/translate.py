"""`python -m transformer.translate --workdir=DIR [--beam_size=4] [--average=K] < in > out`.

Reads source sentences from stdin, one per line, and writes one translation per line to
stdout, in order: an empty (or blank) line gives an empty line. Input must be UTF-8; a line that
is not is refused with its line number (exit status 2). A line longer than the model's
max_position tokens is truncated, with a warning on stderr. Lines are read in chunks, sorted by
length within a chunk and decoded in batches; from a terminal, each line is translated as soon
as it is typed.
"""

from __future__ import annotations

import sys
from typing import BinaryIO, Iterator

from absl import flags

from transformer import cli, decode
from transformer import evaluate as evaluate_lib
from transformer.tokenizer import EOS_ID


def define_flags():
    """Defined only when run as a program, so that importing this module defines no flags."""
    flags.DEFINE_string('workdir', None, 'Work directory of a training run.')
    evaluate_lib.define_decoding_flags()


CHUNK_BATCHES = 8  # batches read ahead and sorted by length together


def read_lines(stream: BinaryIO, chunk: int) -> Iterator[list[tuple[int, str]]]:
    """Chunks of (1-based line number, text without the line break); UsageError on bad UTF-8."""
    lines = []
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise cli.UsageError(f'stdin line {number} is not valid UTF-8 ({e.reason} at byte '
                                 f'{e.start}); translate reads UTF-8 text') from None
        lines.append((number, text.rstrip('\r\n')))
        if len(lines) >= chunk:
            yield lines
            lines = []
    if lines:
        yield lines


class Translator:
    """Text in, text out, batched; keeps the compiled decoder between calls."""

    def __init__(self, model, config, tokenizer, settings: dict, batch_sentences: int,
                 warn=None, devices=None):
        self.tokenizer = tokenizer
        self.batch_sentences = batch_sentences
        self.limit = config.model.max_position - 1  # room for EOS
        self.decoder = evaluate_lib.make_decoder(model, settings, batch_sentences, devices)
        self.warn = warn or (lambda message: print(f'warning: {message}', file=sys.stderr))

    def __call__(self, lines: list[tuple[int, str]]) -> list[str]:
        """Translations of (line number, text) pairs, in the given order."""
        out = [''] * len(lines)
        work = []
        for position, (number, text) in enumerate(lines):
            if not text.strip():
                continue
            ids = self.tokenizer.encode(text)
            if len(ids) > self.limit:
                self.warn(f'line {number}: {len(ids)} tokens; truncated to the first '
                          f'{self.limit} (model.max_position={self.limit + 1} with EOS)')
                ids = ids[:self.limit]
            work.append((position, ids + [EOS_ID]))
        work.sort(key=lambda item: len(item[1]))
        for start in range(0, len(work), self.batch_sentences):
            group = work[start:start + self.batch_sentences]
            width = max(len(ids) for _, ids in group)
            inputs = [ids + [decode.PAD_ID] * (width - len(ids)) for _, ids in group]
            tokens, _ = self.decoder(inputs)
            for (position, _), row in zip(group, tokens):
                text = self.tokenizer.decode(row.tolist())
                out[position] = text.replace('\r', ' ').replace('\n', ' ')
        return out


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    FLAGS = flags.FLAGS
    model, config, tokenizer, steps = evaluate_lib.load(
        FLAGS.workdir, average=FLAGS.average, step=FLAGS.step)
    settings = evaluate_lib.decode_settings(config, FLAGS.beam_size, FLAGS.alpha,
                                            FLAGS.max_extra_length)
    batch_sentences = FLAGS.batch_sentences or config.decode.batch_sentences
    if batch_sentences < 1:
        raise cli.UsageError(f'--batch_sentences={batch_sentences} must be >= 1')
    print(f'translate: {config.source_lang}->{config.target_lang}, checkpoint steps {steps}, '
          f'beam {settings["beam_size"]}, alpha {settings["alpha"]:g}', file=sys.stderr)
    translator = Translator(model, config, tokenizer, settings, batch_sentences)
    interactive = sys.stdin.isatty()
    chunk = 1 if interactive else batch_sentences * CHUNK_BATCHES
    out = sys.stdout.buffer
    for lines in read_lines(sys.stdin.buffer, chunk):
        for text in translator(lines):
            out.write(text.encode('utf-8') + b'\n')
        out.flush()


if __name__ == '__main__':
    define_flags()
    cli.run(main)
