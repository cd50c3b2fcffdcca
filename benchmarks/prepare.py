"""Preparing WMT14 through TFDS without TensorFlow: time, disk and peak memory against corpus
size, extrapolated to the real de-en and fr-en.

    python benchmarks/prepare.py [--scales=40,120,360] [--repeats=1]

Builds miniature statmt.org archives of the real layout (tests/fake_statmt.py: real WMT news
text from ../shared/data/wmt_ende_sample, repeated as needed) at growing sizes, serves them
to TFDS's own downloader through a local HTTP proxy, and runs `python -m transformer.prepare`
on them in a fresh data directory each time (the real code path: download, checksums,
extraction, example generation, shuffling, ArrayRecord writing). Measures, per size: wall
time, the peak resident memory of the process, the bytes of the archives, of their extracted
text and of the prepared ArrayRecord files. Fits each against the training pairs (a straight
line through the sizes), and prints ONE JSON object with the per-million-pair figures and their
extrapolation to WMT14 de-en (4,508,785 training pairs) and fr-en (40,836,715).

Peak memory is governed by the largest corpus, which TFDS's WMT parser reads whole (both
sides at once), plus the shuffler's buffer of up to 1 GB: the fit is per million pairs of the
largest corpus (europarl here: the miniature scales all corpora alike), extrapolated to
commoncrawl (2,399,123 pairs) for de-en and to Giga-FrEn (22,520,376) for fr-en.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))

import fake_statmt as fs  # noqa: E402

DE_EN_PAIRS, FR_EN_PAIRS = 4_508_785, 40_836_715
LARGEST_CORPUS = {'de-en': 2_399_123, 'fr-en': 22_520_376}  # commoncrawl, Giga-FrEn
ARCHIVES_GIB = {'de-en': 1.58, 'fr-en': 6.2}  # TFDS's registered download sizes


def du(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) if path.exists() else 0


def prepare_once(scale: int, root: pathlib.Path) -> dict:
    archives = root / f'archives-{scale}'
    facts = fs.build_archives(archives, scale=scale)
    fs.write_checksums(archives, root / f'checksums-{scale}.txt')
    server = fs.FakeStatmt(archives)
    data_dir = root / f'tfds-{scale}'
    env = fs.env(dict(os.environ, PYTHONPATH=str(REPO)), server.proxy,
                 root / f'checksums-{scale}.txt')
    # A wrapper whose child's peak is the program's own (RUSAGE_CHILDREN of a small parent).
    wrapper = ('import resource, subprocess, sys; '
               'r = subprocess.run(sys.argv[1:], capture_output=True, text=True); '
               'sys.stderr.write(r.stderr[-2000:] if r.returncode else ""); '
               'print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)')
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, '-c', wrapper, *fs.command(
            'prepare', '--config=configs/wmt14_ende.py:base',
            f'--config.data.tfds_data_dir={data_dir}')],
        cwd=REPO, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    server.close()
    code, peak_kib = map(int, out.stdout.split())
    if code:
        raise SystemExit(f'prepare failed at scale {scale}: {out.stderr}')
    downloads = data_dir / 'downloads'
    return {
        'scale': scale,
        'train_pairs': len(facts['train']),
        'largest_corpus_pairs': fs.SIZES[fs.EUROPARL] * scale,
        'seconds': round(seconds, 2),
        'peak_rss_mib': round(peak_kib / 1024, 1),
        'archive_bytes': du(downloads / 'wmt14_translate'),
        'extracted_bytes': du(downloads / 'extracted'),
        'prepared_bytes': du(data_dir / 'wmt14_translate'),
    }


# The resident high-water mark of this process (VmHWM: unlike ru_maxrss, it starts anew at
# exec, so it does not carry the parent's size), in KiB.
_HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
_PARSE = f"""
import sys
from tensorflow_datasets.translate import wmt
before = {_HWM}
for _ in wmt._parse_parallel_sentences(sys.argv[1], sys.argv[2]):  # one example at a time,
    pass                                                          # as TFDS consumes them
