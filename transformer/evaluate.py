"""`python -m transformer.evaluate --workdir=DIR [--split=test] [--average=K] [--beam_size=4]`.

Translates every sentence of a split with beam search (section 6.1: beam 4, alpha 0.6, at most
input length + 50 tokens) and scores it against the references:

* sacreBLEU, detokenized and cased, with its signature (the number to compare across papers);
* the paper's tokenized BLEU: Moses-tokenized, hyphenated compounds split, multi-bleu;
* lowercased sacreBLEU (how Multi30k results are often given) and chrF.

The split is never length-filtered; sources longer than model.max_position tokens (EOS
included) are truncated, and their count is reported. Parameters are averaged over the last
`--average` checkpoints (default: the config's decode.average_last, or as many as there are).

Writes DIR/eval/<split>_<what>.hyp (one hypothesis per source line, in order) and
DIR/eval/<split>_<what>.json (the scores, settings and speed), and prints the JSON.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import flags, logging

from transformer import bleu, checkpoint, cli, data, decode, sharding
from transformer import tokenizer as tokenizer_lib

EVAL_DIR = 'eval'


def define_flags():
    """The command's flags; defined only when run as a program, so that translate and attention
    can import this module's helpers and define their own."""
    flags.DEFINE_string('workdir', None, 'Work directory of a training run.')
    flags.DEFINE_string('split', 'test', 'Split to translate: test, validation or train.')
    define_decoding_flags()
    flags.DEFINE_integer('limit', None, 'Score only the first N sentences (for quick looks; '
                         'the result is then not a test-set score).')


def define_decoding_flags():
    """--average, --step, --beam_size, --alpha, --max_extra_length, --batch_sentences."""
    flags.DEFINE_integer('average', None, 'Average the last K checkpoints (default: the '
                         'config\'s decode.average_last, at most the checkpoints there).')
    flags.DEFINE_integer('step', None, 'Use this checkpoint step (no averaging).')
    flags.DEFINE_integer('beam_size', None, 'Beam size (default: decode.beam_size; 1 = greedy).')
    flags.DEFINE_float('alpha', None, 'Length penalty alpha (default: decode.length_penalty).')
    flags.DEFINE_integer('max_extra_length', None, 'Output may be this much longer than the '
                         'input (default: decode.max_extra_length).')
    flags.DEFINE_integer('batch_sentences', None, 'Sentences per decoding batch '
                         '(default: decode.batch_sentences).')




# -- shared by evaluate, translate and attention ------------------------------------------------


def load(workdir: str, *, average: int | None = None, step: int | None = None):
    """(model, config, tokenizer, steps) of a work directory, with one-line errors.

    `average=None` averages the config's decode.average_last checkpoints, or all there are
    when fewer; an explicit `average` must be available.
    """
    if not workdir:
        raise cli.UsageError('--workdir is required')
    if not os.path.isdir(workdir):
        raise cli.UsageError(f'work directory {workdir!r} does not exist')
    config = cli.load_workdir_config(workdir)
    if step is not None:
        if average not in (None, 1):
            raise cli.UsageError('--step and --average > 1 exclude each other')
        average = 1
    elif average is None:
        available = checkpoint.available_steps(workdir)
        if not available:
            raise cli.UsageError(f'no checkpoint in {os.path.join(workdir, checkpoint.CHECKPOINTS)}'
                                 ': train first (python -m transformer.train)')
        average = max(1, min(config.decode.average_last, len(available)))
    elif average < 1:
        raise cli.UsageError(f'--average={average} must be >= 1')
    model, config, info = checkpoint.load_model(workdir, average=average, step=step)
    tokenizer = tokenizer_lib.load(workdir)
    return model, config, tokenizer, info['steps']


def decode_settings(config, beam_size=None, alpha=None, max_extra_length=None):
    d = config.decode
    settings = dict(beam_size=d.beam_size if beam_size is None else beam_size,
                    alpha=float(d.length_penalty if alpha is None else alpha),
                    max_extra_length=d.max_extra_length if max_extra_length is None
                    else max_extra_length)
    if settings['beam_size'] < 1:
        raise cli.UsageError(f'--beam_size={settings["beam_size"]} must be >= 1')
    if settings['max_extra_length'] < 0:
        raise cli.UsageError(f'--max_extra_length={settings["max_extra_length"]} must be >= 0')
    return settings


def make_decoder(model, settings, batch_sentences: int, devices=None) -> decode.Decoder:
    """A Decoder over this process's devices (batch split over them, parameters replicated)."""
    mesh = sharding.make_mesh(devices=jax.local_devices() if devices is None else devices)
    return decode.Decoder(model, batch_size=batch_sentences, mesh=mesh, **settings)


def steps_label(steps: list[int]) -> str:
    if len(steps) == 1:
        return f'step{steps[0]}'
    return f'step{steps[-1]}_avg{len(steps)}'


# -- evaluation ---------------------------------------------------------------------------------


