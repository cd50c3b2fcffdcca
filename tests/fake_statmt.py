"""A miniature statmt.org for the real TFDS WMT14 path, offline.

`build_archives` writes archives with the exact names and member layout of those TFDS's
`wmt14_translate` builder downloads (europarl-v7, commoncrawl, news-commentary-v9 and the WMT19
`dev.tgz` with newstest2013 as plain text and newstest2014 as SGML), holding a few hundred real
sentence pairs: training text from ../shared/data/wmt_ende_sample and the first documents of
the real newstest2014 SGML files when they are there, generated text otherwise.

`FakeStatmt` serves them as an HTTP proxy on 127.0.0.1: a program run with
`http_proxy=http://127.0.0.1:PORT` (see `env`) downloads them through TFDS's own downloader,
requests and urllib3, unchanged. Each URL can be made to fail (HTTP 503, a connection cut
mid-body). Connection refused is a proxy address where nothing listens (`REFUSED_PROXY`).

The fakes' checksums are not TFDS's registered ones; `python tests/fake_statmt.py CHECKSUMS
-m MODULE ARGS` runs a program with TFDS's registry of the WMT14 URLs replaced by CHECKSUMS
(the only change to TFDS), optionally hiding an installed TensorFlow (FAKE_STATMT_NO_TF=1) and
with fewer download retries than TFDS's 10 (FAKE_STATMT_RETRIES: against a refused connection
urllib3 backs off for about 3.5 minutes before TFDS gives up).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pathlib
import re
import runpy
import sys
import tarfile
import threading

SHARED = pathlib.Path(os.environ.get('FAKE_STATMT_SHARED') or
                      pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data')

EUROPARL = 'http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz'
COMMONCRAWL = 'http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz'
NEWS_COMMENTARY = 'http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz'
DEV = 'http://data.statmt.org/wmt19/translation-task/dev.tgz'
URLS = (EUROPARL, COMMONCRAWL, NEWS_COMMENTARY, DEV)
# A proxy address where nothing listens: every download's connection is refused.
REFUSED_PROXY = 'http://127.0.0.1:9'

# The records TFDS writes for these archives with TensorFlow installed (record_digests of a
# preparation by tensorflow-cpu 2.21.0 and tensorflow-datasets 4.9.10, 2026-12-01). To record
# them again after a TFDS upgrade, in an environment with TensorFlow:
#     python tests/fake_statmt.py --record
REFERENCE_DIGESTS = {
    'shared': {
        'test': 'e42def249a6fed6a003733774abaa2e82008e900b737d5cc56e3edcd310f13d0',
        'train': '69a9b657d5e9ab4d6113155befc13195b346f3d55bba4733d2b44133ad919f58',
        'validation': 'a7ac64ca815c2e53dc8a4d296a5bb48964b14c65b1d062ce1ab411b69d691bf8'},
    'generated': {
        'test': '52ff835e21e23129c757196b61c8a413226305ba754dd7d0c881c91b6230718d',
        'train': '329a719e26645fa7b6a187eaf7daf1ae542ff4be959dbf6eec43db4545a73b99',
        'validation': '9847f6f36826e3ae6c58985b577de6d7ff1906f94a469e4a6e035eebbcc0e154'},
}

# Training lines per corpus (de-en), and newstest documents kept.
SIZES = {EUROPARL: 300, COMMONCRAWL: 150, NEWS_COMMENTARY: 100}
TEST_DOCUMENTS = 6
VALIDATION_LINES = 120


def _generated(n: int, offset: int, words: list[str]) -> list[str]:
    return [' '.join(words[(i * 7 + k * k + offset) % len(words)] for k in range(3 + i % 9))
            + f' {i}.' for i in range(n)]


_EN = 'the a house street man woman dog cat runs sees red blue small big city river'.split()
_DE = 'der die Haus Straße Mann Frau Hund Katze läuft sieht rot blau klein groß Stadt'.split()


def variant() -> str:
    """'shared' when the fixture's text comes from ../shared/data, 'generated' otherwise."""
    return ('shared' if (SHARED / 'wmt_ende_sample').is_dir()
            and (SHARED / 'wmt14_newstest').is_dir() else 'generated')


