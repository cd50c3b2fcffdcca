"""A deterministic synthetic translation task for the offline demo (configs/demo.py).

The source language has three word classes (nouns, adjectives, verbs) of made-up words and
the grammar `NP VERB NP NP ...` with `NP = [ADJECTIVE] NOUN`. The target language has its own
made-up words, one per source word, and two reordering rules:

  * adjectives follow their noun:   `ADJ NOUN`    ->  `NOUN' ADJ'`
  * the verb goes to the end:       `NP V NP NP`  ->  `NP' NP' NP' V'`

Every source sentence has exactly one translation (word classes are disjoint and each word has
one translation), so a small Transformer can reach a high BLEU, and a wrong reordering costs
BLEU visibly. The lexicon is the same for every seed; `config.data.seed` and the split choose
the sentences, so train, validation and test differ.
"""

from __future__ import annotations

import numpy as np

_LEXICON_SEED = 1706  # fixed: the language itself never changes
_NUM_NOUNS, _NUM_ADJECTIVES, _NUM_VERBS = 100, 50, 50
_SPLITS = ('train', 'validation', 'test')


def _make_words(rng, count, onsets, vowels, codas, taken):
    """`count` distinct words of 2-3 syllables not already in `taken`."""
    words = []
    while len(words) < count:
        syllables = rng.integers(2, 4)
        word = ''.join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables))
        word += rng.choice(codas)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def lexicon() -> dict[str, list[tuple[str, str]]]:
    """Word class -> list of (source word, target word) pairs."""
    rng = np.random.default_rng(_LEXICON_SEED)
    src_taken, tgt_taken = set(), set()
    src = dict(onsets=list('bdgklmnprstvz'), vowels=list('aeiou'), codas=['', '', 'n', 's'])
    tgt = dict(onsets=['h', 'j', 'w', 'f', 'ch', 'sh', 'th', 'qu', 'x', 'y'],
               vowels=['a', 'e', 'i', 'o', 'u', 'ae', 'oo'], codas=['', 'r', 'l', 'x'])
    out = {}
    for name, count in (('noun', _NUM_NOUNS), ('adjective', _NUM_ADJECTIVES), ('verb', _NUM_VERBS)):
        out[name] = list(zip(_make_words(rng, count, taken=src_taken, **src),
                             _make_words(rng, count, taken=tgt_taken, **tgt)))
    return out


def _sentence(rng, num_words, lex):
    """One (source, target, word alignment) triple of `num_words` words."""
    # Noun phrases fill num_words - 1 slots; a verb follows the first one.
    phrases, remaining = [], num_words - 1
    while remaining > 0:
        # Keep at least two phrases when there is room, so the verb really moves.
        two = remaining >= 2 and rng.random() < 0.5 and not (remaining == 2 and not phrases)
        noun = lex['noun'][rng.integers(len(lex['noun']))]
        adjective = lex['adjective'][rng.integers(len(lex['adjective']))] if two else None
        phrases.append((adjective, noun))
        remaining -= 2 if two else 1
    verb = lex['verb'][rng.integers(len(lex['verb']))]

    # Each word carries its phrase and role, so that the word alignment is known.
    def src_np(k, p):
        return ([(k, 'adjective', p[0][0])] if p[0] else []) + [(k, 'noun', p[1][0])]

    def tgt_np(k, p):
        return [(k, 'noun', p[1][1])] + ([(k, 'adjective', p[0][1])] if p[0] else [])

    source = src_np(0, phrases[0]) if phrases else []
    source += [(-1, 'verb', verb[0])] + [w for k, p in enumerate(phrases[1:], 1)
                                          for w in src_np(k, p)]
    target = [w for k, p in enumerate(phrases) for w in tgt_np(k, p)] + [(-1, 'verb', verb[1])]
    where = {w[:2]: i for i, w in enumerate(source)}
    alignment = [(where[w[:2]], j) for j, w in enumerate(target)]
    return ' '.join(w[2] for w in source), ' '.join(w[2] for w in target), sorted(alignment)


def _triples(config, split: str) -> list[tuple[str, str, list[tuple[int, int]]]]:
    if split not in _SPLITS:
        raise ValueError(f'unknown synthetic split {split!r}; valid: {", ".join(_SPLITS)}')
    d = config.data
    if not 1 <= d.synthetic_min_words <= d.synthetic_max_words:
        raise ValueError(f'data.synthetic_min_words={d.synthetic_min_words} and '
                         f'data.synthetic_max_words={d.synthetic_max_words} must satisfy '
                         '1 <= min <= max')
    size = d.synthetic_train_size if split == 'train' else d.synthetic_eval_size
    rng = np.random.default_rng([d.seed, _SPLITS.index(split)])
    lex = lexicon()
    lengths = rng.integers(d.synthetic_min_words, d.synthetic_max_words + 1, size=size)
    return [_sentence(rng, int(n), lex) for n in lengths]


def generate(config, split: str) -> tuple[list[str], list[str]]:
    """Source and target sentences of a split ('train', 'validation' or 'test')."""
    triples = _triples(config, split)
    return [t[0] for t in triples], [t[1] for t in triples]


def alignments(config, split: str) -> list[list[tuple[int, int]]]:
    """The true word alignment of each pair `generate(config, split)` gives: sorted (source
    word, target word) pairs, 0-based, one per word (the task translates word by word)."""
    return [t[2] for t in _triples(config, split)]
