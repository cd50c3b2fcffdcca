"""TFDS datasets (WMT14 and any TFDS translation builder a config names): preparing them
without TensorFlow, saying what that takes, reading their splits, and the official order of
the evaluation splits.

Preparation is TFDS's own (`download_and_prepare` to ArrayRecord files, through TFDS's
downloader, checksums, extractor and example generator), with `tfds_compat` standing in for
the two TensorFlow calls TFDS still makes, so no TensorFlow is needed at any point. `prepare`
adds what a researcher starting a multi-hour WMT download wants: what will be downloaded, how
big, where it goes and the disk it needs; one process at a time per dataset (a lock beside the
data, others wait); stale half-finished files of a killed preparation removed; a failure as
one line with the URL and the manual route. TFDS itself never takes a half-finished
preparation for a finished one (it writes `incomplete.*` directories and renames them).

TFDS stores a split shuffled by a hash of each example's key, so newstest2014 comes back in
another order than its SGML file. After preparing, the order of the SGML (or text) files is
recovered by running the builder's own example generator over the extracted files and
matching the records, and stored beside TFDS's files (`ORDER_FILE`): evaluation splits are
then read in the official order, so a hypothesis file lines up with the official reference.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable

from transformer import errors, tfds_compat
from transformer.errors import DataError, UsageError

# Beside TFDS's files in the dataset's version directory: the official order of each
# evaluation split, as record indices ({"test": {"num_examples": n, "order": [...]}, ...}).
ORDER_FILE = 'official-order.json'
EVAL_SPLITS = ('validation', 'test')

# Disk a preparation needs besides the archives, per byte of archive (tar.gz of text): the
# extracted text (2.52) and the prepared ArrayRecord files (2.67: records are compressed one
# by one, so about the size of the text), measured on WMT news text by benchmarks/prepare.py
# (results/2026-12-01-cpu-prepare.json). An upper bound: WMT archives also hold other language
# pairs, which are extracted but not prepared (de-en prepares to about 1.3 GiB, not 4.2).
EXTRACTED_PER_ARCHIVE_BYTE = 2.52
PREPARED_PER_ARCHIVE_BYTE = 2.67
DISK_MARGIN = 1.05


class PrepareError(DataError):
    """A preparation that cannot go on (download, checksum, extraction, disk): exit status 2,
    one line naming the URL or file and what to do."""


@dataclasses.dataclass(frozen=True)
class Download:
    """One file a dataset's preparation downloads (or needs placed by hand)."""

    url: str
    size: int | None  # bytes, as TFDS registered them; None if unknown
    filename: str  # the name it must have in the manual directory
    manual_only: bool = False  # TFDS cannot fetch it (e.g. CzEng)


# -- opening a builder --------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _builder(name: str, data_dir: str):
    tfds_compat.install()
    import tensorflow_datasets as tfds  # heavy import, only for data.source == 'tfds'
    from absl import logging as absl_logging
    verbosity = absl_logging.get_verbosity()
    # TFDS warns that an unprepared dataset's directory "has no dataset_info.json".
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - TFDS raises several kinds for an unknown name
        raise UsageError(f'data.tfds_name={name!r} is not a TFDS dataset this TFDS knows '
                         f'({errors.reason(e)})') from None
    finally:
        absl_logging.set_verbosity(verbosity)


def builder(data_config):
    """The TFDS builder of `data.tfds_name` in `data.tfds_data_dir` (not prepared by this)."""
    return _builder(data_config.tfds_name, data_config.tfds_data_dir)


def clear_cache() -> None:
    """Forgets the builders and official orders opened so far (they are kept per process)."""
    _builder.cache_clear()
    _ORDERS.clear()


def is_prepared(data_config) -> bool:
    return builder(data_config).is_prepared()


def manual_dir(data_config, b=None) -> str:
    """Where TFDS looks for archives fetched by hand: data.manual_dir, else its default."""
    b = b or builder(data_config)
    return data_config.manual_dir or os.path.join(b.data_dir_root, 'downloads', 'manual')


def downloads(b) -> list[Download]:
    """The files the builder's preparation fetches for its own config.

    WMT builders download only the corpora of their language pair (their sub-datasets); for
    other builders, every URL TFDS registered for the dataset.
    """
    from tensorflow_datasets.core.download import checksums
    # What TFDS validates downloads against: every registered URL, the builder's own first.
    infos = dict(checksums.get_all_url_infos(), **(b.url_infos or {}))

    def of(url, manual_only=False):
        info = infos.get(url)
        name = (info.filename if info and info.filename else url.rstrip('/').rsplit('/', 1)[-1])
        return Download(url, int(info.size) if info else None, name, manual_only)

    subsets = getattr(b, 'subsets', None)
    if subsets is None:
        return [of(url) for url in sorted(infos)]
    from tensorflow_datasets.translate import wmt
    source = b.builder_config.language_pair[0]
    out, seen = [], set()
    for names in subsets.values():
        for name in names:
            ds = wmt.DATASET_MAP[name]
            manual = ds.get_manual_dl_files(source)
            for url in (ds.get_url(source) if not manual else []):
                if url not in seen:
                    seen.add(url)
                    out.append(of(url))
            for file in manual:
                out.append(Download(ds.get_url(source)[0], None, file, manual_only=True))
    return out