def translate_split(decoder: decode.Decoder, config, tokenizer, split: str,
                    batch_sentences: int, limit: int | None = None):
    """Hypotheses (strings, in split order) for every sentence this process decodes.

    Returns (hypotheses dict index -> text, stats dict).
    """
    hypotheses: dict[int, str] = {}
    generated = 0
    # Read and encode first, so that the time is the decoding's (compilation included).
    batches = list(data.eval_batches(config, tokenizer, split, batch_sentences,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()))
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        index = batch['index']
        keep = index >= 0
        if limit is not None:
            keep &= index < limit
        if not keep.any():
            continue
        inputs = batch['inputs']
        width = max(int((inputs != decode.PAD_ID).sum(axis=1).max()), 1)
        tokens, _ = decoder(inputs[:, :width])
        lengths = np.asarray(decode.hypothesis_lengths(tokens))
        for row in np.flatnonzero(keep):
            hypotheses[int(index[row])] = tokenizer.decode(tokens[row].tolist())
            generated += int(lengths[row])
        if i % 10 == 0:
            logging.info('%s: %d sentences decoded', split, len(hypotheses))
    seconds = time.perf_counter() - start
    return hypotheses, {'decode_seconds': seconds, 'generated_tokens': generated,
                        'decode_steps': decoder.steps,
                        'compiled_shapes': len(decoder.shapes_compiled)}


def count_truncated(config, tokenizer, sources: list[str]) -> int:
    limit = config.model.max_position - 1  # room for EOS
    ids = tokenizer.encode_batch(sources)
    return sum(len(x) > limit for x in ids)


def evaluate(workdir: str, *, split: str = 'test', average: int | None = None,
             step: int | None = None, beam_size: int | None = None, alpha: float | None = None,
             max_extra_length: int | None = None, batch_sentences: int | None = None,
             limit: int | None = None) -> dict:
    """Decodes and scores a split; writes the .hyp and .json files; returns the JSON dict."""
    if split not in data.SPLITS:
        raise cli.UsageError(f'--split={split!r}; valid: {", ".join(data.SPLITS)}')
    model, config, tokenizer, steps = load(workdir, average=average, step=step)
    settings = decode_settings(config, beam_size, alpha, max_extra_length)
    batch_sentences = batch_sentences or config.decode.batch_sentences
    if batch_sentences < 1:
        raise cli.UsageError(f'--batch_sentences={batch_sentences} must be >= 1')
    sources, references = data.load_text(config, split)
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    truncated = count_truncated(config, tokenizer, sources)
    if truncated:
        logging.warning('%s: %d source sentences longer than model.max_position=%d tokens are '
                        'truncated', split, truncated, config.model.max_position)

    decoder = make_decoder(model, settings, batch_sentences)
    hypotheses, stats = translate_split(decoder, config, tokenizer, split, batch_sentences, limit)

    label = f'{split}_{steps_label(steps)}_beam{settings["beam_size"]}_alpha{settings["alpha"]:g}'
    if limit is not None:
        label += f'_first{limit}'
    out_dir = os.path.join(workdir, EVAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    hypotheses = _gather(hypotheses, out_dir, label)
    if len(hypotheses) != len(sources):
        raise RuntimeError(f'decoded {len(hypotheses)} of {len(sources)} sentences')
    ordered = [hypotheses[i] for i in range(len(sources))]
    result = {
        'workdir': workdir,
        'split': split,
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
    if jax.process_index() == 0:
        hyp_path = os.path.join(out_dir, label + '.hyp')
        _write_lines(hyp_path, ordered)
        result['hypotheses_file'] = hyp_path
        with open(os.path.join(out_dir, label + '.json'), 'w') as f:
            json.dump(result, f, indent=2)
    return result


def _write_lines(path: str, lines: list[str]) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        for line in lines:
            # A hypothesis never holds a newline (SentencePiece pieces cannot), but be sure.
            f.write(line.replace('\n', ' ') + '\n')
    os.replace(tmp, path)


def _gather(hypotheses: dict[int, str], out_dir: str, label: str) -> dict[int, str]:
    """With several processes, every process's hypotheses (through the shared workdir)."""
    if jax.process_count() == 1:
        return hypotheses
    from jax.experimental import multihost_utils
    part = os.path.join(out_dir, f'.{label}.part{jax.process_index()}.json')
    with open(part, 'w') as f:
        json.dump(hypotheses, f)
    multihost_utils.sync_global_devices(f'evaluate {label} parts written')
    merged = {}
    for p in range(jax.process_count()):
        with open(os.path.join(out_dir, f'.{label}.part{p}.json')) as f:
            merged.update({int(k): v for k, v in json.load(f).items()})
    multihost_utils.sync_global_devices(f'evaluate {label} parts read')
    os.remove(part)
    return merged


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    f = flags.FLAGS
    result = evaluate(f.workdir, split=f.split, average=f.average, step=f.step,
                      beam_size=f.beam_size, alpha=f.alpha, max_extra_length=f.max_extra_length,
                      batch_sentences=f.batch_sentences, limit=f.limit)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))


if __name__ == '__main__':
    define_flags()
    cli.run(main)
