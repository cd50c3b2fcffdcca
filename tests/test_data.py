"""Input pipeline: batch layout, exact resume, sharding, the three sources and bad input."""

import collections
import json
import pathlib

import numpy as np
import pytest
from conftest import load_config, shared_data

from transformer import batching as batching_lib
from transformer import config as config_lib
from transformer import data, synthetic
from transformer import tokenizer as tk
from transformer import vocabulary as vocabulary_lib

WORDS = 'the a man woman dog cat runs jumps over under red blue small big street park'.split()
WORTER = ('der die Mann Frau Hund Katze läuft springt über unter rot blau klein groß '
          'Straße').split()


def _sentence(words, i, n):
    return ' '.join(words[(i * 7 + k * k) % len(words)] for k in range(n)) + f' {i}'


def _write_corpus(prefix, num, extra_src=(), extra_tgt=()):
    """num pairs of 2..14 words, each ending in its number (so every pair is unique)."""
    src = [_sentence(WORDS, i, 2 + i % 13) for i in range(num)] + list(extra_src)
    tgt = [_sentence(WORTER, i, 2 + (i * 5) % 13) for i in range(num)] + list(extra_tgt)
    pathlib.Path(f'{prefix}.en').write_text('\n'.join(src) + '\n', encoding='utf-8')
    pathlib.Path(f'{prefix}.de').write_text('\n'.join(tgt) + '\n', encoding='utf-8')
    return src, tgt


def _config(prefix, batching='bucket', **data_fields):
    c = config_lib.base_config()
    c.vocab_size = 200
    c.data.source = 'local'
    c.data.train = c.data.validation = c.data.test = str(prefix)
    c.data.update(dict(dict(batching=batching, max_length=32, batch_tokens=256), **data_fields))
    return c


def vocabulary(config, directory):
    """The vocabulary train would make for `config` in the work directory `directory`."""
    return vocabulary_lib.load_or_train(config, str(directory), lambda: data.vocab_text(config))


def iterator(config, tok, **kwargs):
    """The training iterator train would build (the training set tokenized in memory)."""
    return batching_lib.TrainIterator(data.tokenized_train(config, tok), config.data, **kwargs)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A 300-pair corpus (plus one empty and one over-long pair) and its vocabulary."""
    root = tmp_path_factory.mktemp('corpus')
    prefix = root / 'train'
    src, tgt = _write_corpus(prefix, 300, extra_src=['', ' '.join(WORDS * 4)],
                             extra_tgt=['nicht leer', 'kurz'])
    tok = vocabulary(_config(prefix), root / 'work')
    return prefix, src, tgt, tok


def _segments(tokens, seg, pos):
    """(row, segment) -> token list, checking that positions count 0.. within each segment."""
    out = {}
    for r in range(tokens.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            where = np.flatnonzero(seg[r] == s)
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where))), 'contiguous'
            assert np.array_equal(pos[r, where], np.arange(len(where)))
            assert tokens[r, where[-1]] == tk.EOS_ID and tk.EOS_ID not in tokens[r, where[:-1]]
            out[(r, s)] = tokens[r, where].tolist()
    return out


def _pairs_of(batch, tok):
    """Decoded (source, target) of every pair in a batch, checking the layout on the way."""
    for side in ('inputs', 'targets'):
        seg, pos, tokens = batch[f'{side}_segmentation'], batch[f'{side}_position'], batch[side]
        assert tokens.dtype == seg.dtype == pos.dtype == np.int32
        assert tokens.shape == seg.shape == pos.shape
        assert not tokens[seg == 0].any() and not pos[seg == 0].any()
    src = _segments(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'])
    tgt = _segments(batch['targets'], batch['targets_segmentation'], batch['targets_position'])
    assert src.keys() == tgt.keys()
    return [(tok.decode(src[k]), tok.decode(tgt[k])) for k in sorted(src)]


def _epoch(iterator):
    """The batches of the iterator's current epoch (it must be at an epoch start)."""
    epoch = iterator.get_state()['epoch']
    batches = []
    while True:
        batch = next(iterator)
        if iterator.get_state()['epoch'] != epoch:
            return batches
        batches.append(batch)