# -- preparing ------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f'{n / 2**30:.2f} GiB' if n >= 2**28 else f'{n / 2**20:.1f} MiB'


def disk_needed(files: list[Download]) -> int:
    """Bytes a preparation needs: the archives, their extracted text, the prepared files."""
    archives = sum(f.size or 0 for f in files)
    return int(archives * (1 + EXTRACTED_PER_ARCHIVE_BYTE + PREPARED_PER_ARCHIVE_BYTE)
               * DISK_MARGIN)


def _free_bytes(path: str) -> int:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path or '.')
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def _prepare_lock(b, say: Callable[[str], None]):
    """One preparation of a dataset at a time: an OS lock beside its data (released when the
    holder ends, however it ends); a second preparer waits for it, then finds it prepared."""
    directory = os.path.dirname(os.fspath(b.data_path))  # <data_dir>/<name>/<config>
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    path = directory.rstrip('/') + '.prepare.lock'
    with open(path, 'a+') as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            say(f'Waiting for {handle.read().strip() or "another process"} to finish '
                f'preparing {b.info.full_name} ({path})')
            fcntl.flock(handle, fcntl.LOCK_EX)
        with errors.writing('the lock file', path, handle):
            handle.seek(0)
            handle.truncate()
            handle.write(f'pid {os.getpid()} on host {socket.gethostname()}\n')
            handle.flush()
        yield


def _remove_stale(b) -> list[str]:
    """Half-finished files of an earlier, killed preparation of this dataset (under the lock,
    so nobody is writing them): TFDS's incomplete.* directories and partial downloads."""
    removed = []
    config_dir = os.path.dirname(os.fspath(b.data_path))
    download_dir = os.path.join(b.data_dir_root, 'downloads')
    candidates = []
    if os.path.isdir(config_dir):
        candidates += [os.path.join(config_dir, n) for n in os.listdir(config_dir)
                       if n.startswith('incomplete.')]
    for sub in (os.path.join(download_dir, b.name), os.path.join(download_dir, 'extracted')):
        if os.path.isdir(sub):
            candidates += [os.path.join(sub, n) for n in os.listdir(sub)
                           if '.tmp.' in n or n.startswith('incomplete.')]
    for path in candidates:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    return removed


def _failed_download(chain: list[BaseException],
                     files: list[Download]) -> tuple[Download | None, str | None]:
    """(The download an exception chain is about, its archive when extraction failed): named
    in a message (TFDS's HTTP and checksum errors), else found in the frames the error passed
    through: a `url` (a connection cut mid-body) or the `from_path` of an extraction, whose
    TFDS .INFO file names its URL."""
    by_url = {f.url: f for f in files}
    text = ' '.join(str(x) for x in chain)
    for e in chain:
        tb = e.__traceback__
        while tb is not None:
            local = tb.tb_frame.f_locals
            url, archive = local.get('url'), local.get('from_path')
            if isinstance(url, str) and url in by_url:
                return by_url[url], None
            if archive is not None and os.path.exists(f'{archive}.INFO'):
                with contextlib.suppress(OSError, ValueError):
                    with open(f'{archive}.INFO') as f:
                        urls = json.load(f).get('urls', [])
                    known = [by_url[u] for u in urls if u in by_url]
                    return (known[0] if known else None), os.fspath(archive)
            tb = tb.tb_next
    return next((f for f in files if f.url in text), None), None


