"""Decoding on the host: the settings of a search, batches of token ids through it, and what the
programs decode: whole splits (train's greedy BLEU, evaluate), lines of text (translate) and
given translations to score (score).

* `Settings`: which search (beam search with an n-best list, or sampling) with which
  parameters; `settings` fills them from the config's `decode` fields and checks them, naming
  the field (`cli` maps fields to flags).
* `Decoder` pads batches to a few shapes (rows: a multiple of the devices; source length: the
  bucket ladder training uses) and keeps them compiled; it runs `search.search` or
  `search.sample`, and forced decoding (`score`).
* `translate_split`, `Translator`, `Scorer` turn splits and text into those batches and back.

The searches themselves, on the device, are in `search.py`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from transformer import alignment, batching, search, sharding
from transformer.errors import UsageError
from transformer.tokenizer import PAD_ID

# -- settings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to search for. Beam search (section 6.1) unless `sampling`.

    beam_size 1 is greedy decoding; `nbest` hypotheses per sentence (at most beam_size) are
    returned. Sampling draws `num_samples` per sentence from the model's distribution at
    `temperature`, cut to the `top_k` best tokens (0: no cut) and to the nucleus of mass
    `top_p` (1: no cut), with keys from `seed` and each sentence's id. `alpha` (the length
    penalty) ranks beam hypotheses and scores samples; `max_extra_length` bounds both.
    `no_repeat_ngram_size` N > 0 forbids either from repeating any N tokens in a row (0: no
    rule).
    """

    beam_size: int = 4
    alpha: float = 0.6
    max_extra_length: int = 50
    nbest: int = 1
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    no_repeat_ngram_size: int = 0

    @property
    def outputs(self) -> int:
        """Hypotheses per sentence."""
        return self.num_samples if self.sampling else self.nbest

    def describe(self) -> str:
        rule = (f', no repeated {self.no_repeat_ngram_size}-grams'
                if self.no_repeat_ngram_size else '')
        if not self.sampling:
            search_ = 'greedy' if self.beam_size == 1 else f'beam {self.beam_size}'
            nbest = f', {self.nbest}-best' if self.nbest > 1 else ''
            return f'{search_}, alpha {self.alpha:g}{nbest}{rule}'
        cuts = ''.join([f', top-k {self.top_k}' if self.top_k else '',
                        f', top-p {self.top_p:g}' if self.top_p < 1 else ''])
        return (f'sampling {self.num_samples} per line, temperature {self.temperature:g}'
                f'{cuts}, seed {self.seed}{rule}')


# The config field behind each setting the config provides.
CONFIG_FIELDS = {'beam_size': 'decode.beam_size', 'alpha': 'decode.length_penalty',
                 'max_extra_length': 'decode.max_extra_length'}
_SAMPLING_ONLY = ('temperature', 'top_k', 'top_p', 'num_samples', 'seed')


class SettingError(UsageError):
    """A decoding setting out of range: `name` (the Settings field), its `value`, the `rule`.

    The message names the config field behind it (e.g. `decode.beam_size=0 must be >= 1`), or
    the setting; `cli` names the flag instead when a flag gave the value.
    """

    def __init__(self, name: str, value, rule: str):
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f'{CONFIG_FIELDS.get(name, name)}={value} {rule}')


def settings(config, **given) -> Settings:
    """The settings of a search: the config's decode.beam_size, decode.length_penalty and
    decode.max_extra_length unless given, the other fields' defaults unless given (None counts
    as not given); SettingError names what is out of range."""
    d = config.decode
    values = dict(beam_size=d.beam_size, alpha=float(d.length_penalty),
                  max_extra_length=d.max_extra_length)
    values.update({k: v for k, v in given.items() if v is not None})
    s = Settings(**values)
    check(s, given_fields={k for k, v in given.items() if v is not None},
          vocab_size=config.vocab_size)
    return s


