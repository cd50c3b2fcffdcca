"""What every program shares: its flags, one-line errors with documented exit statuses, and
progress lines.

Bad input ends a program with `error: ...` on one line and exit status 2, a fault during a run
with exit status 1 (see errors.py). Set TRANSFORMER_TRACEBACK=1 to see the full traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import BinaryIO

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm

from transformer import config as config_lib
from transformer import data, errors, host_decode, saved_runs, stopping

# -- flags --------------------------------------------------------------------------------------

def define_config_flag():
    """--config=FILE[:ARG] with --config.field=value overrides."""
    return config_flags.DEFINE_config_file(
        'config', None, 'Config file and argument, e.g. configs/wmt14_ende.py:base.',
        lock_config=True)


def define_workdir_flag(help_text: str = 'Work directory of a training run.'):
    return flags.DEFINE_string('workdir', None, help_text)


def define_step_flag(what: str):
    """--step=N, or --step=best (early stopping's best checkpoint); read with `step_value`."""
    return flags.DEFINE_string('step', None, f'{what}: a step number, or "best", the best '
                               'checkpoint by train.early_stop_metric.')


def define_raw_weights_flag():
    return flags.DEFINE_boolean(
        'raw_weights', False, 'Of a run with train.ema_decay > 0, decode with the raw '
        'parameters instead of their moving average (the default there).')


def step_value(text: str | None, flag: str = '--step') -> int | str | None:
    """A --step (or DIR:STEP) value: None, a step number, or 'best'."""
    if text is None or text == 'best':
        return text
    if not text.isdigit():
        raise errors.UsageError(f'{flag}={text} must be a step number or best')
    return int(text)


def define_decoding_flags() -> SimpleNamespace:
    """--average, --step, --raw_weights, --beam_size, --alpha, --max_extra_length,
    --no_repeat_ngram_size, --batch_sentences."""
    return SimpleNamespace(
        average=flags.DEFINE_integer(
            'average', None, 'Average the last K checkpoints (default: the config\'s '
            'decode.average_last, at most the checkpoints there).'),
        step=define_step_flag('Use this checkpoint step (no averaging)'),
        raw_weights=define_raw_weights_flag(),
        beam_size=flags.DEFINE_integer(
            'beam_size', None, 'Beam size (default: decode.beam_size; 1 = greedy).'),
        alpha=flags.DEFINE_float(
            'alpha', None, 'Length penalty alpha (default: decode.length_penalty).'),
        max_extra_length=flags.DEFINE_integer(
            'max_extra_length', None, 'Output may be this much longer than the input '
            '(default: decode.max_extra_length).'),
        no_repeat_ngram_size=flags.DEFINE_integer(
            'no_repeat_ngram_size', None, 'No hypothesis may contain the same N tokens in a '
            'row twice (N >= 1; default: no such rule), as fairseq\'s --no-repeat-ngram-size.'),
        batch_sentences=flags.DEFINE_integer(
            'batch_sentences', None, 'Sentences per decoding batch '
            '(default: decode.batch_sentences).'),
    )


def define_search_flags() -> SimpleNamespace:
    """translate's choice of search: --nbest, --sampling with its parameters, --prefix;
    and --alignment, what it writes besides."""
    return SimpleNamespace(
        nbest=flags.DEFINE_integer(
            'nbest', None, 'Write the K best hypotheses of each line with their scores, in '
            'Moses n-best format (K <= the beam size).'),
        sampling=flags.DEFINE_boolean(
            'sampling', False, 'Sample translations instead of searching for the best one.'),
        temperature=flags.DEFINE_float(
            'temperature', None, 'Sampling temperature (> 0; default 1: the model\'s own '
            'distribution).'),
        top_k=flags.DEFINE_integer(
            'top_k', None, 'Sample only among the K most likely tokens (default 0: all).'),
        top_p=flags.DEFINE_float(
            'top_p', None, 'Nucleus sampling: only among the most likely tokens whose '
            'probabilities reach P, in (0, 1] (default 1: all).'),
        num_samples=flags.DEFINE_integer(
            'num_samples', None, 'Samples per line (default 1; more are written in Moses '
            'n-best format).'),
        seed=flags.DEFINE_integer(
            'seed', None, 'Sampling seed (default 0): the same seed gives the same samples of '
            'a line, whatever the batch.'),
        prefix=flags.DEFINE_string(
            'prefix', None, 'File of target prefixes, one per input line (an empty line: '
            'none): each hypothesis starts with its line\'s prefix, then is searched as usual. '
            'Without it, a tab in an input line separates the source from its prefix.'),
        alignment=flags.DEFINE_boolean(
            'alignment', False, 'Write after each hypothesis its word alignment to the source '
            '(" ||| i-j ..."), from the encoder-decoder attention of one decoder layer.'),
        alignment_layer=flags.DEFINE_integer(
            'alignment_layer', None, 'The decoder layer --alignment reads (0-based, negative '
            'counts from the last; default: the penultimate, as Garg et al. 2019 found best).'),
    )


def define_ensemble_flag():
    return flags.DEFINE_string(
        'ensemble', None, 'Decode with several models at once, their probabilities averaged: '
        'DIR[:STEP],DIR[:STEP],... (work directories, or checkpoints of one run; a member '
        'without STEP is averaged as --average says). Replaces --workdir, which may still name '
        'one of the members: the one whose config is used.')


def decoding_settings(config, **given):
    """host_decode.settings from flag values (None: not given); a value out of range is refused
    naming its flag."""
    try:
        return host_decode.settings(config, **given)
    except host_decode.SettingError as e:
        if given.get(e.name) is None:
            raise  # the config's own value: the message names its field
        raise errors.UsageError(f'--{e.name}={e.value} {e.rule}') from None


def models_to_load(workdir: str | None, ensemble_spec: str | None,
                   step: int | str | None) -> tuple[list, str | None]:
    """(saved_runs.Member list, home work directory) of --workdir (with --step: a number, its
    text, or 'best') or of --ensemble=DIR[:STEP],DIR[:STEP],... (STEP a number or 'best';
    --workdir, if given too, must be a member: the one whose config is used)."""
    if isinstance(step, str):
        step = step_value(step)
    if not ensemble_spec:
        return [saved_runs.Member(workdir, step)], workdir
    if step is not None:
        raise errors.UsageError('--step does not apply to --ensemble: give each member its step '
                                'as DIR:STEP')
    members = []
    for part in ensemble_spec.split(','):
        part = part.strip()
        if not part:
            raise errors.UsageError(f'--ensemble={ensemble_spec!r} has an empty member')
        directory, _, tail = part.rpartition(':')
        members.append(saved_runs.Member(directory, step_value(tail)) if directory and (
            tail.isdigit() or tail == 'best') else saved_runs.Member(part))
    if workdir and not any(os.path.realpath(workdir) == os.path.realpath(m.workdir)
                           for m in members):
        raise errors.UsageError(f'--workdir={workdir} is not one of the --ensemble members; '
                                'list every member in --ensemble')
    return members, workdir or members[0].workdir


def read_lines(stream: BinaryIO, chunk: int) -> Iterator[list[tuple[int, str]]]:
    """Chunks of (1-based line number, text without the line break) of a program's stdin;
    UsageError naming the line when it is not UTF-8."""
    lines = []
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise errors.UsageError(f'stdin line {number} is not valid UTF-8 ({e.reason} at '
                                    f'byte {e.start}); UTF-8 text is expected') from None
        lines.append((number, text.rstrip('\r\n')))
        if len(lines) >= chunk:
            yield lines
            lines = []
    if lines:
        yield lines


def prefixed_chunks(stream: BinaryIO, path: str, chunk: int):
    """Chunks of (lines, prefixes) of a program's stdin (sources, read whole) and the target
    prefixes of --prefix=FILE, refused in one line before anything is decoded unless they
    have as many lines."""
    prefixes = data.read_lines(path)
    lines = [line for part in read_lines(stream, chunk) for line in part]
    if len(lines) != len(prefixes):
        raise errors.UsageError(f'--prefix={path} has {len(prefixes)} lines but stdin has '
                                f'{len(lines)}; give one prefix a line (an empty line for none)')
    for start in range(0, len(lines), chunk):
        yield lines[start:start + chunk], prefixes[start:start + chunk]


def batch_sentences(value: int | None, config) -> int:
    """--batch_sentences, or the config's decode.batch_sentences; must be positive."""
    value = value or config.decode.batch_sentences
    if value < 1:
        raise errors.UsageError(f'--batch_sentences={value} must be >= 1')
    return value


def checked_config(holder) -> ml_collections.ConfigDict:
    """The --config flag's value after overrides, validated (UsageError names the field)."""
    try:
        config = holder.value  # config_flags loads the file lazily, here
        if config is not None:
            config.keys()  # a file that failed to load raises only on first use
    except Exception as e:
        if os.environ.get('TRANSFORMER_TRACEBACK'):
            raise
        raise errors.UsageError(_explain_flag_error(sys.argv, e)) from None
    if config is None:
        raise errors.UsageError('--config is required, e.g. --config=configs/demo.py')
    config_lib.validate(config)
    return config


def _explain_flag_error(argv: list[str], exc: BaseException) -> str:
    """Turns a config_flags failure into one line that names the flag or field."""
    cause = errors.chain(exc)[-1]
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if spec is not None:
        try:
            config = config_lib.load_file(spec)
        except errors.UsageError as e:  # the file does not exist
            return str(e)
        except Exception as e:  # the config's own message (unknown row etc.)
            return f'--config={spec}: {errors.chain(e)[-1]}'
        for a in argv:
            if not a.startswith('--config.'):
                continue
            field = a[len('--config.'):].split('=', 1)[0]
            node, parts = config, field.split('.')
            for i, part in enumerate(parts):
                if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                    where = '.'.join(parts[:i]) or 'the config'
                    valid = ', '.join(sorted(node.keys())) if isinstance(
                        node, ml_collections.ConfigDict) else '(not a group)'
                    return f'unknown config field {field!r}; valid fields of {where}: {valid}'
                node = node[part]
    text = str(exc).strip().splitlines()
    first = next((line for line in text if 'flag --' in line), text[0] if text else repr(cause))
    return first.replace('FATAL Flags parsing error: ', '')


# -- running a program --------------------------------------------------------------------------

def fail(message: str, status: int = errors.EXIT_BAD_INPUT) -> None:
    """Prints `error: message` on one line and exits with `status`."""
    tqdm.write(f'error: {message}', file=sys.stderr)
    sys.exit(status)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl prints multi-line usage; we print one line
        if os.environ.get('TRANSFORMER_TRACEBACK'):
            raise
        fail(_explain_flag_error(argv, e))


def _field_message(e: errors.FieldError) -> str:
    """A bad setting named as the user gave it: the program's flag when it has one of that
    name (--average), else the config field (config.decode.beam_size)."""
    if e.field in flags.FLAGS:
        return e.naming(f'--{e.field}')
    return e.naming(e.field if '.' not in e.field else f'config.{e.field}')


def _exit_now(status: int) -> None:
    """Ends the process at once, skipping the interpreter's shutdown: in a multi-process run
    it would wait for the other processes at JAX's shutdown barrier (about a minute, then an
    abort) when one of them is gone; after a failed save, for Orbax threads that never end."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _unraisablehook(unraisable) -> None:
    """Keeps Orbax's echoes of a failure it raised off the console (the failure itself is
    reported in one line): when one read or write of a checkpoint fails, TensorStore's
    callbacks for the others find the event loop closed, and the other reads' coroutines
    report their own errors when collected, each with a traceback and a whole TensorStore
    spec (thousands of lines).

    Nor is a signal's exception that struck inside a callback Python cannot unwind from (a
    garbage collector callback: JAX runs one at each collection) printed there with its
    traceback: stopping.raise_if_interrupted raises it again where the program can unwind.
    """
    value, source = unraisable.exc_value, repr(getattr(unraisable, 'object', None))
    if (isinstance(value, (errors.Interrupted, stopping.EvaluationStopped))
            and not os.environ.get('TRANSFORMER_TRACEBACK')):
        return
    echo = ((isinstance(value, RuntimeError) and str(value) == 'Event loop is closed')
            or '_read_array_index' in source)
    if echo and not os.environ.get('TRANSFORMER_TRACEBACK'):
        return
    sys.__unraisablehook__(unraisable)


class _NoOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and '/orbax/' in record.pathname
                    and not os.environ.get('TRANSFORMER_TRACEBACK'))


def slow_for_tests(what: str) -> None:
    """Test hook: TRANSFORMER_SLOW=WHAT:SECONDS makes `what` ('start': every program's main,
    'eval': train's evaluations) that much slower, saying so on stderr."""
    slow = os.environ.get('TRANSFORMER_SLOW', '')
    if slow.startswith(f'{what}:'):
        tqdm.write(f'slow for tests: {slow}', file=sys.stderr)
        # In slices, checking between them, as a long computation's batches do: a signal's
        # exception may be lost (stopping.raise_if_interrupted).
        end = time.monotonic() + float(slow.split(':', 1)[1])
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
            stopping.raise_if_interrupted()


def run(main: Callable[[], None], positional: list | None = None) -> None:
    """Runs a program's `main()` with absl flags and one-line errors.

    Positional arguments go to the list `positional` of a program that takes them, and are
    refused otherwise; errors.Error ends with its exit status, other bad
    input (ValueError, a missing file, undecodable text) with status 2. In a multi-process run
    any failure (a lost peer included) is one line and exit status 1, without waiting for the
    other processes. SIGINT and SIGTERM end the program with one line and 128 + the signal's
    number (stopping.py; train's loop handles them itself: it saves and exits 0); files are
    written atomically, so nothing half-written is left.
    """

    def wrapped(argv):
        stopping.enter(stopping.Phase.STARTING)
        try:
            if positional is not None:
                positional.extend(argv[1:])
            elif len(argv) > 1:
                raise errors.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
            slow_for_tests('start')
            main()
            stopping.raise_if_interrupted()  # a signal whose exception a callback dropped
        except errors.Interrupted as e:
            if os.environ.get('TRANSFORMER_TRACEBACK'):
                raise
            tqdm.write(f'error: {stopping.stopped_message(e.signum)}', file=sys.stderr)
            _exit_now(e.exit_status)
        except Exception as e:
            if os.environ.get('TRANSFORMER_TRACEBACK'):
                raise
            if isinstance(e, errors.FieldError):
                message, status = _field_message(e), e.exit_status
            elif isinstance(e, errors.Error):
                message, status = _first_line(e), e.exit_status
            elif jax.process_count() > 1:
                # Bad input is an errors.Error; anything else here is most likely a collective
                # that failed (JAX raises a lost peer's Gloo error as a ValueError).
                message, status = errors.lost_peer(errors.reason(e)), errors.EXIT_RUNTIME
            elif isinstance(e, (ValueError, FileNotFoundError, UnicodeDecodeError)):
                message, status = _first_line(e), errors.EXIT_BAD_INPUT
            else:
                raise
            if jax.process_count() > 1 or getattr(e, 'exit_at_once', False):
                tqdm.write(f'error: {message}', file=sys.stderr)
                _exit_now(status)
            fail(message, status)

    # JAX logs at INFO each backend it fails to find (e.g. libtpu on a GPU or CPU machine),
    # Orbax a dozen lines per checkpoint: the console shows warnings and our own `say` lines
    # unless --verbosity asks for more.
    logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
    # Orbax reads arrays concurrently; when a broken checkpoint fails several reads, asyncio
    # logs each unretrieved one with its whole TensorStore spec. The one that is raised is
    # reported in one line.
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)
    # Orbax logs its own failures with tracebacks; ours (one line) say what failed and where.
    absl_logging.get_absl_handler().addFilter(_NoOrbaxErrors())
    sys.unraisablehook = _unraisablehook
    # The reads Orbax had not started when another failed are coroutines dropped unawaited,
    # each warned about at shutdown, after our error line; we run no coroutines of our own.
    if not os.environ.get('TRANSFORMER_TRACEBACK'):
        warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                                category=RuntimeWarning)
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
        absl_logging.set_verbosity(absl_logging.WARNING)
    app.run(wrapped, flags_parser=_parse_flags)


def say(message: str) -> None:
    """One line of progress for the user, on stderr, from the first process only."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)  # above any progress bar, never inside it