def _explain(exc: BaseException, b, files: list[Download], manual: str) -> PrepareError:
    """One line for a failed preparation: what failed, which URL, and the manual route."""
    from tensorflow_datasets.core.download import download_manager, extractor
    chain = errors.chain(exc)
    failed, archive = _failed_download(chain, files)
    route = (f'or download {failed.url} yourself and put it in {manual} as {failed.filename}'
             if failed else f'or put the archives in {manual} under the names of their URLs')
    route += ' (data.manual_dir chooses that directory)'
    reason = errors.reason(exc)
    if any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain):
        return PrepareError(f'no space left on device while preparing {b.info.full_name} in '
                            f'{b.data_dir_root} ({_gib(_free_bytes(b.data_dir_root))} free; '
                            f'it needs about {_gib(disk_needed(files))})')
    if any(isinstance(x, download_manager.NonMatchingChecksumError) for x in chain):
        what = failed.url if failed else 'a download'
        return PrepareError(f'{what} does not have the size and checksum TFDS registered for '
                            'it (a cut or changed download); run again to download it anew, '
                            f'{route}')
    if any(isinstance(x, extractor.ExtractError) for x in chain):
        what = failed.url if failed else 'an archive'
        where = archive or os.path.join(b.data_dir_root, 'downloads')
        return PrepareError(f'cannot extract {what} ({reason}): the archive is damaged; '
                            f'delete {where} and run again, {route}')
    if any(isinstance(x, ImportError) and 'tensorflow' in str(x) for x in chain):
        return PrepareError(f'TFDS needs TensorFlow to prepare {b.info.full_name} ({reason}), '
                            'which transformer/tfds_compat.py does not stand in for: pip '
                            'install tensorflow-cpu (for preparing only), then run again')
    if failed is not None:
        return PrepareError(f'could not download {failed.url} ({reason}); statmt.org is often '
                            f'slow or unavailable: run again later (finished downloads are '
                            f'kept), {route}')
    return PrepareError(f'preparing {b.info.full_name} failed: {reason}')


def prepare(data_config, say: Callable[[str], None] = print):
    """Downloads and prepares `data.tfds_name` (ArrayRecord) unless it is prepared; records the
    official order of its evaluation splits. Returns the builder. PrepareError (one line,
    naming the URL and the manual route) when it cannot."""
    import tensorflow_datasets as tfds
    b = builder(data_config)
    name = b.info.full_name
    manual = manual_dir(data_config, b)
    with _prepare_lock(b, say):
        if not b.is_prepared():
            for path in _remove_stale(b):
                say(f'Removed a half-finished file of an earlier preparation: {path}')
            files = downloads(b)
            need, free = disk_needed(files), _free_bytes(b.data_dir_root)
            known = sum(f.size or 0 for f in files)
            say(f'Preparing {name} in {b.data_dir_root} (no TensorFlow needed): '
                f'{len(files)} downloads, {_gib(known)}, then extraction and ArrayRecord files; '
                f'at most {_gib(need)} of disk needed, {_gib(free)} free')
            for f in files:
                size = _gib(f.size) if f.size else 'size unknown'
                how = 'place by hand' if f.manual_only else 'download'
                say(f'  {how} {f.url} ({size}) -> or by hand: {os.path.join(manual, f.filename)}')
            if need > free:
                raise PrepareError(f'{b.data_dir_root} has {_gib(free)} free but preparing '
                                   f'{name} needs about {_gib(need)}; free some space or set '
                                   'data.tfds_data_dir to a larger disk')
            start = time.time()
            try:
                b.download_and_prepare(
                    file_format='array_record',
                    download_config=tfds.download.DownloadConfig(manual_dir=manual))
            except Exception as e:  # noqa: BLE001 - every failure becomes one line
                raise _explain(e, b, files, manual) from e
            say(f'Prepared {name} in {(time.time() - start) / 60:.1f} min: {b.data_dir}')
        if _stored_orders(b) is None:
            try:
                _record_orders(b, manual)
            except Exception as e:  # noqa: BLE001
                raise _explain(e, b, downloads(b), manual) from e
    return b


def split_sizes(b) -> list[str]:
    """One line per prepared split: pairs and bytes."""
    return [f'{split}: {info.num_examples:,} pairs ({_gib(info.num_bytes)})'
            for split, info in sorted(b.info.splits.items())]


# -- the official order of the evaluation splits ----------------------------------------------


_ORDERS: dict[str, dict] = {}  # data_dir -> orders, when ORDER_FILE could not be written


def _split_fingerprint(b, split: str) -> dict:
    info = b.info.splits[split]
    return {'num_examples': int(info.num_examples), 'num_bytes': int(info.num_bytes)}


def _stored_orders(b) -> dict | None:
    """The recorded orders if they describe the prepared splits, else None."""
    path = os.path.join(os.fspath(b.data_path), ORDER_FILE)
    orders = _ORDERS.get(os.fspath(b.data_path))
    if orders is None and os.path.exists(path):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                orders = json.load(f)
    if not orders:
        return None
    for split in EVAL_SPLITS:
        if split in b.info.splits and (
                split not in orders or any(orders[split].get(k) != v for k, v in
                                           _split_fingerprint(b, split).items())):
            return None
    return orders


