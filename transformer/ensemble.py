"""The models a decoding program runs: one trained model, or an ensemble of several (work
directories, or checkpoints of one run), which `search` decodes as one, each member with its own
cache (see `search.py` for what is averaged).

Members must agree on what they translate: the same vocabulary file (its sha256 fingerprint),
the same vocabulary size and the same direction (source_lang -> target_lang); a member that
differs is refused in one line naming it.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import ml_collections

from transformer import tokenizer as tokenizer_lib
from transformer import trained
from transformer import vocabulary as vocabulary_lib
from transformer.errors import UsageError


class Member(NamedTuple):
    workdir: str
    # None: the workdir's default (averaging over the last checkpoints, or its moving average);
    # 'best': early stopping's best checkpoint
    step: int | str | None = None


class Loaded(NamedTuple):
    models: list  # Transformers, one per member
    config: ml_collections.ConfigDict  # the home member's: data, splits, decoding defaults
    tokenizer: tokenizer_lib.Tokenizer
    home: str  # the work directory whose config is used (evaluate writes there)
    members: list[dict]  # per member: workdir and the checkpoint steps used

    @property
    def steps(self) -> list[int]:
        """The steps of a single model (for labels); an ensemble has several lists."""
        return self.members[0]['steps']


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _key(member: Member) -> tuple:
    return os.path.realpath(member.workdir), member.step


def load(members: list[Member], *, average: int | None = None,
         home: str | None = None, raw_weights: bool = False) -> Loaded:
    """Loads every member (`trained.load_model`: its `step`, or the average of the last
    `average` checkpoints, default the config's decode.average_last) and checks that they
    agree. `home` (default the first member) must be one of the members' directories.

    A member that keeps a moving average of its weights (train.ema_decay) is decoded with it,
    each member with its own; `raw_weights` takes every member's raw parameters instead.

    The same (workdir, step) twice is loaded once and used twice.
    """
    if not members:
        raise UsageError('an ensemble needs at least one member')
    home = home or members[0].workdir
    if not any(_same(home, m.workdir) for m in members):
        raise UsageError(f'{home} is not one of the ensemble members '
                         f'({", ".join(m.workdir for m in members)})')
    loaded: dict[tuple, tuple] = {}
    models, described = [], []
    first = None
    for member in members:
        key = _key(member)
        if key not in loaded:
            loaded[key] = trained.load_model(member.workdir, average=average,
                                             step=member.step, raw_weights=raw_weights)
        model, config, tokenizer, steps = loaded[key]
        facts = dict(workdir=member.workdir,
                     direction=f'{config.source_lang}->{config.target_lang}',
                     vocab_size=int(config.vocab_size),
                     vocab_sha256=vocabulary_lib.stored_fingerprint(member.workdir))
        if first is None:
            first = facts
        else:
            _check_agrees(facts, first)
        models.append(model)
        described.append(dict(workdir=member.workdir, steps=list(steps),
                              weights=trained.weights(config, raw_weights)))
    _, config, tokenizer, _ = loaded[_key(next(m for m in members if _same(home, m.workdir)))]
    return Loaded(models, config, tokenizer, home, described)


def _check_agrees(facts: dict, first: dict) -> None:
    name, other = facts['workdir'], first['workdir']
    if facts['direction'] != first['direction']:
        raise UsageError(f'ensemble member {name} translates {facts["direction"]}, but {other} '
                         f'translates {first["direction"]}')
    if facts['vocab_sha256'] != first['vocab_sha256']:
        raise UsageError(f'ensemble member {name} has another vocabulary than {other} '
                         f'(vocab.model sha256 {facts["vocab_sha256"][:12]}... against '
                         f'{first["vocab_sha256"][:12]}...): members must share one')
    if facts['vocab_size'] != first['vocab_size']:
        raise UsageError(f'ensemble member {name} has vocab_size={facts["vocab_size"]}, but '
                         f'{other} has vocab_size={first["vocab_size"]}')
