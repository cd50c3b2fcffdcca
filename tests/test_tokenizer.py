"""The shared BPE vocabulary: raw-text round trip, special ids, storage and its checks."""

import json
import os

import pytest

from transformer import config as config_lib
from transformer import tokenizer as tk
from transformer import vocabulary as vocabulary_lib
from transformer import workdir as workdir_lib

RAW = [
    'Two young, White males are outside near many bushes.',
    'Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.',
    '  leading and  double spaces, a tab\there and trailing space ',
    'Quotes "like this" & ampersands; naïve café, Straße — dash…',
]


def _corpus():
    words = ('the a man woman dog cat runs jumps over under red blue green small big street '
             'der die das Mann Frau Hund Katze läuft springt über unter rot blau grün '
             'Straße').split()
    lines = []
    for i in range(600):
        lines.append(' '.join(words[(i * k + 3) % len(words)] for k in range(1, 9)) + f' {i}.')
    return lines + RAW


def _config(vocab_size=1200):
    c = config_lib.base_config()
    c.vocab_size = vocab_size
    c.data.source = 'local'
    return c


@pytest.fixture(scope='module')
def vocab_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('vocab'))
    vocabulary_lib.load_or_train(_config(), workdir, _corpus)
    return workdir


def test_special_ids_and_round_trip(vocab_dir):
    tok = vocabulary_lib.load(vocab_dir)
    assert tok.vocab_size <= 1200
    assert tok.pieces([tk.PAD_ID, tk.EOS_ID, tk.UNK_ID]) == ['<pad>', '</s>', '<unk>']
    for text in RAW + ['unseen characters: 日本語 😀 Ωμέγα']:  # byte fallback covers unseen ones
        ids = tok.encode(text)
        assert tk.EOS_ID not in ids and tk.PAD_ID not in ids
        assert tok.decode(ids) == text
    ids = tok.encode('a man runs')
    assert tok.decode(ids + [tk.EOS_ID] + tok.encode('dog') + [tk.PAD_ID] * 3) == 'a man runs'
    assert tok.decode([tk.PAD_ID] + ids + [tk.PAD_ID]) == 'a man runs'
    assert all(isinstance(p, str) for p in tok.pieces(ids))


def test_small_vocabulary_round_trips_seen_text(tmp_path):
    # Below BYTE_FALLBACK_MIN_VOCAB there is no byte fallback; text of seen characters round-trips.
    tok = vocabulary_lib.load_or_train(_config(vocab_size=100), str(tmp_path), _corpus)
    assert tok.vocab_size <= 100
    for text in RAW:
        assert tok.decode(tok.encode(text)) == text


def test_stored_once_and_reused(vocab_dir):
    meta = json.loads(open(os.path.join(vocab_dir, workdir_lib.VOCAB_META)).read())
    assert (meta['vocab_size'], meta['source_lang'], meta['target_lang']) == (1200, 'en', 'de')
    # No temporary files left.
    assert sorted(os.listdir(vocab_dir)) == [workdir_lib.VOCAB_META, workdir_lib.VOCAB_MODEL]

    def fail():
        raise AssertionError('must not retrain')

    tok = vocabulary_lib.load_or_train(_config(), vocab_dir, fail)
    assert tok.decode(tok.encode(RAW[0])) == RAW[0]


def test_refuses_vocabulary_of_another_config(vocab_dir):
    c = _config(vocab_size=500)
    c.target_lang = 'fr'
    with pytest.raises(ValueError, match='vocab_size.*target_lang') as e:
        vocabulary_lib.load_or_train(c, vocab_dir, _corpus)
    assert '\n' not in str(e.value) and 'source_lang' not in str(e.value)


def test_load_missing(tmp_path):
    with pytest.raises(ValueError, match='no vocabulary'):
        vocabulary_lib.load(str(tmp_path))


def test_any_thread_count_gives_the_same_vocabulary_and_ids():
    """Threads follow the usable cores (CPU affinity); the vocabulary file (whose sha256 is the
    run's fingerprint) and the ids must not depend on them."""
    lines = _corpus()
    proto = tk.train(lines, 300, threads=1)
    assert tk.train(lines, 300, threads=2) == proto
    ids = [tk.Tokenizer(proto, threads=n).encode_batch(lines) for n in (1, 2)]
    assert ids[0] == ids[1]
    assert tk.Tokenizer(proto).threads == tk.usable_cores() >= 1


def test_a_lowercasing_vocabulary_lowercases_what_it_encodes_and_nothing_else(tmp_path, vocab_dir):
    """data.lowercase: the vocabulary's own normalizer lowercases as Python's str.lower does
    (ß stays ß), keeps whitespace and all else, and is recorded and checked."""
    c = _config()
    c.data.lowercase = True
    workdir = str(tmp_path)
    tok = vocabulary_lib.load_or_train(c, workdir, _corpus)
    for text in RAW + ['ÜBER DIE STRASSE, İstanbul Ωμέγα', 'no NFKC: ﬁ Ｆｕｌｌ']:
        assert tok.decode(tok.encode(text)) == text.lower()
    cased = 'Der Hund LÄUFT über die Straße.'
    assert tok.encode(cased) == tok.encode(cased.lower())
    assert not any(p != p.lower() for p in tok.pieces(range(tok.vocab_size)) if p[0] != '<')
    meta = json.loads(open(os.path.join(workdir, workdir_lib.VOCAB_META)).read())
    assert meta['lowercase'] is True
    # A cased vocabulary is refused under lowercase and the other way round; a vocab.json from
    # before the field existed means a cased one.
    with pytest.raises(ValueError, match='lowercase: stored False vs config True'):
        vocabulary_lib.load_or_train(c, vocab_dir, _corpus)
    c.data.lowercase = False
    with pytest.raises(ValueError, match='lowercase: stored True vs config False'):
        vocabulary_lib.load_or_train(c, workdir, _corpus)
    meta_file = os.path.join(vocab_dir, workdir_lib.VOCAB_META)
    old = json.loads(open(meta_file).read())
    del old['lowercase']
    legacy = tmp_path / 'legacy'
    legacy.mkdir()
    (legacy / workdir_lib.VOCAB_META).write_text(json.dumps(old))
    (legacy / workdir_lib.VOCAB_MODEL).write_bytes(
        open(os.path.join(vocab_dir, workdir_lib.VOCAB_MODEL), 'rb').read())
    assert vocabulary_lib.load_or_train(c, str(legacy), _corpus).encode('Der') != tok.encode('Der')