def _generated_in_order(b, manual: str) -> dict[str, list[tuple[bytes, ...]]]:
    """Each evaluation split's pairs in the order the builder generates them (file order),
    from the builder's own split generators over its (already downloaded) files."""
    import tensorflow_datasets as tfds
    dl_manager = b._make_download_manager(  # noqa: SLF001 - TFDS has no public route to it
        download_dir=None, download_config=tfds.download.DownloadConfig(manual_dir=manual))
    generators = b._split_generators(dl_manager)  # noqa: SLF001
    if isinstance(generators, dict):  # new-style builders: split -> example iterator
        found = {str(k): v for k, v in generators.items()}
    else:  # legacy (the WMT builders): SplitGenerator with gen_kwargs
        found = {str(g.name): b._generate_examples(**g.gen_kwargs)  # noqa: SLF001
                 for g in generators}
    languages = sorted(b.info.features.keys())
    out = {}
    for split in EVAL_SPLITS:
        if split in found and split in b.info.splits:
            out[split] = [tuple(_as_bytes(example[lang]) for lang in languages)
                          for _, example in found[split]]
    return out


def _as_bytes(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode('utf-8')


def _record_orders(b, manual: str) -> dict:
    """Matches each evaluation split's records to the generated order; stores the result."""
    languages = sorted(b.info.features.keys())
    orders = {}
    for split, official in _generated_in_order(b, manual).items():
        source = b.as_data_source(split)
        where = collections.defaultdict(collections.deque)
        for i in range(len(source)):
            record = source[i]
            where[tuple(_as_bytes(record[lang]) for lang in languages)].append(i)
        order = []
        for pair in official:
            if not where.get(pair):
                raise PrepareError(f'{b.info.full_name} split {split!r} does not hold the '
                                   'pairs its source files hold (prepared from other files?): '
                                   'delete its directory and prepare it again')
            order.append(where[pair].popleft())
        if len(order) != len(source):
            raise PrepareError(f'{b.info.full_name} split {split!r} has {len(source)} records '
                               f'but its source files {len(order)} pairs')
        orders[split] = dict(_split_fingerprint(b, split), order=order)
    path = os.path.join(os.fspath(b.data_path), ORDER_FILE)
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            json.dump(orders, f)
        os.replace(tmp, path)
    except OSError:  # a read-only shared data directory: keep them for this process
        with contextlib.suppress(OSError):
            os.remove(tmp)
        _ORDERS[os.fspath(b.data_path)] = orders
    return orders


def official_order(b, split: str) -> list[int] | None:
    """Record indices of `split` in the official order (of its SGML or text files), or None
    when it was not recorded (a dataset prepared without `transformer.prepare`)."""
    orders = _stored_orders(b)
    return orders[split]['order'] if orders and split in orders else None


# -- reading ---------------------------------------------------------------------------------------


class Pairs:
    """Pairs read on demand from a prepared split (no TensorFlow needed), in the official
    order where it was recorded."""

    def __init__(self, source, src_lang: str, tgt_lang: str, name: str,
                 order: list[int] | None = None):
        self.source, self.src_lang, self.tgt_lang, self.name = source, src_lang, tgt_lang, name
        self.order = order

    def __len__(self) -> int:
        return len(self.source)

    def get(self, ids) -> tuple[list[str], list[str]]:
        ids = [int(i) for i in ids]
        if self.order is not None:
            ids = [self.order[i] for i in ids]
        getitems = getattr(self.source, '__getitems__', None)  # batched reads where offered
        records = getitems(ids) if getitems else [self.source[i] for i in ids]
        return ([_to_str(r[self.src_lang]) for r in records],
                [_to_str(r[self.tgt_lang]) for r in records])


def _to_str(x) -> str:
    return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def split_pairs(config, split: str, warn: Callable[[str], None] = errors.warn) -> Pairs:
    """The pairs of a prepared split, oriented source_lang -> target_lang; UsageError naming
    the command to run when the dataset is not prepared."""
    d = config.data
    b = builder(d)
    if not b.is_prepared():
        raise DataError(f'{d.tfds_name} is not prepared in {b.data_dir_root}: run python -m '
                         'transformer.prepare with this config first (train does it by itself '
                         'in a single-process run)')
    languages = sorted(b.info.features.keys())
    for field, lang in (('source_lang', config.source_lang), ('target_lang', config.target_lang)):
        if lang not in languages:
            raise DataError(f'config.{field}={lang!r} is not in {d.tfds_name} '
                             f'(languages: {", ".join(languages)})')
    try:
        source = b.as_data_source(split)
    except (KeyError, ValueError) as e:
        raise DataError(f'{d.tfds_name} has no split {split!r}: {e}') from None
    if len(source) == 0:
        raise DataError(f'{d.tfds_name} split {split!r} is empty')
    order = None
    if split in EVAL_SPLITS:
        order = official_order(b, split)
        if order is None:
            warn(f'{d.tfds_name} {split}: the official order was not recorded (prepared '
                 'without transformer.prepare); read in TFDS\'s shuffled order: run python -m '
                 'transformer.prepare with this config to record it')
    return Pairs(source, config.source_lang, config.target_lang, f'{d.tfds_name}:{split}', order)
