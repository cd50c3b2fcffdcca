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
    """One (source, target) pair of `num_words` words."""
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

    def src_np(p):
        return ([p[0][0]] if p[0] else []) + [p[1][0]]

    def tgt_np(p):
        return [p[1][1]] + ([p[0][1]] if p[0] else [])

    source = src_np(phrases[0]) if phrases else []
    source += [verb[0]] + [w for p in phrases[1:] for w in src_np(p)]
    target = [w for p in phrases for w in tgt_np(p)] + [verb[1]]
    return ' '.join(source), ' '.join(target)


def generate(config, split: str) -> tuple[list[str], list[str]]:
    """Source and target sentences of a split ('train', 'validation' or 'test')."""
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
    pairs = [_sentence(rng, int(n), lex) for n in lengths]
    return [p[0] for p in pairs], [p[1] for p in pairs]