def _training_pairs(total: int) -> tuple[list[str], list[str]]:
    """`total` training pairs: the WMT sample's lines (past its end, again with a number), or
    generated ones."""
    sample = SHARED / 'wmt_ende_sample'
    if variant() != 'shared':
        return _generated(total, 0, _EN), _generated(total, 3, _DE)
    out = []
    for lang in ('en', 'de'):
        lines = (sample / f'train.tok.{lang}').read_text(encoding='utf-8').split('\n')
        lines = [line for line in lines if line]
        out.append([lines[i % len(lines)] + ('' if i < len(lines) else f' ({i})')
                    for i in range(total)])
    return tuple(out)


def _sgm_documents(path: pathlib.Path, documents: int) -> str:
    """The first `documents` <doc> elements of a WMT SGML file, with its header and footer."""
    lines = path.read_text(encoding='utf-8').split('\n')
    out, seen = [], 0
    for line in lines:
        if line.startswith('<doc '):
            seen += 1
            if seen > documents:
                break
        out.append(line)
    closing = lines[-1] if lines[-1] else lines[-2]
    return '\n'.join(out + [closing]) + '\n'


def _sgm(kind: str, lang: str, segments: list[list[str]], src: str, tgt: str) -> str:
    head = (f'<srcset setid="newstest2014" srclang="{src}">' if kind == 'src' else
            f'<refset trglang="{tgt}" setid="newstest2014" srclang="{src}">')
    out = [head]
    for d, doc in enumerate(segments):
        sysid = ' sysid="ref"' if kind == 'ref' else ''
        out.append(f'<doc{sysid} docid="{d}-fake.{lang}" genre="news" origlang="{src}">')
        out += [f'<seg id="{i + 1}">{s}</seg>' for i, s in enumerate(doc)]
        out.append('</doc>')
    out.append('</srcset>' if kind == 'src' else '</refset>')
    return '\n'.join(out) + '\n'


def newstest2014_sgm() -> dict[str, str]:
    """SGML text of newstest2014 by language (en, de): the real files' first documents."""
    sgm = SHARED / 'wmt14_newstest' / 'sgm'
    if variant() == 'shared':
        return {'en': _sgm_documents(sgm / 'newstest2014-deen-src.en.sgm', TEST_DOCUMENTS),
                'de': _sgm_documents(sgm / 'newstest2014-deen-ref.de.sgm', TEST_DOCUMENTS)}
    en = [_generated(9, 5 + d, _EN) for d in range(TEST_DOCUMENTS)]
    de = [_generated(9, 7 + d, _DE) for d in range(TEST_DOCUMENTS)]
    return {'en': _sgm('src', 'en', en, 'en', 'de'), 'de': _sgm('ref', 'de', de, 'en', 'de')}


def segments(sgm_text: str) -> list[str]:
    """The <seg> texts of an SGML file, in file order (as TFDS's WMT parser reads them)."""
    return re.findall(r'^<seg id="\d+">(.*)</seg>$', sgm_text, flags=re.M)


def _swap_set(sgm_text: str, kind: str, src: str, tgt: str) -> str:
    """The same documents with the header of a src or ref set (the other direction's file)."""
    body = sgm_text.split('\n', 1)[1].rsplit('</', 1)[0]
    head = (f'<srcset setid="newstest2014" srclang="{src}">' if kind == 'src' else
            f'<refset trglang="{tgt}" setid="newstest2014" srclang="{src}">')
    return head + '\n' + body + ('</srcset>\n' if kind == 'src' else '</refset>\n')


def newstest2013() -> tuple[list[str], list[str]]:
    plain = SHARED / 'wmt14_newstest'
    if variant() == 'shared':
        return tuple((plain / f'newstest2013.{lang}').read_text(encoding='utf-8')
                     .split('\n')[:VALIDATION_LINES] for lang in ('en', 'de'))
    return _generated(VALIDATION_LINES, 11, _EN), _generated(VALIDATION_LINES, 13, _DE)


def _tgz(path: pathlib.Path, members: dict[str, str]) -> None:
    """A gzipped tar of text members, with directory entries as statmt's archives have."""
    with tarfile.open(path, 'w:gz') as tar:
        dirs = sorted({m.rsplit('/', 1)[0] for m in members if '/' in m})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, text in members.items():
            data = text.encode('utf-8')
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def _text(lines: list[str]) -> str:
    return '\n'.join(lines) + '\n'


