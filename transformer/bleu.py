"""BLEU and chrF, comparable with the paper and with the field.

* `sacrebleu_score`: detokenized, cased sacreBLEU (13a tokenizer), with its signature string:
  the number to compare across papers (Post, 2018).
* `tokenized_bleu`: the paper's number. The tensor2tensor script the authors used
  (get_ende_bleu.sh) Moses-tokenizes output and reference (`tokenizer.perl -l de`, which
  escapes & < > " ' and keeps intra-word hyphens), splits hyphenated compounds with
  `s/(\\S)-(\\S)/$1 ##AT##-##AT## $2/g`, and scores with multi-bleu.perl: corpus BLEU over
  whitespace tokens, cased, no smoothing, brevity penalty against the reference length.
  It reads typically 0.7-1.0 above detokenized sacreBLEU on the same output.
* `lowercased_sacrebleu`: sacreBLEU with lowercase=True, how Multi30k results are often given.
* `lowercased_tokenized_bleu`: the other way Multi30k papers report: lowercased, Moses-tokenized
  text scored by multi-bleu.perl, without the compound split.
* `chrf`: sacreBLEU's chrF2.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from collections.abc import Sequence

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

MAX_ORDER = 4
# perl's s/(\S)-(\S)/$1 ##AT##-##AT## $2/g; non-overlapping like perl, so "a-b-c" keeps its
# second hyphen, exactly as the original script does.
_COMPOUND = re.compile(r'(\S)-(\S)')


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references')


def sacrebleu_score(hypotheses: Sequence[str], references: Sequence[str],
                    lowercase: bool = False) -> tuple[float, str]:
    """Corpus sacreBLEU (13a, cased unless `lowercase`) and its signature."""
    _check(hypotheses, references)
    metric = BLEU(lowercase=lowercase)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, metric.get_signature().format()


def lowercased_sacrebleu(hypotheses, references) -> tuple[float, str]:
    return sacrebleu_score(hypotheses, references, lowercase=True)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus chrF2 (character 6-grams, beta 2) and its signature."""
    _check(hypotheses, references)
    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, metric.get_signature().format()


@functools.lru_cache(maxsize=8)
def _moses(lang: str):
    from sacremoses import MosesTokenizer  # only needed for the paper's tokenized BLEU
    return MosesTokenizer(lang=lang)


def moses_tokenize(text: str, lang: str) -> str:
    """tokenizer.perl -l LANG with its defaults (escaping on, no aggressive hyphen split)."""
    return _moses(lang).tokenize(text, return_str=True, escape=True)


def split_compounds(text: str) -> str:
    """Hyphenated compounds as get_ende_bleu.sh splits them: a-b -> a ##AT##-##AT## b."""
    return _COMPOUND.sub(r'\1 ##AT##-##AT## \2', text)


def _ngrams(tokens: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu_tokenized(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """multi-bleu.perl: corpus BLEU of already tokenized text (split on whitespace), cased.

    Returns {'bleu', 'precisions' (per order, in %), 'brevity_penalty', 'ratio',
    'hyp_len', 'ref_len'}. BLEU is 0 when some order has no match (no smoothing).
    """
    _check(hypotheses, references)
    matches = [0] * MAX_ORDER
    totals = [0] * MAX_ORDER
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, MAX_ORDER + 1):
            hyp_counts, ref_counts = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    precisions = [100.0 * m / t if t else 0.0 for m, t in zip(matches, totals)]
    if hyp_len == 0:
        brevity = 0.0
    else:
        brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    if min(matches) == 0:
        bleu = 0.0
    else:
        log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / MAX_ORDER
        bleu = 100.0 * brevity * math.exp(log_precision)
    return {'bleu': bleu, 'precisions': precisions, 'brevity_penalty': brevity,
            'ratio': hyp_len / ref_len if ref_len else 0.0, 'hyp_len': hyp_len,
            'ref_len': ref_len}


def tokenize_for_paper_bleu(text: str, lang: str) -> str:
    return split_compounds(moses_tokenize(text, lang))


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> float:
    """The paper's BLEU: Moses-tokenized, compounds split, multi-bleu (see the module doc)."""
    _check(hypotheses, references)
    hyp = [tokenize_for_paper_bleu(h, lang) for h in hypotheses]
    ref = [tokenize_for_paper_bleu(r, lang) for r in references]
    return corpus_bleu_tokenized(hyp, ref)['bleu']


def lowercased_tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str],
                              lang: str) -> float:
    """Multi30k's usual figure: lowercased, Moses-tokenized, multi-bleu, no compound split."""
    _check(hypotheses, references)
    hyp = [moses_tokenize(h.lower(), lang) for h in hypotheses]
    ref = [moses_tokenize(r.lower(), lang) for r in references]
    return corpus_bleu_tokenized(hyp, ref)['bleu']


def all_scores(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> dict:
    """Every score evaluate reports, with signatures."""
    cased, signature = sacrebleu_score(hypotheses, references)
    lower, lower_signature = lowercased_sacrebleu(hypotheses, references)
    chrf_score, chrf_signature = chrf(hypotheses, references)
    return {
        'sacrebleu': cased,
        'sacrebleu_signature': signature,
        'tokenized_bleu': tokenized_bleu(hypotheses, references, lang),
        'tokenized_bleu_method': f'sacremoses tokenizer -l {lang} (escaped), compound split '
                                 '##AT##-##AT##, multi-bleu (cased, unsmoothed)',
        'sacrebleu_lowercase': lower,
        'sacrebleu_lowercase_signature': lower_signature,
        'tokenized_bleu_lowercase': lowercased_tokenized_bleu(hypotheses, references, lang),
        'tokenized_bleu_lowercase_method': f'lowercased, sacremoses tokenizer -l {lang} '
                                           '(escaped), multi-bleu (unsmoothed)',
        'chrf': chrf_score,
        'chrf_signature': chrf_signature,
        'sacrebleu_version': sacrebleu.__version__,
    }
