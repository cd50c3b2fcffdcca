"""BLEU and chrF against values worked out by hand."""

import math

import pytest
from sacrebleu.metrics import BLEU

from transformer import bleu


def test_multi_bleu_by_hand():
    # 1-grams 5/6 ('the' clipped to 1), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3, equal lengths.
    s = bleu.corpus_bleu_tokenized(['the cat sat on the mat'], ['the cat sat on a mat'])
    assert s['bleu'] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert s['precisions'] == pytest.approx([500 / 6, 60, 50, 100 / 3])
    assert s['brevity_penalty'] == 1.0


def test_multi_bleu_brevity_penalty_and_corpus_counts():
    # Every n-gram matches; 4 hypothesis tokens against 6: BP = exp(1 - 6/4).
    s = bleu.corpus_bleu_tokenized(['the cat sat on'], ['the cat sat on the mat'])
    assert s['bleu'] == pytest.approx(100 * math.exp(-0.5))
    # Counts are summed over the corpus before the precisions are taken.
    hyps = ['a b c d', 'x y']
    refs = ['a b c d', 'x z']
    s = bleu.corpus_bleu_tokenized(hyps, refs)
    p = [5 / 6, 3 / 4, 2 / 2, 1 / 1]
    assert s['bleu'] == pytest.approx(100 * math.prod(p) ** 0.25)


def test_multi_bleu_is_zero_without_a_4gram_match_and_case_sensitive():
    assert bleu.corpus_bleu_tokenized(['a b c'], ['a b c'])['bleu'] == 0.0  # no 4-grams
    assert bleu.corpus_bleu_tokenized(['The cat sat on'], ['the cat sat on'])['bleu'] == 0.0


@pytest.mark.parametrize('hyp, ref', [
    (['the cat sat on the mat', 'a b c d e'], ['the cat sat on a mat', 'a b c d f g']),
    (['one two three four five six'], ['one two three four five six seven eight']),
])
def test_multi_bleu_equals_sacrebleu_without_tokenization(hyp, ref):
    expected = BLEU(tokenize='none', smooth_method='none', force=True).corpus_score(hyp, [ref])
    assert bleu.corpus_bleu_tokenized(hyp, ref)['bleu'] == pytest.approx(expected.score)


def test_compound_split_like_perl():
    assert bleu.split_compounds('E-Mail-Programm') == (
        'E ##AT##-##AT## Mail ##AT##-##AT## Programm')
    # perl's /g matches do not overlap: the middle letter is consumed by the first match.
    assert bleu.split_compounds('a-b-c') == 'a ##AT##-##AT## b-c'
    assert bleu.split_compounds('x - y -z') == 'x - y -z'


def test_moses_tokenization_escapes_and_keeps_hyphens():
    out = bleu.moses_tokenize('Das "Haus" kostet 3,5 Mio. Euro, sagt Müller-Lüdenscheidt.', 'de')
    assert out == 'Das &quot; Haus &quot; kostet 3,5 Mio. Euro , sagt Müller-Lüdenscheidt .'


def test_tokenized_bleu_splits_compounds():
    # Detokenized, 'rot-grün' vs 'rot-blau' is one wrong token; split, 'rot' and '-' match.
    hyp, ref = ['Das Haus ist rot-grün und groß.'], ['Das Haus ist rot-blau und groß.']
    tokens_h = 'Das Haus ist rot ##AT##-##AT## grün und groß .'.split()
    tokens_r = 'Das Haus ist rot ##AT##-##AT## blau und groß .'.split()
    assert bleu.tokenize_for_paper_bleu(hyp[0], 'de').split() == tokens_h
    assert bleu.tokenize_for_paper_bleu(ref[0], 'de').split() == tokens_r
    # 9 tokens, the 6th wrong: the n-grams avoiding it match: 8/9, 6/8, 4/7, 2/6.
    expected = 100 * (8 / 9 * 6 / 8 * 4 / 7 * 2 / 6) ** 0.25
    assert bleu.tokenized_bleu(hyp, ref, 'de') == pytest.approx(expected)


def test_lowercased_tokenized_bleu_keeps_compounds_whole():
    hyp = ['Das Haus ist rot-grün und sehr schön und groß.']
    ref = ['das Haus ist rot-blau und sehr schön und groß.']
    # Lowercased, 10 tokens, only the 4th ('rot-grün', not split) wrong: 9/10, 7/9, 5/8, 3/7.
    expected = 100 * (9 / 10 * 7 / 9 * 5 / 8 * 3 / 7) ** 0.25
    assert bleu.lowercased_tokenized_bleu(hyp, ref, 'de') == pytest.approx(expected)
    assert bleu.tokenized_bleu(hyp, ref, 'de') < expected  # cased: 'Das' does not match


def test_sacrebleu_cased_lowercased_and_signatures():
    hyp, ref = ['The cat sat on the mat.'], ['the cat sat on the mat.']
    cased, signature = bleu.sacrebleu_score(hyp, ref)
    lower, lower_signature = bleu.lowercased_sacrebleu(hyp, ref)
    assert lower == pytest.approx(100.0)
    # 13a splits the final '.': 7 tokens, only the first differs: 6/7, 5/6, 4/5, 3/4.
    assert cased == pytest.approx(100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    assert 'case:mixed' in signature and 'tok:13a' in signature and 'nrefs:1' in signature
    assert 'case:lc' in lower_signature


def test_chrf_perfect_and_signature():
    score, signature = bleu.chrf(['Guten Morgen'], ['Guten Morgen'])
    assert score == pytest.approx(100.0)
    assert signature.startswith('nrefs:1') and 'nc:6' in signature


def test_all_scores_and_mismatched_lengths():
    s = bleu.all_scores(['Ein Haus.', ''], ['Ein Haus.', 'Hallo'], 'de')
    assert set(s) >= {'sacrebleu', 'sacrebleu_signature', 'tokenized_bleu', 'chrf',
                      'sacrebleu_lowercase', 'tokenized_bleu_lowercase'}
    with pytest.raises(ValueError, match='2 hypotheses but 1 references'):
        bleu.all_scores(['a', 'b'], ['a'], 'de')
