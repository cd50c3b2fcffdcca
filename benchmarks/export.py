"""Decoding speed and BLEU of one trained model through its exports: the project's own beam search
(JAX, what `evaluate` runs), CTranslate2 float32 and int8, and Hugging Face's MarianMTModel
(PyTorch), beam 4 each, at equal batch size, on one split.

    python -m transformer.train --config=configs/demo.py --workdir=/tmp/demo_export
    python benchmarks/export.py --workdir=/tmp/demo_export [--split=test] [--batch=32] [--runs=5]

Runs are interleaved (one of each system per round, `--runs` rounds after a warm-up round that
compiles and loads) and the medians reported, so that a load from elsewhere on the machine
falls on every system alike. Prints ONE JSON object.

Length penalties differ: the project ranks finished hypotheses by log p / ((5 + len) / 6)^alpha
(GNMT, section 6.1's alpha = 0.6); CTranslate2 and Transformers divide by len^alpha. The
`length_penalty` section decodes once more with alpha = 0 on both sides (plain log p, the same
ranking everywhere) to separate the penalty's effect from any other difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import versus_flax as vf  # noqa: E402 - the benchmarks' shared JSON header
from transformer import data, exported, exporting, host_decode, saved_runs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='/tmp/demo_export')
    parser.add_argument('--split', default='test')
    parser.add_argument('--batch', type=int, default=32, help='sentences per batch, every system')
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--threads', type=int, default=os.cpu_count(),
                        help='CPU threads for CTranslate2 and PyTorch (JAX takes all cores)')
    parser.add_argument('--no_hf', action='store_true',
                        help='leave out Hugging Face (PyTorch beam search takes minutes on a '
                        'base-size model)')
    args = parser.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)
    load_before = os.getloadavg()

    model, config, tokenizer, steps = saved_runs.load_model(args.workdir)
    sources, references = data.load_text(config, args.split)
    beam, alpha = config.decode.beam_size, config.decode.length_penalty
    bounds = dict(max_extra_length=config.decode.max_extra_length,
                  max_position=config.model.max_position, batch_size=args.batch)
    scratch = tempfile.mkdtemp(prefix='export-bench-')
    for name, to, quantization in (('ct2_float32', 'ctranslate2', 'float32'),
                                   ('ct2_int8', 'ctranslate2', 'int8'),
                                   ('hf', 'huggingface', 'float32'))[:2 if args.no_hf else 3]:
        exporting.export(args.workdir, to=to, out=os.path.join(scratch, name),
                         quantization=quantization)
    ct2_f32 = exported.ct2_load(os.path.join(scratch, 'ct2_float32'), threads=args.threads)
    ct2_int8 = exported.ct2_load(os.path.join(scratch, 'ct2_int8'), threads=args.threads)
    hf = None if args.no_hf else exported.hf_load(os.path.join(scratch, 'hf'),
                                                  threads=args.threads)
    lines = list(enumerate(sources, 1))

    def ours(alpha=alpha):
        translator = ours.translators.setdefault(alpha, host_decode.Translator(
            [model], config, tokenizer, host_decode.settings(config, alpha=alpha), args.batch))
        return [h[0].text if h else '' for h in translator(lines)]
    ours.translators = {}

    systems = {
        'ours_jax': ours,
        'ct2_float32': lambda: exported.ct2_translate(*ct2_f32, sources, beam_size=beam,
                                                      alpha=alpha, **bounds),
        'ct2_int8': lambda: exported.ct2_translate(*ct2_int8, sources, beam_size=beam,
                                                   alpha=alpha, **bounds),
        'hf_marian': lambda: exported.hf_translate(*hf, sources, beam_size=beam, alpha=alpha,
                                                   **bounds),
    }
    if args.no_hf:
        del systems['hf_marian']
    seconds = {name: [] for name in systems}
    outputs = {}
    for round_ in range(args.runs + 1):  # round 0: compile, load, warm caches; not timed
        for name, run in systems.items():
            start = time.perf_counter()
            outputs[name] = run()
            if round_:
                seconds[name].append(time.perf_counter() - start)
        log(f'round {round_}: ' + ', '.join(f'{n} {s[-1]:.2f} s' for n, s in seconds.items()
                                             if s))
    results = {}
    base = statistics.median(seconds['ours_jax'])
    for name in systems:
        median = statistics.median(seconds[name])
        results[name] = dict(
            seconds_median=median, seconds=seconds[name],
            sentences_per_second=len(sources) / median, speedup_over_ours=base / median,
            sacrebleu=exported.bleu_of(outputs[name], references),
            same_output_as_ours=sum(a == b for a, b in zip(outputs[name], outputs['ours_jax']))
            / len(sources))

    # The length penalty's share of the differences: alpha = 0 everywhere (plain log p).
    plain = {'ours_jax': ours(0.0),
             'ct2_float32': exported.ct2_translate(*ct2_f32, sources, beam_size=beam, alpha=0.0,
                                                   **bounds),
             **({} if args.no_hf else {'hf_marian': exported.hf_translate(
                 *hf, sources, beam_size=beam, alpha=0.0, **bounds)})}
    length_penalty = {
        'ours': f'log p / ((5 + len) / 6) ** {alpha} (GNMT, section 6.1)',
        'ctranslate2_and_transformers': f'log p / len ** {alpha}',
        'sacrebleu_alpha0': {n: exported.bleu_of(h, references) for n, h in plain.items()},
        'same_output_as_ours_alpha0': {
            n: sum(a == b for a, b in zip(h, plain['ours_jax'])) / len(sources)
            for n, h in plain.items()},
        'mean_output_words': {n: sum(len(h.split()) for h in outputs[n]) / len(sources)
                              for n in systems},
    }
    print(json.dumps({
        **vf.header('export', load_before),
        'workdir': args.workdir, 'steps': steps, 'split': args.split,
        'sentences': len(sources), 'batch_sentences': args.batch, 'beam_size': beam,
        'alpha': alpha, 'threads_ct2_torch': args.threads, 'runs': args.runs,
        'model': {k: config.model[k] for k in ('num_encoder_layers', 'd_model', 'd_ff',
                                                 'num_heads')}, 'vocab_size': config.vocab_size,
        'systems': results, 'length_penalty': length_penalty,
        'versions': _versions(),
    }, indent=2))
    shutil.rmtree(scratch, ignore_errors=True)


def _versions() -> dict:
    import ctranslate2
    import torch
    import transformers
    return dict(ctranslate2=ctranslate2.__version__, torch=torch.__version__,
                transformers=transformers.__version__)


if __name__ == '__main__':
    main()