@pytest.mark.parametrize('batching', ['bucket', 'pack'])
def test_layout_direction_and_filtering(corpus, batching):
    prefix, src, tgt, tok = corpus
    it = iterator(_config(prefix, batching), tok, rows_multiple=4)
    assert it.stats['pairs'] == 302 and it.stats['kept'] == 300
    assert it.stats['dropped_empty'] == 1 and it.stats['dropped_too_long'] == 1
    seen = []
    shapes = set()
    for batch in _epoch(it):
        rows, length = batch['inputs'].shape
        shapes.add((rows, length))
        assert rows % 4 == 0
        # About batch_tokens on the longer side, never more (unless the row multiple forces it).
        assert rows * length <= 256 or rows == 4
        if batching == 'pack':
            assert length == 32
        else:
            assert length in batching_lib.bucket_boundaries(_config(prefix).data)
            assert batch['inputs_segmentation'].max() <= 1
        seen += _pairs_of(batch, tok)
    assert sorted(seen) == sorted(zip(src[:300], tgt[:300]))  # each pair once, en -> de
    assert len(shapes) <= len(batching_lib.bucket_boundaries(_config(prefix).data))


@pytest.mark.parametrize('batching', ['bucket', 'pack'])
@pytest.mark.parametrize('skip', [3, 40])  # mid-epoch, and past the first epoch boundary
def test_exact_resume(corpus, batching, skip):
    prefix, _, _, tok = corpus
    config = _config(prefix, batching)
    first = iterator(config, tok)
    for _ in range(skip):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(6)]
    second = iterator(config, tok)
    second.set_state(state)
    for want in expected:
        got = next(second)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_epochs_reshuffle_and_seed_matters(corpus):
    prefix, _, _, tok = corpus
    it = iterator(_config(prefix), tok)
    one, two = _epoch(it), _epoch(it)
    other = _epoch(iterator(_config(prefix, seed=1), tok))
    assert [b['inputs'].tolist() for b in one] != [b['inputs'].tolist() for b in two]
    assert [b['inputs'].tolist() for b in one] != [b['inputs'].tolist() for b in other]
    with pytest.raises(ValueError, match='seed'):
        iterator(_config(prefix, seed=1), tok).set_state(it.get_state())


@pytest.mark.parametrize('batching', ['bucket', 'pack'])
@pytest.mark.parametrize('processes', [2, 4])
def test_sharding_covers_every_pair_once(corpus, batching, processes):
    prefix, src, tgt, tok = corpus
    config = _config(prefix, batching)
    epochs = [_epoch(iterator(config, tok, process_index=p,
                                              process_count=processes, rows_multiple=2))
              for p in range(processes)]
    assert len({len(e) for e in epochs}) == 1
    seen = []
    for step in zip(*epochs):
        assert len({b['inputs'].shape for b in step}) == 1  # all hosts agree on the shape
        assert step[0]['inputs'].shape[0] % 2 == 0
        for batch in step:
            seen += _pairs_of(batch, tok)
    assert collections.Counter(seen) == collections.Counter(zip(src[:300], tgt[:300]))


@pytest.mark.parametrize('processes', [1, 3])
def test_eval_batches(corpus, processes):
    prefix, src, tgt, tok = corpus
    config = _config(prefix)
    config.model.max_position = 12  # forces truncation of the longer sentences
    sources, targets = data.load_text(config, 'test')
    assert (sources, targets) == (src, tgt)  # unfiltered, in file order
    split = batching_lib.encode_split(config, tok, 'test')  # read and tokenized once
    assert split.references == tgt and split.source_truncated.any()
    seen = []
    for p in range(processes):
        for batch in batching_lib.eval_batches(split, config.data, 16, process_index=p,
                                               process_count=processes):
            assert batch['inputs'].shape[0] == batch['targets'].shape[0] == 16
            assert batch['inputs'].shape[1] % config.data.bucket_step == 0
            for row, i in enumerate(batch['index']):
                if i < 0:
                    assert not batch['inputs'][row].any()
                    continue
                seen.append(int(i))
                want = (tok.encode(src[i].strip())[:11] + [tk.EOS_ID])
                assert batch['inputs'][row, :len(want)].tolist() == want
                assert not batch['inputs'][row, len(want):].any()
    assert sorted(seen) == list(range(len(src)))
    # A quick look batches only the sentences it chose: here 5 of them, in one batch.
    chosen = [3, 0, 7, 1, 4]
    batches = list(batching_lib.eval_batches(split, config.data, 16, indices=chosen))
    assert len(batches) == 1
    assert sorted(i for i in batches[0]['index'] if i >= 0) == sorted(chosen)


