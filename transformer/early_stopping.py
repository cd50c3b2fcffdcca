"""Early stopping on a validation metric (train.early_stop_patience, train.early_stop_metric).

After each evaluation the tracker says whether the metric improved on the best so far and
whether `patience` evaluations in a row have gone by without improvement (the run then saves
and stops). Its record (metric, step evaluated, best step and value, evaluations since the
best) is what a resumed run goes on from: it is stored in every checkpoint's info and, after
every evaluation, in the work directory's best.json (workdir.BEST_FILE), which also names the
best checkpoint for `--step=best`. A checkpoint is saved before its step's evaluation, so its
info holds the record as it was before that evaluation; best.json holds the one after it.
"""

from __future__ import annotations

import math

# Which way is better, per train.early_stop_metric, and the validation result's key for it.
_LOWER_IS_BETTER = {'loss': True, 'bleu': False}
_RESULT_KEY = {'loss': 'nll', 'bleu': 'greedy_bleu'}
NAMES = {'loss': 'validation cross-entropy', 'bleu': 'validation greedy BLEU'}


class Tracker:
    """The best value of `metric` so far, its step, and the evaluations since it."""

    def __init__(self, metric: str, patience: int, record: dict | None = None):
        self.metric, self.patience = metric, patience
        record = record if record and record.get('metric') == metric else {}
        self.evaluated = record.get('step')  # the last step evaluated
        self.best_step = record.get('best_step')
        self.best_value = record.get('best_value')
        self.since_best = int(record.get('since_best', 0))

    def record(self) -> dict:
        return {'metric': self.metric, 'step': self.evaluated, 'best_step': self.best_step,
                'best_value': self.best_value, 'since_best': self.since_best}

    def update(self, step: int, result: dict) -> bool:
        """Takes the evaluation of `step`; True when it is the best so far (strictly better;
        a non-finite value never is)."""
        value = float(result[_RESULT_KEY[self.metric]])
        lower = _LOWER_IS_BETTER[self.metric]
        better = math.isfinite(value) and (
            self.best_value is None
            or (value < self.best_value if lower else value > self.best_value))
        self.evaluated = step
        if better:
            self.best_step, self.best_value, self.since_best = step, value, 0
        else:
            self.since_best += 1
        return better

    @property
    def exhausted(self) -> bool:
        """`patience` evaluations in a row without improvement (never with patience 0)."""
        return 0 < self.patience <= self.since_best

    def reason(self) -> str:
        return (f'{NAMES[self.metric]} has not improved for {self.since_best} evaluation(s) '
                f'(train.early_stop_patience={self.patience}); best {self.best_value:.4f} at '
                f'step {self.best_step}')


def resumed(metric: str, patience: int, checkpointed: dict | None, best_file: dict | None,
            step: int) -> Tracker:
    """The tracker a run resumed from checkpoint `step` goes on with: best.json's record when
    it is that of the evaluation of `step` itself (done after the save), else the
    checkpoint's own (`checkpointed`, checkpoint_info.Info.early_stop; evaluations after
    `step` are done again)."""
    if best_file and best_file.get('step') == step:
        return Tracker(metric, patience, best_file)
    return Tracker(metric, patience, checkpointed)