def check(s: Settings, given_fields=(), vocab_size: int | None = None) -> None:
    """SettingError for the first setting out of range; `given_fields` are those set on
    purpose (a sampling-only one without sampling is refused, not ignored)."""

    def need(ok: bool, name: str, rule: str):
        if not ok:
            raise SettingError(name, getattr(s, name), rule)

    need(s.beam_size >= 1, 'beam_size', 'must be >= 1')
    need(s.max_extra_length >= 0, 'max_extra_length', 'must be >= 0')
    need(np.isfinite(s.alpha), 'alpha', 'must be a finite number')
    need(s.nbest >= 1, 'nbest', 'must be >= 1')
    if s.sampling:
        rule = 'is for beam search; sampling draws num_samples hypotheses instead'
        need(s.nbest == 1 and 'nbest' not in given_fields, 'nbest', rule)
        need('beam_size' not in given_fields, 'beam_size', rule)
    else:
        need(s.nbest <= s.beam_size, 'nbest', f'must be at most the beam size ({s.beam_size})')
        for name in _SAMPLING_ONLY:
            need(name not in given_fields, name, 'applies to sampling only')
    need(0 < s.temperature < float('inf'), 'temperature', 'must be > 0')
    need(s.top_k >= 0, 'top_k', 'must be >= 0 (0: no cut)')
    need(vocab_size is None or s.top_k <= vocab_size, 'top_k',
         f'must be at most the vocabulary size ({vocab_size})')
    need(0 < s.top_p <= 1, 'top_p', 'must be in (0, 1] (1: no cut)')
    need(s.num_samples >= 1, 'num_samples', 'must be >= 1')
    need(0 <= s.seed < 2 ** 32, 'seed', 'must be in [0, 2**32)')
    # 0 is "no rule" as a default, but asking for it is a mistake (fairseq's 0 means off).
    need(s.no_repeat_ngram_size >= (1 if 'no_repeat_ngram_size' in given_fields else 0),
         'no_repeat_ngram_size', 'must be >= 1')


def max_output_length(source_tokens: int, s: Settings, max_position: int) -> int:
    """The most tokens (EOS counted) a hypothesis of a source of `source_tokens` (EOS
    counted) may have: search.max_output_lengths's bound."""
    return min(source_tokens + s.max_extra_length, max_position)


# -- batches through the search ---------------------------------------------------------------