print(before, {_HWM})
"""


def parser_memory(lines: int, root: pathlib.Path) -> dict:
    """Peak memory of TFDS's WMT parser on one corpus of `lines` pairs (it reads both files
    whole): the resident set before and after, in MiB."""
    en, de = fs._training_pairs(lines)  # noqa: SLF001 - the fixture's own text
    f1, f2 = root / f'corpus{lines}.de-en.de', root / f'corpus{lines}.de-en.en'
    f1.write_text('\n'.join(de) + '\n', encoding='utf-8')
    f2.write_text('\n'.join(en) + '\n', encoding='utf-8')
    out = subprocess.run([sys.executable, '-c', _PARSE, str(f1), str(f2)], capture_output=True,
                         text=True, check=True)
    before, after = map(int, out.stdout.split())
    return {'lines': lines, 'text_bytes': f1.stat().st_size + f2.stat().st_size,
            'rss_before_mib': round(before / 1024, 1), 'rss_after_mib': round(after / 1024, 1)}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scales', default='100,300,900',
                        help='multiples of the test fixture (550 training pairs each)')
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for scale in scales:
            rows.append(prepare_once(scale, pathlib.Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr)
        parsed = [parser_memory(n, pathlib.Path(tmp)) for n in (300_000, 1_000_000)]
    pairs = [r['train_pairs'] for r in rows]
    largest = [r['largest_corpus_pairs'] for r in rows]
    per_million = {}
    for key in ('seconds', 'archive_bytes', 'extracted_bytes', 'prepared_bytes'):
        intercept, slope = fit(pairs, [r[key] for r in rows])
        per_million[key] = {'fixed': round(intercept, 2), 'per_million_pairs': slope * 1e6}
    # MiB per million lines (pairs).
    _, parse_slope = fit([p['lines'] / 1e6 for p in parsed],
                         [p['rss_after_mib'] - p['rss_before_mib'] for p in parsed])
    mem0, mem_slope = fit([n / 1e6 for n in largest], [r['peak_rss_mib'] for r in rows])
    # Serialized examples the shuffler keeps in memory before it spills to disk buckets.
    shuffle_cap_mib = 1000 * 1.15  # MAX_MEM_BUFFER_SIZE, plus Python's per-object overhead
    archive_ratio = {k: per_million[k]['per_million_pairs']
                     / per_million['archive_bytes']['per_million_pairs']
                     for k in ('extracted_bytes', 'prepared_bytes')}
    extrapolated = {}
    for name, total in (('de-en', DE_EN_PAIRS), ('fr-en', FR_EN_PAIRS)):
        archives = ARCHIVES_GIB[name] * 2**30
        extrapolated[name] = {
            'train_pairs': total,
            'prepare_minutes_after_download': round(
                (per_million['seconds']['fixed'] + per_million['seconds']['per_million_pairs']
                 * total / 1e6) / 60, 1),
            'extracted_gib_from_archive_ratio': round(
                archives * archive_ratio['extracted_bytes'] / 2**30, 1),
            'prepared_gib_from_archive_ratio': round(
                archives * archive_ratio['prepared_bytes'] / 2**30, 1),
            'prepared_gib_from_pairs': round(
                per_million['prepared_bytes']['per_million_pairs'] * total / 1e6 / 2**30, 1),
            # The largest corpus held whole by the parser, plus the shuffler's full buffer.
            'peak_memory_gib': round((mem0 + parse_slope * LARGEST_CORPUS[name] / 1e6
                                      + shuffle_cap_mib) / 1024, 1),
        }
    print(json.dumps({
        'benchmark': 'prepare',
        'date': datetime.date.today().isoformat(),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
        'load_average': os.getloadavg(),
        'runs': rows,
        'per_million_pairs': per_million,
        'peak_memory_mib': {'fixed': round(mem0, 1),
                            'per_million_pairs_of_largest_corpus': round(mem_slope, 1),
                            'parser_per_million_lines': round(parse_slope, 1),
                            'parser_runs': parsed,
                            'shuffler_buffer_cap': shuffle_cap_mib},
        'bytes_per_archive_byte': archive_ratio,
        'extrapolated': extrapolated,
        'note': 'time excludes the download (statmt.org: about 150-180 kB/s reported, i.e. '
                '2-3 hours for de-en); the miniature text is the WMT sample repeated, so gzip '
                'ratios are those of news text',
    }, indent=2))


if __name__ == '__main__':
    main()
