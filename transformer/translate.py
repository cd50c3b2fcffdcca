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
from collections.abc import Iterator
from typing import BinaryIO

from transformer import cli, decode, trained
from transformer.errors import UsageError

_WORKDIR = cli.define_workdir_flag()
_DECODING = cli.define_decoding_flags()

CHUNK_BATCHES = 8  # batches read ahead and sorted by length together


def read_lines(stream: BinaryIO, chunk: int) -> Iterator[list[tuple[int, str]]]:
    """Chunks of (1-based line number, text without the line break); UsageError on bad UTF-8."""
    lines = []
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise UsageError(f'stdin line {number} is not valid UTF-8 ({e.reason} at byte '
                             f'{e.start}); translate reads UTF-8 text') from None
        lines.append((number, text.rstrip('\r\n')))
        if len(lines) >= chunk:
            yield lines
            lines = []
    if lines:
        yield lines


def main():
    d = _DECODING
    model, config, tokenizer, steps = trained.load_model(
        _WORKDIR.value, average=d.average.value, step=d.step.value)
    settings = decode.settings(config, d.beam_size.value, d.alpha.value,
                               d.max_extra_length.value)
    batch_sentences = cli.batch_sentences(d.batch_sentences.value, config)
    print(f'translate: {config.source_lang}->{config.target_lang}, checkpoint steps {steps}, '
          f'beam {settings["beam_size"]}, alpha {settings["alpha"]:g}', file=sys.stderr)
    translator = decode.Translator(
        model, config, tokenizer, settings, batch_sentences,
        warn=lambda message: print(f'warning: {message}', file=sys.stderr))
    chunk = 1 if sys.stdin.isatty() else batch_sentences * CHUNK_BATCHES
    out = sys.stdout.buffer
    for lines in read_lines(sys.stdin.buffer, chunk):
        for text in translator(lines):
            out.write(text.encode('utf-8') + b'\n')
        out.flush()


if __name__ == '__main__':
    cli.run(main)