class Decoder:
    """Runs the search of `settings` on batches of any size and length with few compilations.

    Batches are padded to `batch_size` rows (a multiple of the mesh's device count) and to a
    source length on the bucket ladder (`batching.padded_length`, the one training uses), so a
    whole test set compiles a handful of shapes; the jitted function is cached per shape by
    jax.jit. With a mesh, inputs are laid out with `sharding.batch_sharding(mesh)` and
    parameters replicated. `models` is a model or a sequence of models (an ensemble).
    """

    def __init__(self, models, settings: Settings, *, batch_size: int = 64, mesh=None,
                 bucket_step: int = 4, bucket_growth: float = 1.15):
        models = list(models) if isinstance(models, Sequence) else [models]
        vocab = models[0].vocab_size
        if any(m.vocab_size != vocab for m in models):
            raise ValueError(f'ensemble members have different vocabulary sizes: '
                             f'{[m.vocab_size for m in models]}')
        check(settings, vocab_size=vocab)
        self.settings = settings
        self.max_position = min(m.cfg.max_position for m in models)
        devices = mesh.size if mesh is not None else 1
        self.batch_size = batching.round_up(max(batch_size, 1), devices)
        self.graphdefs, params = search.split(models)
        self._input_sharding = None
        if mesh is not None:
            params = jax.device_put(params, sharding.replicated(mesh))
            self._input_sharding = sharding.batch_sharding(mesh)
        self.params = params
        self._ladder = (bucket_step, bucket_growth)
        self.shapes_compiled: set[tuple[int, int]] = set()
        self.steps = 0  # decoding steps run so far (over all batches)
        self.batches = 0  # batches decoded so far

    def _pad(self, rows, what: str) -> tuple[jax.Array, int]:
        """rows [n, L] -> (a [batch_size, width] array on the devices, n); width from the ladder,
        at most max_position, and at least the longest row's tokens."""
        rows = np.asarray(rows, np.int32)
        n, length = rows.shape
        if n > self.batch_size:
            raise ValueError(f'{n} rows exceed the decoder batch size {self.batch_size}')
        real = int((rows != PAD_ID).sum(axis=1).max(initial=1))
        if real > self.max_position:
            raise ValueError(f'a {what} of {real} tokens exceeds model.max_position='
                             f'{self.max_position}; truncate it first')
        width = min(int(batching.padded_length(max(real, 1), *self._ladder, self.max_position)),
                    self.max_position)
        padded = np.full((self.batch_size, width), PAD_ID, np.int32)
        padded[:n, :min(length, width)] = rows[:, :width]
        return jax.device_put(padded, self._input_sharding), n  # one copy to the devices

    def _prefix(self, inputs, prefixes, width: int):
        """The rows of `prefixes` (token lists, no EOS) as a [batch_size, T] array on the
        devices, T the output bound of sources of `width` (one prefix shape per source
        shape); None when no row has one (nothing is constrained, nothing recompiled)."""
        if prefixes is None or not any(len(p) for p in prefixes):
            return None
        s = self.settings
        bound = search.output_bound(width, s.max_extra_length, self.max_position)
        rows = np.full((self.batch_size, bound), PAD_ID, np.int32)
        for r, (source, p) in enumerate(zip(np.asarray(inputs), prefixes)):
            limit = max_output_length(int((source != PAD_ID).sum()), s, self.max_position)
            if len(p) >= limit:
                raise ValueError(f'a prefix of {len(p)} tokens leaves no room for EOS within '
                                 f'the output length bound ({limit} tokens)')
            rows[r, :len(p)] = p
        return jax.device_put(rows, self._input_sharding)

    def __call__(self, inputs, sentence_ids=None, prefixes=None) -> search.Found:
        """inputs [n, S] (n <= batch_size) -> the Found of those rows as numpy arrays, with
        settings.outputs hypotheses per row. Sampling needs each row's `sentence_ids` [n]
        (its line number, say): the keys derive from them, not from the row. `prefixes`
        (n token lists, without EOS; empty: none) are forced as each row's first tokens and
        must be shorter than its output length bound (`max_output_length`)."""
        x, n = self._pad(inputs, 'source')
        prefix = self._prefix(inputs, prefixes, x.shape[1])
        self.shapes_compiled.add(tuple(x.shape))
        s = self.settings
        if s.sampling:
            if sentence_ids is None:
                raise ValueError('sampling needs the sentence_ids of the rows')
            ids = np.zeros(self.batch_size, np.int32)
            ids[:n] = sentence_ids
            found = search.sample(self.graphdefs, self.params, x,
                                  jax.device_put(ids, self._input_sharding), seed=s.seed,
                                  num_samples=s.num_samples, temperature=s.temperature,
                                  top_k=s.top_k, top_p=s.top_p, alpha=s.alpha,
                                  max_extra_length=s.max_extra_length, prefix=prefix,
                                  no_repeat_ngram_size=s.no_repeat_ngram_size)
        else:
            found = search.search(self.graphdefs, self.params, x, beam_size=s.beam_size,
                                  alpha=s.alpha, max_extra_length=s.max_extra_length,
                                  nbest=s.nbest, prefix=prefix,
                                  no_repeat_ngram_size=s.no_repeat_ngram_size)
        self.steps += int(found.steps)
        self.batches += 1
        return search.Found(*(np.asarray(a)[:n] for a in found[:3]), int(found.steps))

    def score(self, inputs, targets) -> tuple[np.ndarray, np.ndarray]:
        """Forced decoding: (log p(target | source) [n], target tokens [n]) of EOS-terminated,
        PAD-padded rows, under the model or ensemble (teacher forcing, no label smoothing)."""
        x, n = self._pad(inputs, 'source')
        y, _ = self._pad(targets, 'target')
        log_prob, tokens = search.forced(self.graphdefs, self.params, x, y)
        return np.asarray(log_prob)[:n], np.asarray(tokens)[:n]

    def cross_attention(self, inputs, targets, layer: int) -> np.ndarray:
        """[n, T, S] decoder layer `layer`'s encoder-decoder attention, averaged over heads
        and members, of teacher-forced rows (alignment.cross_attention)."""
        x, n = self._pad(inputs, 'source')
        y, _ = self._pad(targets, 'target')
        return np.asarray(alignment.cross_attention(self.graphdefs, self.params, x, y,
                                                    layer))[:n]


