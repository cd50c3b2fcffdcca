"""What checking the token cache costs at the start of a run, at WMT14 scale.

    python benchmarks/cache_check.py [--scale=1.0] [--repeats=3]

`train` checks the cached, tokenized training set against the sizes and sha256 checksums its
meta.json records before it memory-maps it (`data.cache_problem`, process 0 only; the other
processes check the sizes). This writes a cache of the size WMT14 en-de gives (4,508,785 pairs,
about 140M tokens per side, uint16 ids: `--scale` scales it), with random contents and the
real file names and metadata (`data._file_record`), and times the check: from the page cache
(a cache built or read moments ago: the usual case at a restart) and cold (the files dropped
from the page cache with posix_fadvise, as after a reboot: then the disk's read speed rules).
Prints ONE JSON object with the seconds, the bytes and the rates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformer import data  # noqa: E402
from transformer import workdir as workdir_lib  # noqa: E402

PAIRS, TOKENS_PER_SIDE = 4_508_785, 140_000_000  # WMT14 en-de training set, one side


def write_cache(directory: str, scale: float) -> int:
    """A cache of WMT14's size times `scale`, random ids; returns its bytes."""
    rng = np.random.default_rng(0)
    pairs, tokens = int(PAIRS * scale), int(TOKENS_PER_SIDE * scale)
    for side in ('source', 'target'):
        with open(os.path.join(directory, f'{side}_tokens.bin'), 'wb') as f:
            for start in range(0, tokens, 1 << 24):  # 32 MiB at a time
                n = min(1 << 24, tokens - start)
                f.write(rng.integers(3, 37000, n, dtype=np.uint16).tobytes())
        lengths = rng.integers(1, 63, pairs, dtype=np.int32)
        np.save(os.path.join(directory, f'{side}_offsets.npy'),
                np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
        np.save(os.path.join(directory, f'{side}_lengths.npy'), lengths)
    records = {name: data._file_record(os.path.join(directory, name))
               for name in data._cache_files()}
    with open(os.path.join(directory, workdir_lib.CACHE_META), 'w') as f:
        json.dump({'dtype': 'uint16', 'pairs': pairs, 'name': 'benchmark', 'files': records,
                   'sha256': data._content_sha256(records)}, f)
    return sum(r['bytes'] for r in records.values())


def drop_from_page_cache(directory: str) -> None:
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(directory: str, checksums: bool, cold: bool) -> float:
    if cold:
        drop_from_page_cache(directory)
    start = time.perf_counter()
    problem = data.cache_problem(directory, checksums=checksums)
    seconds = time.perf_counter() - start
    assert problem is None, problem
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scale', type=float, default=1.0)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--dir', default=None, help='where to write the cache (default: /tmp)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        print(f'writing a cache at scale {args.scale:g} in {directory}', file=sys.stderr)
        size = write_cache(directory, args.scale)
        result = {'date': datetime.date.today().isoformat(), 'machine': platform.machine(),
                  'cpus': os.cpu_count(), 'scale': args.scale, 'cache_bytes': size}
        for label, checksums, cold in (('sizes_only', False, False),
                                       ('checksums_page_cache', True, False),
                                       ('checksums_cold', True, True)):
            seconds = min(timed(directory, checksums, cold) for _ in range(args.repeats))
            result[f'{label}_seconds'] = round(seconds, 4)
            if checksums:
                result[f'{label}_mb_per_second'] = round(size / seconds / 1e6, 1)
                result[f'{label}_seconds_at_wmt14'] = round(seconds / args.scale, 3)
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