def test_padded_length_follows_the_ladder_then_rounds_up():
    bounds = batching_lib.ladder(4, 1.15, 64).tolist()
    assert [int(batching_lib.padded_length(n, 4, 1.15, 64)) for n in (1, 4, 5, 64)] == [
        bounds[0], 4, 8, 64]
    assert int(batching_lib.padded_length(70, 4, 1.15, 64)) == 72  # past the ladder


def test_synthetic_task():
    c = config_lib.base_config()
    c.data.source = 'synthetic'
    c.data.update(synthetic_train_size=50, synthetic_eval_size=20)
    train = synthetic.generate(c, 'train')
    assert train == synthetic.generate(c, 'train')
    assert train[0][:20] != synthetic.generate(c, 'test')[0]
    assert synthetic.generate(c, 'test') != synthetic.generate(c, 'validation')
    lex = synthetic.lexicon()
    translate = {s: t for cls in lex.values() for s, t in cls}
    verbs = {s for s, _ in lex['verb']}
    adjectives = {s for s, _ in lex['adjective']}
    for source, target in zip(*train):
        words = source.split()
        assert c.data.synthetic_min_words <= len(words) <= c.data.synthetic_max_words
        assert sorted(target.split()) == sorted(translate[w] for w in words)
        assert target.split()[-1] == translate[next(w for w in words if w in verbs)]
        for a, b in zip(words, words[1:]):  # adjective-noun swapped
            if a in adjectives:
                assert f'{translate[b]} {translate[a]}' in target


def test_demo_config_end_to_end(tmp_path):
    config = load_config('demo', 'runlocal')
    tok = vocabulary(config, tmp_path)
    it = iterator(config, tok)
    batch = next(it)
    assert batch['inputs'].shape[1] == config.data.max_length
    assert it.stats['dropped_too_long'] == 0
    sources, _ = data.load_text(config, 'validation')
    assert len(sources) == config.data.synthetic_eval_size


# --- Bad input: one clear line each ------------------------------------------------------------


def _one_line_error(config, match):
    with pytest.raises(ValueError, match=match) as e:
        data.load_text(config, 'train')
    assert '\n' not in str(e.value)
    return str(e.value)


def test_bad_input(tmp_path):
    prefix = tmp_path / 'bad'
    _write_corpus(prefix, 5)
    config = _config(prefix)
    (tmp_path / 'bad.de').write_text('eins\nzwei\n', encoding='utf-8')
    msg = _one_line_error(config, 'has 5 lines but')
    assert 'bad.en' in msg and 'bad.de has 2' in msg

    (tmp_path / 'bad.de').write_bytes(b'eins\nzwei\ndrei \xff\xfe\nvier\nfuenf\n')
    _one_line_error(config, r'bad\.de:3: line is not valid UTF-8')

    _one_line_error(_config(tmp_path / 'nowhere'), r'missing file .*nowhere\.en')

    (tmp_path / 'empty.en').write_text('')
    (tmp_path / 'empty.de').write_text('')
    _one_line_error(_config(tmp_path / 'empty'), 'are empty')

    config = _config(prefix)
    config.data.test = ''
    with pytest.raises(ValueError, match=r'config\.data\.test is not set'):
        data.load_text(config, 'test')


def test_nothing_left_after_filtering(corpus, tmp_path):
    prefix, _, _, tok = corpus
    with pytest.raises(ValueError, match='no training pair'):
        iterator(_config(prefix, max_length=2), tok)


# --- Real text (../shared/data, skipped on a fresh clone) --------------------------------------


def test_multi30k(tmp_path):
    root = shared_data('multi30k')
    c = config_lib.base_config()
    c.vocab_size = 2000
    c.data.update(source='local', train=str(root / 'train'), validation=str(root / 'val'),
                  test=str(root / 'test2016'), vocab_sample_sentences=5000)
    tok = vocabulary(c, tmp_path)
    sources, refs = data.load_text(c, 'test')
    assert len(sources) == len(refs) == 1000
    assert tok.decode(tok.encode(sources[0])) == sources[0]
    for how, floor in (('bucket', 0.8), ('pack', 0.9)):
        c.data.batching = how
        it = iterator(c, tok, rows_multiple=8)
        real = total = 0
        for _ in range(5):
            batch = next(it)
            real += ((batch['inputs_segmentation'] > 0).sum()
                     + (batch['targets_segmentation'] > 0).sum())
            total += 2 * batch['inputs'].size
        assert real / total >= floor, (how, real / total)
