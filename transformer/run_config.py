"""The config a run stores: config.json in the work directory (workdir.CONFIG_FILE) and a copy
in every checkpoint's info; loading it (from the copy when the file is missing) and refusing a
resumed run whose config differs in more than config.RESUMABLE_CHANGES.
"""

from __future__ import annotations

import json
import os

import ml_collections

from transformer import checkpoint, checkpoint_info, errors
from transformer import config as config_lib
from transformer.errors import UsageError
from transformer.workdir import CHECKPOINTS_DIR, CONFIG_FILE, atomic_write, check_workdir, path


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Stores the resolved config in the work directory (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    file = path(workdir, CONFIG_FILE)
    atomic_write(file, config.to_json(indent=2, sort_keys=True).encode(), 'the config')


def config_record(config: ml_collections.ConfigDict) -> dict:
    """The config as stored in each checkpoint's info (JSON), to recover config.json from."""
    return json.loads(config.to_json())


def _checkpointed_config(workdir: str) -> tuple[int, dict] | None:
    """(step, stored config) of the newest checkpoint that holds the run's config, if any."""
    directory = path(workdir, CHECKPOINTS_DIR)
    for step in reversed(checkpoint.steps_in(workdir)):
        stored = checkpoint_info.parse(checkpoint.read_info(directory, step)).config
        if stored:
            return step, stored
    return None


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config that `train` stored in `workdir`; from its newest checkpoint (with a warning)
    when config.json is missing; UsageError if there is none or it is not JSON."""
    check_workdir(workdir)
    stored = _stored_config(workdir)
    if stored is None:
        raise UsageError(f'{path(workdir, CONFIG_FILE)} not found: is {workdir!r} a work '
                         'directory made by transformer.train?')
    return stored


def _stored_config(workdir: str) -> ml_collections.ConfigDict | None:
    """config.json, or the newest checkpoint's copy when the file is missing; None if neither."""
    file = path(workdir, CONFIG_FILE)
    if os.path.exists(file):
        try:
            with open(file) as f:
                return config_lib.from_stored(json.load(f))
        except (OSError, ValueError) as e:
            held = _checkpointed_config(workdir)
            remedy = (f'delete it to use the copy in checkpoint {held[0]}' if held
                      else 'restore it')
            # (json's own error is the message; what it chains to is an internal StopIteration)
            why = errors.reason(e) if isinstance(e, OSError) else str(e).splitlines()[0]
            raise UsageError(f'{file} cannot be read ({why}): {remedy}') from None
    held = _checkpointed_config(workdir)
    if held is None:
        return None
    errors.warn(f'{file} is missing: using the config stored in checkpoint {held[0]}')
    return config_lib.from_stored(held[1])


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a config that differs from the stored one in more than the run length.

    Only a work directory with a checkpoint holds a run; before the first checkpoint (e.g. a
    start that failed on a missing data file) the config may still be corrected. The stored
    config is config.json, or the newest checkpoint's copy when the file is missing; with
    neither (checkpoints of an older version), restoring them checks their shapes.
    """
    if not checkpoint.steps_in(workdir):
        return
    stored = _stored_config(workdir)
    if stored is None:
        return
    differing = config_lib.differences(stored, config, ignore=config_lib.RESUMABLE_CHANGES)
    if differing:
        raise UsageError(f'{workdir} holds a run with another config; differing fields: '
                         f'{", ".join(differing)} (use a new --workdir)')