def make_decoder(models, config, decode_settings: Settings, batch_sentences: int,
                 devices=None) -> Decoder:
    """A Decoder over this process's devices (batch split over them, parameters replicated)."""
    mesh = sharding.make_mesh(devices=jax.local_devices() if devices is None else devices)
    return Decoder(models, decode_settings, batch_size=batch_sentences, mesh=mesh,
                   bucket_step=config.data.bucket_step, bucket_growth=config.data.bucket_growth)


# -- what the programs decode: splits, lines of text, given translations ----------------------


def translate_split(decoder: Decoder, config, tokenizer, split: batching.EncodedSplit,
                    batch_sentences: int, limit: int | None = None,
                    check: Callable[[], None] = lambda: None):
    """The best hypothesis (text) of each sentence of `split` this process decodes: all of
    them, or the first `limit`, which are chosen before batching (sorted by length among
    themselves), so that a quick look decodes only what it shows. `check()` runs before each
    batch: evaluate and the BLEU evaluator pass stopping.raise_if_interrupted, so that a
    signal whose exception a callback dropped ends the decoding there.

    Returns (hypotheses dict: index in the split -> text, stats dict).
    """
    hypotheses: dict[int, str] = {}
    generated = 0
    chosen = None if limit is None else range(min(limit, len(split)))
    batches = list(batching.eval_batches(split, config.data, batch_sentences, indices=chosen,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count()))
    start = time.perf_counter()  # the decoding's time, compilation included
    for i, batch in enumerate(batches):
        check()
        index = batch['index']
        keep = np.flatnonzero(index >= 0)
        if not len(keep):
            continue
        found = decoder(batch['inputs'][keep], index[keep])
        lengths = np.asarray(search.hypothesis_lengths(found.tokens[:, 0]))
        for row, i_split in enumerate(index[keep]):
            hypotheses[int(i_split)] = tokenizer.decode(found.tokens[row, 0].tolist())
            generated += int(lengths[row])
        if i % 10 == 0:
            logging.info('%s: %d sentences decoded', split.name, len(hypotheses))
    seconds = time.perf_counter() - start
    return hypotheses, {'decode_seconds': seconds, 'generated_tokens': generated,
                        'decode_steps': decoder.steps, 'decoded_batches': decoder.batches,
                        'compiled_shapes': len(decoder.shapes_compiled)}


class Hypothesis(NamedTuple):
    text: str  # one line: no line breaks
    score: float  # log_prob / length penalty: what beam search ranks by
    log_prob: float  # a prefix's tokens included
    tokens: int  # EOS (and a prefix's tokens) counted
    alignment: str | None = None  # 'i-j ...' source word i to target word j, when asked for


def _encoder(tokenizer, max_position: int):
    """text, where -> ids + [EOS], truncated to what a model of `max_position` reads, with a
    warning naming `where` (batching.fit_sentences)."""
    def encode(text: str, where: str) -> list[int]:
        return batching.fit_sentences([tokenizer.encode(text)], max_position, where)[0][0]
    return encode