def build_archives(directory: pathlib.Path, scale: int = 1) -> dict:
    """Writes the four archives of wmt14_translate/de-en (`scale` times SIZES training pairs);
    returns facts the tests check: the training pairs, newstest2013 and newstest2014 (en, de)
    in their official order."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {url: n * scale for url, n in SIZES.items()}
    en, de = _training_pairs(sum(sizes.values()))
    start = 0
    corpora = {}
    for url, n in sizes.items():
        corpora[url] = (en[start:start + n], de[start:start + n])
        start += n
    other = {lang: _text(_generated(20, 1, _EN)) for lang in ('cs', 'es', 'fr', 'ru')}

    def pairs_of(prefix, url, langs):
        members = {}
        for lang in langs:  # the other pairs of the real archive, a few lines each
            members[f'{prefix}.{lang}-en.{lang}'] = other[lang]
            members[f'{prefix}.{lang}-en.en'] = other[lang]
        members[f'{prefix}.de-en.de'] = _text(corpora[url][1])
        members[f'{prefix}.de-en.en'] = _text(corpora[url][0])
        return members

    files = {
        EUROPARL: pairs_of('training/europarl-v7', EUROPARL, ('cs', 'es', 'fr')),
        COMMONCRAWL: pairs_of('commoncrawl', COMMONCRAWL, ('cs', 'es', 'fr', 'ru')),
        NEWS_COMMENTARY: pairs_of('training/news-commentary-v9', NEWS_COMMENTARY,
                                  ('cs', 'fr', 'ru')),
    }
    sgm = newstest2014_sgm()
    val_en, val_de = newstest2013()
    files[DEV] = {
        'dev/newstest2013.en': _text(val_en), 'dev/newstest2013.de': _text(val_de),
        # TFDS's de-en reads src.de and ref.en; the en-de direction's files come along too.
        'dev/newstest2014-deen-src.en.sgm': sgm['en'],
        'dev/newstest2014-deen-ref.de.sgm': sgm['de'],
        'dev/newstest2014-deen-src.de.sgm': _swap_set(sgm['de'], 'src', 'de', 'en'),
        'dev/newstest2014-deen-ref.en.sgm': _swap_set(sgm['en'], 'ref', 'de', 'en'),
    }
    for url, members in files.items():
        _tgz(directory / url.rsplit('/', 1)[1], members)
    test_en, test_de = segments(sgm['en']), segments(sgm['de'])
    train = [p for url in sizes for p in zip(*corpora[url]) if p[0] and p[1]]
    return dict(train=train, validation=(val_en, val_de), test=(test_en, test_de))


def archive_path(directory: pathlib.Path, url: str) -> pathlib.Path:
    return directory / url.rsplit('/', 1)[1]


def write_checksums(directory: pathlib.Path, file: pathlib.Path,
                    override: dict[str, bytes] | None = None) -> None:
    """TFDS's checksum lines (url, size, sha256, file name) for the archives in `directory`
    (or the bytes in `override` for some URLs)."""
    lines = []
    for url in URLS:
        data = (override or {}).get(url) or archive_path(directory, url).read_bytes()
        lines.append(f'{url}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\t'
                     f'{url.rsplit("/", 1)[1]}\n')
    file.write_text(''.join(lines))


class FakeStatmt:
    """statmt.org as an HTTP proxy serving the archives of a directory.

    `fail[url]`: 503 (every request answered 503, with Retry-After 0 so urllib3's retries are
    quick), 'cut' (half the body, then the connection closes), or bytes to serve instead.
    `requests` counts the GETs per URL.
    """

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self.fail: dict[str, object] = {}
        self.requests: dict[str, int] = {}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                url = self.path
                fake.requests[url] = fake.requests.get(url, 0) + 1
                how = fake.fail.get(url)
                if how == 503:
                    self.send_response(503)
                    self.send_header('Retry-After', '0')
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                if isinstance(how, bytes):
                    data = how
                elif url in URLS:
                    data = archive_path(fake.directory, url).read_bytes()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header('Content-Type', 'application/x-gzip')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if how == 'cut' else data)
                if how == 'cut':
                    self.wfile.flush()
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.proxy = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def env(base: dict, proxy: str, checksums: pathlib.Path, hide_tensorflow: bool = True) -> dict:
    """A program's environment: downloads through `proxy`, TFDS told the fakes' checksums."""
    out = dict(base, http_proxy=proxy, HTTP_PROXY=proxy, FAKE_STATMT_CHECKSUMS=str(checksums))
    out.pop('https_proxy', None)
    out.pop('no_proxy', None)
    out.pop('NO_PROXY', None)
    if hide_tensorflow:
        out['FAKE_STATMT_NO_TF'] = '1'
    return out


def command(module: str, *args: str) -> list[str]:
    """`python tests/fake_statmt.py -m transformer.MODULE ARGS` (see `_launch`)."""
    return [sys.executable, str(pathlib.Path(__file__).resolve()), '-m',
            f'transformer.{module}', *args]


class _WithoutTensorFlow:
    """Wraps an import finder so that it never finds TensorFlow: `import tensorflow` and
    `importlib.util.find_spec('tensorflow')` then behave as if it were not installed."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == 'tensorflow' or name.startswith('tensorflow.'):
            return None
        find = getattr(self._finder, 'find_spec', None)
        return find(name, path, target) if find else None

    def __getattr__(self, name):
        return getattr(self._finder, name)


