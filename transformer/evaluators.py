"""The training loop's evaluations as data (config.evals), big_vision's way.

Each entry of config.evals (config.EVAL_TYPES) is an evaluator built here, with
`run(params) -> dict`; the loop runs those due at a step (every `every` steps, and at the last
step) on the weights decoded later, says `line(step, result)` on the console and writes each
result as rows of the metrics, prefix + key (`eval/nll`, `eval/greedy_bleu`, `test/nll`).

'loss': the cross-entropy and per-token perplexity of a whole split (unfiltered). 'bleu': the
sacreBLEU of a split's first `sentences` sentences, greedy or with a beam, a quick signal
(checkpoint averaging and the paper's test set belong to `evaluate`); host-side decoding is
single-process, so a multi-process run leaves BLEU entries out. A split is read and tokenized
once per run, however many evaluators read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from transformer import batching, bleu, errors, host_decode, sharding, stopping
from transformer import config as config_lib


def text_of(entry: dict) -> str:
    """What an entry reads: its split's name, or 'files:PREFIX' for other parallel text."""
    return f'files:{entry["files"]}' if entry['files'] else entry['split']


def entries(config, splits: dict | None = None) -> dict[str, dict]:
    """config.evals as this run evaluates them (config.evals, resolved): BLEU only in a
    single-process run; with `splits`, only the entries whose text was read."""
    return {name: entry for name, entry in config_lib.evals(config).items()
            if (entry['type'] != 'bleu' or jax.process_count() == 1)
            and (splits is None or text_of(entry) in splits)}


def rows(config, splits: dict) -> set[str]:
    """The metric rows this run's evaluators write."""
    return {entry['prefix'] + key for entry in entries(config, splits).values()
            for key in config_lib.eval_keys(entry)}


def read_splits(config, tokenizer) -> dict[str, batching.EncodedSplit]:
    """The splits (and other parallel text, `files`) the evaluators read, each read and
    tokenized once, by `text_of`. Local data whose split is not configured leaves it out,
    with a warning; configured text that cannot be read stops the run before any training
    (DataError)."""
    wanted = {}  # split -> the types of evaluator reading it
    files = []
    for entry in entries(config).values():
        if entry['files']:
            files.append(entry['files'])
        else:
            wanted.setdefault(entry['split'], set()).add(entry['type'])
    splits = {}
    for split in sorted(wanted, key=config_lib.EVAL_SPLITS.index):
        if config.data.source == 'local' and not config.data[split]:
            errors.warn(f'config.data.{split} is not set: no {split} '
                        f'{"loss" if "loss" in wanted[split] else "BLEU"}')
            continue
        splits[split] = batching.encode_split(config, tokenizer, split)
    for prefix in sorted(set(files)):
        splits[f'files:{prefix}'] = batching.encode_split(config, tokenizer, 'validation',
                                                          files=prefix)
    return splits


class Evaluator:
    """An entry of config.evals, ready to run: `every` steps, its rows `prefix` + key."""

    def __init__(self, name: str, entry: dict, split: batching.EncodedSplit):
        self.name, self.every, self.prefix = name, entry['every'], entry['prefix']
        self.split = split

    def run(self, params) -> dict:
        """The results of `params` (the parameters or their moving average)."""
        raise NotImplementedError

    def line(self, step: int, result: dict) -> str:
        """The console line of `result`, the evaluation of step `step`."""
        raise NotImplementedError


class Loss(Evaluator):
    """Cross-entropy and per-token perplexity on a whole split (unfiltered)."""

    def __init__(self, name, entry, split, config, eval_step: Callable, mesh):
        super().__init__(name, entry, split)
        self.eval_step, self.sharding = eval_step, sharding.batch_sharding(mesh)
        self.batches = list(batching.eval_batches(  # this process's
            split, config.data, config.data.eval_batch_sentences,
            process_index=jax.process_index(), process_count=jax.process_count()))

    def run(self, params) -> dict:
        total = np.zeros(2)
        for batch in self.batches:
            arrays = {k: jax.make_array_from_process_local_data(self.sharding, batch[k])
                      for k in ('inputs', 'targets')}
            total += np.asarray(self.eval_step(params, arrays))
        nll = total[0] / max(total[1], 1.0)
        return {'nll': nll, 'perplexity': math.exp(min(nll, 50.0)), 'target_tokens': total[1]}

    def line(self, step, result):
        return (f'step {step} {self.split.name}: nll {result["nll"]:.4f}, '
                f'perplexity {result["perplexity"]:.3f}')


class Bleu(Evaluator):
    """sacreBLEU of the first `sentences` sentences of a split, decoded greedily or with a
    beam (decode.length_penalty, decode.max_extra_length): only those sentences are batched
    and decoded, from the split read once per run."""

    def __init__(self, name, entry, split, config, tokenizer, graphdef):
        super().__init__(name, entry, split)
        self.config, self.tokenizer, self.graphdef = config, tokenizer, graphdef
        self.sentences, self.beam_size = entry['sentences'], entry['beam_size']
        self.settings = host_decode.settings(config, beam_size=self.beam_size)
        (self.key,) = config_lib.eval_keys(entry)

    def run(self, params) -> dict:
        batch = self.config.decode.batch_sentences
        decoder = host_decode.make_decoder(nnx.merge(self.graphdef, params), self.config,
                                           self.settings, batch)
        hypotheses, _ = host_decode.translate_split(decoder, self.config, self.tokenizer,
                                                    self.split, batch, limit=self.sentences,
                                                    check=stopping.raise_if_interrupted)
        ordered = [hypotheses[i] for i in sorted(hypotheses)]
        # A lowercasing vocabulary (data.lowercase) writes lowercase: score it so.
        return {self.key: bleu.sacrebleu_score(ordered, self.split.references[:len(ordered)],
                                               lowercase=bool(self.config.data.lowercase))[0]}

    def line(self, step, result):
        search = 'greedy' if self.beam_size == 1 else f'beam-{self.beam_size}'
        case = 'lowercased ' if self.config.data.lowercase else ''
        return (f'step {step} {search} {case}BLEU on {self.sentences} {self.split.name} '
                f'sentences: {result[self.key]:.2f}')


def make(config, tokenizer, splits: dict, graphdef, eval_step: Callable,
         mesh) -> list[Evaluator]:
    """This run's evaluators, in the order of their names (the order they run in);
    `eval_step(params, batch)` is the jitted loss of a batch (train_step.make_eval_step)."""
    made = []
    for name, entry in entries(config, splits).items():
        split = splits[text_of(entry)]
        if entry['type'] == 'loss':
            made.append(Loss(name, entry, split, config, eval_step, mesh))
        else:
            made.append(Bleu(name, entry, split, config, tokenizer, graphdef))
    return made
