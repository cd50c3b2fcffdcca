"""The paper's own figures, for reports beside ours (Vaswani et al. 2017, Tables 2 and 3).

Table 3 is EN-DE newstest2013 (the development set), no checkpoint averaging, perplexity per
word-piece; its params column is rounded, in millions, for the rows that state it. Table 2 is
newstest2014 BLEU of the base and big models (the paper's tokenized, compound-split BLEU).
"""

from __future__ import annotations

# Row -> (perplexity, BLEU, parameters in millions or None).
TABLE3 = {
    'base': (4.92, 25.8, 65),
    'A1': (5.29, 24.9, None), 'A2': (5.00, 25.5, None), 'A3': (4.91, 25.8, None),
    'A4': (5.01, 25.4, None),
    'B1': (5.16, 25.1, 58), 'B2': (5.01, 25.4, 60),
    'C1': (6.11, 23.7, 36), 'C2': (5.19, 25.3, 50), 'C3': (4.88, 25.5, 80),
    'C4': (5.75, 24.5, 28), 'C5': (4.66, 26.0, 168), 'C6': (5.12, 25.4, 53),
    'C7': (4.75, 26.2, 90),
    'D1': (5.77, 24.6, None), 'D2': (4.95, 25.5, None), 'D3': (4.67, 25.3, None),
    'D4': (5.47, 25.7, None),
    'E': (4.92, 25.7, None),
    'big': (4.33, 26.4, 213),
}
ROWS = tuple(TABLE3)  # the paper's order

# (source, target) -> model -> newstest2014 BLEU.
TABLE2 = {('en', 'de'): {'base': 27.3, 'big': 28.4}, ('en', 'fr'): {'base': 38.1, 'big': 41.8}}