def _launch(argv: list[str]) -> None:
    """Runs `-m MODULE ARGS` as __main__, TFDS's registered WMT14 checksums replaced by the
    file in FAKE_STATMT_CHECKSUMS, TensorFlow hidden when FAKE_STATMT_NO_TF is set."""
    if os.environ.get('FAKE_STATMT_NO_TF'):
        sys.meta_path[:] = [_WithoutTensorFlow(f) for f in sys.meta_path]
    from tensorflow_datasets.core.download import checksums
    from tensorflow_datasets.core.download import download_manager as dm
    fakes = checksums.load_url_infos(os.environ['FAKE_STATMT_CHECKSUMS'])
    original = dm.DownloadManager.__init__

    def init(self, *args, **kwargs):
        kwargs['url_infos'] = dict(kwargs.get('url_infos') or {}, **fakes)
        original(self, *args, **kwargs)

    dm.DownloadManager.__init__ = init
    if os.environ.get('FAKE_STATMT_RETRIES'):  # urllib3's retries back off for minutes
        from tensorflow_datasets.core.download import downloader
        downloader.MAX_RETRIES = int(os.environ['FAKE_STATMT_RETRIES'])
    assert argv[0] == '-m', argv
    sys.argv = [argv[1]] + argv[2:]
    runpy.run_module(argv[1], run_name='__main__', alter_sys=True)


def record_digests(version_dir: pathlib.Path) -> dict[str, str]:
    """sha256 per split of a prepared dataset's records, in file order, each record
    re-serialized canonically. TFDS's own output is not byte-stable: a tf.train.Example's
    feature map is serialized in hash order, which varies from process to process (with or
    without TensorFlow), so files from two identical preparations can differ in bytes while
    holding the same records."""
    from array_record.python import array_record_module
    from tensorflow_datasets.proto import tf_example_pb2
    digests = {}
    for path in sorted(version_dir.glob('*.array_record-*')):
        split = path.name.split('-')[1].split('.')[0]
        reader = array_record_module.ArrayRecordReader(str(path))
        h = hashlib.sha256()
        for record in reader.read_all():
            example = tf_example_pb2.Example.FromString(record)
            h.update(example.SerializeToString(deterministic=True))
        reader.close()
        digests[split] = h.hexdigest()
    return digests


def _record() -> None:
    """Prepares the fixture with the TensorFlow of this environment and prints its digests."""
    import tempfile

    import tensorflow  # noqa: F401 - the reference must be TFDS with TensorFlow
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums
    from tensorflow_datasets.core.download import download_manager as dm
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        build_archives(root / 'archives')
        write_checksums(root / 'archives', root / 'checksums.txt')
        server = FakeStatmt(root / 'archives')
        os.environ.update(http_proxy=server.proxy, HTTP_PROXY=server.proxy)
        fakes = checksums.load_url_infos(root / 'checksums.txt')
        original = dm.DownloadManager.__init__
        dm.DownloadManager.__init__ = lambda self, *a, **k: original(
            self, *a, **dict(k, url_infos=dict(k.get('url_infos') or {}, **fakes)))
        builder = tfds.builder('wmt14_translate/de-en', data_dir=str(root / 'tfds'))
        builder.download_and_prepare(file_format='array_record')
        print(json.dumps({variant(): record_digests(pathlib.Path(builder.data_dir))}, indent=2))
        server.close()


if __name__ == '__main__':
    if sys.argv[1:] == ['--record']:
        _record()
    else:
        _launch(sys.argv[1:])