def _pad_rows(rows: list[list[int]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.asarray([r + [PAD_ID] * (width - len(r)) for r in rows], np.int32)


class Translator:
    """Lines of text in, hypotheses out, in order; batched, the decoder kept compiled.
    `alignment_layer` (a decoder layer, alignment.resolve_layer) adds each hypothesis's word
    alignment to the source."""

    def __init__(self, models, config, tokenizer, decode_settings: Settings,
                 batch_sentences: int, devices=None, alignment_layer: int | None = None):
        self.tokenizer = tokenizer
        self.batch_sentences = batch_sentences
        self.decoder = make_decoder(models, config, decode_settings, batch_sentences, devices)
        self._encode = _encoder(tokenizer, self.decoder.max_position)
        self.alignment_layer = alignment_layer

    def _prefix_ids(self, number: int, source_ids: list[int], prefix: str) -> list[int]:
        """The tokens of line `number`'s target prefix; UsageError when they leave no room
        for EOS within the line's output length bound."""
        ids = self.tokenizer.encode(prefix) if prefix.strip() else []
        s = self.decoder.settings
        limit = max_output_length(len(source_ids), s, self.decoder.max_position)
        if len(ids) >= limit:
            raise UsageError(
                f'line {number}: the target prefix has {len(ids)} tokens but at most '
                f'{limit - 1} fit (the output bound: {len(source_ids)} source tokens + '
                f'max_extra_length {s.max_extra_length}, at most max_position '
                f'{self.decoder.max_position}, EOS counted)')
        return ids

    def __call__(self, lines: list[tuple[int, str]],
                 prefixes: list[str] | None = None) -> list[list[Hypothesis]]:
        """The hypotheses of (line number, text) pairs, in the given order: settings.outputs
        of each (fewer when fewer exist), best first for beam search, in the order drawn for
        samples, whose keys derive from the line numbers. A blank line gets none. Each line's
        hypotheses start with its target prefix's tokens when `prefixes` (one text a line,
        '' for none) are given."""
        out: list[list[Hypothesis]] = [[] for _ in lines]
        prefixes = prefixes or [''] * len(lines)
        work = []
        for position, ((number, text), prefix) in enumerate(zip(lines, prefixes)):
            if text.strip():
                ids = self._encode(text, f'line {number}')
                work.append((position, number, ids, self._prefix_ids(number, ids, prefix)))
        work.sort(key=lambda item: len(item[2]))
        for start in range(0, len(work), self.batch_sentences):
            group = work[start:start + self.batch_sentences]
            inputs = _pad_rows([ids for _, _, ids, _ in group])
            found = self.decoder(inputs, [number for _, number, _, _ in group],
                                 [p for _, _, _, p in group])
            lengths = np.asarray(search.hypothesis_lengths(found.tokens))
            aligned = self._alignments(inputs, group, found, lengths)
            for row, (position, _, _, _) in enumerate(group):
                for k in range(found.tokens.shape[1]):
                    if found.scores[row, k] <= search.NEG_INF / 2:
                        continue  # fewer distinct hypotheses than asked for
                    text = self.tokenizer.decode(found.tokens[row, k].tolist())
                    out[position].append(Hypothesis(
                        text.replace('\r', ' ').replace('\n', ' '),
                        float(found.scores[row, k]), float(found.log_probs[row, k]),
                        int(lengths[row, k]), aligned[row][k] if aligned else None))
        return out

    def _alignments(self, inputs, group, found, lengths) -> list[list[str]] | None:
        """'i-j ...' of each hypothesis [row][k], from one teacher-forced pass a column k."""
        if self.alignment_layer is None:
            return None
        pieces = self.tokenizer.pieces
        texts: list[list[str]] = [[] for _ in group]
        for k in range(found.tokens.shape[1]):
            attention = self.decoder.cross_attention(inputs, found.tokens[:, k],
                                                     self.alignment_layer)
            for row, (_, _, ids, _) in enumerate(group):
                target = found.tokens[row, k, :max(int(lengths[row, k]) - 1, 0)].tolist()
                texts[row].append(alignment.pairs_text(alignment.hard_alignment(
                    attention[row], pieces(ids[:-1]), pieces(target))))
        return texts


class Scorer:
    """(line number, source, target) in, (log-probability, target tokens) out, in order:
    forced decoding of given translations, batched, the decoder kept compiled."""

    def __init__(self, models, config, tokenizer, batch_sentences: int, devices=None):
        self.batch_sentences = batch_sentences
        self.decoder = make_decoder(models, config, Settings(), batch_sentences, devices)
        self._encode = _encoder(tokenizer, self.decoder.max_position)

    def __call__(self, pairs: list[tuple[int, str, str]]) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
        work = [(position, self._encode(source, f'line {number} (source)'),
                 self._encode(target, f'line {number} (target)'))
                for position, (number, source, target) in enumerate(pairs)]
        work.sort(key=lambda item: (len(item[1]), len(item[2])))
        for start in range(0, len(work), self.batch_sentences):
            group = work[start:start + self.batch_sentences]
            log_probs, tokens = self.decoder.score(_pad_rows([s for _, s, _ in group]),
                                                   _pad_rows([t for _, _, t in group]))
            for row, (position, _, _) in enumerate(group):
                out[position] = (float(log_probs[row]), int(tokens[row]))
        return out
