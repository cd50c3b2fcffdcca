"""What a checkpoint's `info` holds beside the state: every key, who writes it, who reads it.

`train` writes it at every save (`record`); readers take it back as an `Info` (`parse`):
train when it resumes (fingerprints, clocks, smoothed loss, early stopping's record),
vocabulary.py (the fingerprint), run_config.py (the config, when config.json is missing),
report.py (the training time). The keys stay as earlier versions wrote them, so that their
checkpoints still resume; a key an older checkpoint lacks reads as None.
"""

from __future__ import annotations

from typing import NamedTuple


class Info(NamedTuple):
    # sha256 of vocab.model (vocabulary.stored_fingerprint): the vocabulary trained with.
    vocab_sha256: str | None = None
    # The tokenized training set's fingerprint (data.TokenizedSplit.fingerprint): what the
    # checkpoint's data position points into.
    data_sha256: str | None = None
    # run_config.config_record: the config, to recover config.json from.
    config: dict | None = None
    # metrics.Window.smoothed_loss: the smoothed training loss goes on from it.
    loss_smoothed: float | None = None
    # metrics.Clocks.totals(): seconds of training and of each clock apart (compile, eval,
    # save, profile), counted across restarts. Before the clocks, only 'train_seconds' was
    # stored; it still is (= clocks['train']), for the readers of earlier versions.
    clocks: dict | None = None
    # early_stopping.Tracker.record(): the best step and value, the evaluations since.
    early_stop: dict | None = None

    @property
    def train_seconds(self) -> float | None:
        """Training time, earlier runs included (None: not recorded)."""
        return (self.clocks or {}).get('train')


def record(info: Info) -> dict:
    """The JSON object stored in a checkpoint."""
    stored = info._asdict()
    stored['train_seconds'] = info.train_seconds
    return stored


def parse(stored: dict) -> Info:
    """The Info of a stored object ({} when unreadable: every field None)."""
    clocks = stored.get('clocks')
    if not clocks and stored.get('train_seconds') is not None:  # stored before the clocks
        clocks = {'train': stored['train_seconds']}
    return Info(**{**{k: stored.get(k) for k in Info._fields}, 'clocks': clocks})
