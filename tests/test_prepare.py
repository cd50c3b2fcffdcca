"""WMT14 through TFDS's real builder, offline and without TensorFlow: miniature statmt.org
archives of the real layout served to TFDS's own downloader (tests/fake_statmt.py), prepared,
trained on and evaluated through the command line; the failures a flaky statmt.org causes."""

import json
import pathlib
import shutil
import subprocess
import sys

import fake_statmt as fs
import pytest
from conftest import REPO, SHARED_DATA, TINY_TRAIN, error_line, program_env

from transformer import config as config_lib
from transformer import data, tfds_compat, tfds_source

CONFIG = 'configs/wmt14_ende.py:base,runlocal'
VERSION = pathlib.Path('wmt14_translate', 'de-en', '1.0.0')


@pytest.fixture(scope='module')
def statmt(tmp_path_factory):
    """The miniature archives, their checksums and the fake statmt.org serving them."""
    root = tmp_path_factory.mktemp('statmt')
    facts = fs.build_archives(root / 'archives')
    fs.write_checksums(root / 'archives', root / 'checksums.txt')
    server = fs.FakeStatmt(root / 'archives')
    yield dict(facts, root=root, server=server, checksums=root / 'checksums.txt')
    server.close()


def run(statmt, module, *args, proxy=None, checksums=None, timeout=300):
    """A program through the fake statmt.org, TensorFlow hidden (not installed in CI anyway),
    one download retry instead of TFDS's ten."""
    env = fs.env(program_env(FAKE_STATMT_RETRIES='1'), proxy or statmt['server'].proxy,
                 checksums or statmt['checksums'])
    return subprocess.run(fs.command(module, *args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tfds_config(data_dir):
    c = config_lib.load_file(str(REPO / CONFIG))
    c.data.tfds_data_dir = str(data_dir)
    return c


@pytest.fixture(scope='module')
def prepared(statmt, tmp_path_factory):
    """A data directory prepared by `python -m transformer.prepare` without TensorFlow."""
    data_dir = tmp_path_factory.mktemp('tfds')
    proc = ok(run(statmt, 'prepare', f'--config={CONFIG}',
                  f'--config.data.tfds_data_dir={data_dir}'))
    return data_dir, proc.stderr


def test_prepare_writes_what_tfds_writes_with_tensorflow(statmt, prepared):
    data_dir, said = prepared
    # What it will download and where, the disk it needs, and the split sizes at the end.
    assert 'Preparing wmt14_translate/de-en/1.0.0' in said and 'of disk needed' in said
    for url in fs.URLS:
        assert url in said
    assert str(data_dir / 'downloads' / 'manual' / 'dev.tgz') in said
    assert f'train: {len(statmt["train"]):,} pairs' in said
    assert f'test: {len(statmt["test"][0]):,} pairs' in said
    assert 'test: read in the order of its source files' in said
    # The records are those TFDS writes with TensorFlow installed (recorded by
    # `python tests/fake_statmt.py --record`), in the same order.
    assert fs.record_digests(data_dir / VERSION) == fs.REFERENCE_DIGESTS[fs.variant()]
    # Nothing half-finished is left behind.
    assert not list(data_dir.rglob('incomplete.*')) and not list(data_dir.rglob('*.tmp.*'))


def test_evaluation_splits_come_in_the_official_order(statmt, prepared):
    data_dir, _ = prepared
    config = tfds_config(data_dir)
    tfds_source.clear_cache()
    sources, references = data.load_text(config, 'test')
    assert (sources, references) == statmt['test']  # the SGML files' order, not TFDS's
    shuffled = tfds_source.builder(config.data).as_data_source('test')
    assert [r['de'].decode() for r in shuffled] != references  # TFDS's own order differs
    assert data.load_text(config, 'validation') == statmt['validation']
    if (SHARED_DATA / 'wmt14_newstest').is_dir():  # the real newstest2014, line for line
        official = (SHARED_DATA / 'wmt14_newstest' / 'newstest2014.de').read_text(
            encoding='utf-8').split('\n')
        assert references == official[:len(references)]
    # The direction is the config's, whatever the dataset's key order (de-en).
    config.source_lang, config.target_lang = 'de', 'en'
    assert data.load_text(config, 'test') == statmt['test'][::-1]
    config.source_lang = 'fr'
    with pytest.raises(ValueError, match="source_lang='fr' is not in wmt14_translate/de-en"):
        data.load_text(config, 'test')
    tfds_source.clear_cache()


def test_train_prepares_then_evaluate_scores_in_the_official_order(statmt, tmp_path):
    data_dir, workdir = tmp_path / 'tfds', tmp_path / 'run'
    common = [f'--config.data.tfds_data_dir={data_dir}']
    # Three steps: a model still close to its random start, whose greedy outputs tell most
    # sentences apart (a beam prefers the empty translation of such a model).
    proc = ok(run(statmt, 'train', f'--config={CONFIG}', f'--workdir={workdir}', *TINY_TRAIN,
                  '--config.train.steps=3', '--config.data.batching=pack', *common))
    assert 'Preparing wmt14_translate/de-en/1.0.0' in proc.stderr  # train prepared it itself
    assert fs.record_digests(data_dir / VERSION) == fs.REFERENCE_DIGESTS[fs.variant()]
    result = json.loads(ok(run(statmt, 'evaluate', f'--workdir={workdir}', '--split=test',
                               '--batch_sentences=160', '--beam_size=1')).stdout)
    hyp, src, ref = (pathlib.Path(result[k]).read_text(encoding='utf-8').split('\n')[:-1]
                     for k in ('hypotheses_file', 'sources_file', 'references_file'))
    assert (src, ref) == statmt['test'] and len(hyp) == len(src)
    # Line i of the .hyp translates line i of the .src: translate, which keeps its input's
    # order, gives the same lines (one batch of the same sentences, the same computation).
    translated = subprocess.run(
        [sys.executable, '-m', 'transformer.translate', f'--workdir={workdir}',
         '--batch_sentences=160', '--beam_size=1'], input='\n'.join(src) + '\n',
        capture_output=True, text=True, cwd=REPO, env=program_env(), timeout=300)
    assert ok(translated).stdout.split('\n')[:-1] == hyp
    assert len(set(hyp)) > len(hyp) // 4 and result['chrf'] > 0
    # sacreBLEU by hand on the files gives the printed scores.
    for metric, key in (('bleu', 'sacrebleu'), ('chrf', 'chrf')):
        by_hand = subprocess.run(
            [sys.executable, '-m', 'sacrebleu', result['references_file'], '-i',
             result['hypotheses_file'], '-m', metric, '-b', '-w', '6'],
            capture_output=True, text=True, check=True)
        assert float(by_hand.stdout) == pytest.approx(result[key], abs=1e-6), metric


def test_failed_downloads_are_one_line_and_a_retry_goes_on(statmt, tmp_path):
    server, archives = statmt['server'], statmt['root'] / 'archives'
    data_dir = tmp_path / 'tfds'
    args = [f'--config={CONFIG}', f'--config.data.tfds_data_dir={data_dir}']
    manual = data_dir / 'downloads' / 'manual'

    def fails(*, proxy=None, checksums=None):
        proc = run(statmt, 'prepare', *args, proxy=proxy, checksums=checksums)
        assert proc.returncode == 2, proc.stderr[-3000:]
        return error_line(proc)

    server.fail[fs.EUROPARL] = 503  # statmt.org overloaded (urllib3 retries, then gives up)
    line = fails()
    assert f'could not download {fs.EUROPARL}' in line and '503' in line
    assert f'put it in {manual} as training-parallel-europarl-v7.tgz' in line
    del server.fail[fs.EUROPARL]

    line = fails(proxy=fs.REFUSED_PROXY)  # no connection at all
    assert f'could not download {fs.EUROPARL}' in line

    # The manual route for europarl; commoncrawl arrives with other bytes than registered.
    manual.mkdir(parents=True)
    shutil.copy(fs.archive_path(archives, fs.EUROPARL), manual)
    europarl_requests = server.requests.get(fs.EUROPARL, 0)
    server.fail[fs.COMMONCRAWL] = b'<html>503 Service Unavailable</html>'
    line = fails()
    assert f'{fs.COMMONCRAWL} does not have the size and checksum TFDS registered' in line
    assert server.requests.get(fs.EUROPARL, 0) == europarl_requests  # taken from manual/
    del server.fail[fs.COMMONCRAWL]

    server.fail[fs.NEWS_COMMENTARY] = 'cut'  # the connection drops mid-download
    assert f'could not download {fs.NEWS_COMMENTARY}' in fails()
    del server.fail[fs.NEWS_COMMENTARY]

    # A damaged archive whose checksum matches what is registered: extraction fails.
    whole = fs.archive_path(archives, fs.DEV).read_bytes()
    server.fail[fs.DEV] = whole[:len(whole) // 2]
    damaged = statmt['root'] / 'damaged-checksums.txt'
    fs.write_checksums(archives, damaged, override={fs.DEV: server.fail[fs.DEV]})
    line = fails(checksums=damaged)
    assert f'cannot extract {fs.DEV}' in line and 'damaged' in line
    del server.fail[fs.DEV]

    # Every fault gone: the retry removes what the failures left half-finished and prepares
    # exactly what a clean preparation gives.
    proc = ok(run(statmt, 'prepare', *args))
    assert 'Removed a half-finished file' in proc.stderr
    assert fs.record_digests(data_dir / VERSION) == fs.REFERENCE_DIGESTS[fs.variant()]
    assert not list(data_dir.rglob('incomplete.*')) and not list(data_dir.rglob('*.tmp.*'))
    # Prepared once, then nothing more to do.
    again = ok(run(statmt, 'prepare', *args))
    assert 'Preparing' not in again.stderr and 'test: read in the order' in again.stderr


def test_the_shufflers_disk_buckets_work_with_the_stand_in(tmp_path, monkeypatch):
    """Splits over 1 GB (WMT14's training sets) go through the shuffler's on-disk buckets,
    which TFDS writes with tf.io.gfile: same order with the stand-in as in memory."""
    from tensorflow_datasets.core import shuffle
    monkeypatch.setattr(shuffle, 'tf', tfds_compat.stand_in())

    def shuffled(limit):
        monkeypatch.setattr(shuffle, 'MAX_MEM_BUFFER_SIZE', limit)
        directory = tmp_path / f'buckets{limit}'
        shuffler = shuffle.Shuffler(directory, hash_salt='train')
        for i in range(500):
            shuffler.add(f'europarl_v7/0/{i}', f'pair {i}'.encode() * 20)
        on_disk = len(shuffler.bucket_lengths) == shuffle.BUCKETS_NUMBER
        assert on_disk == bool(directory.exists() and list(directory.iterdir()))
        out = [data for _, data in shuffler]
        assert not directory.exists() or not list(directory.iterdir())  # buckets removed
        return on_disk, out

    on_disk, through_disk = shuffled(1 << 10)
    in_memory, through_memory = shuffled(1 << 30)
    assert on_disk and not in_memory
    assert through_disk == through_memory and len(through_disk) == 500
