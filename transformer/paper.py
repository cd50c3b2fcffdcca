"""The paper's models and its own figures (Vaswani et al. 2017, Tables 2 and 3): the base and
big models, what each Table 3 row changes, and the results reports print beside ours.

Table 3 is EN-DE newstest2013 (the development set), no checkpoint averaging, perplexity per
word-piece; its params column is rounded, in millions, for the rows that state it. Table 2 is
newstest2014 BLEU of the base and big models (the paper's tokenized, compound-split BLEU).
"""

from __future__ import annotations

# Table 3 "base" and "big" rows (section 6.2); section 3 gives the base sizes.
BASE_MODEL = dict(num_encoder_layers=6, num_decoder_layers=6, d_model=512, d_ff=2048,
                  num_heads=8, d_k=64, d_v=64, dropout_rate=0.1)
BIG_MODEL = dict(num_encoder_layers=6, num_decoder_layers=6, d_model=1024, d_ff=4096,
                 num_heads=16, d_k=64, d_v=64, dropout_rate=0.3)

# Row -> the model fields it changes from the base model (label smoothing: below).
TABLE3_CHANGES = {
    'base': {},
    # (A) number of heads with constant computation: h * d_k = d_model.
    'A1': dict(num_heads=1, d_k=512, d_v=512),
    'A2': dict(num_heads=4, d_k=128, d_v=128),
    'A3': dict(num_heads=16, d_k=32, d_v=32),
    'A4': dict(num_heads=32, d_k=16, d_v=16),
    # (B) smaller attention key size only.
    'B1': dict(d_k=16),
    'B2': dict(d_k=32),
    # (C) bigger and smaller models.
    'C1': dict(num_encoder_layers=2, num_decoder_layers=2),
    'C2': dict(num_encoder_layers=4, num_decoder_layers=4),
    'C3': dict(num_encoder_layers=8, num_decoder_layers=8),
    'C4': dict(d_model=256, d_k=32, d_v=32),
    'C5': dict(d_model=1024, d_k=128, d_v=128),
    'C6': dict(d_ff=1024),
    'C7': dict(d_ff=4096),
    # (D) dropout and label smoothing.
    'D1': dict(dropout_rate=0.0),
    'D2': dict(dropout_rate=0.2),
    'D3': {},
    'D4': {},
    # (E) learned positional embedding instead of sinusoids.
    'E': dict(positional='learned'),
    'big': BIG_MODEL,
}
TABLE3_LABEL_SMOOTHING = {'D3': 0.0, 'D4': 0.2}  # eps_ls; 0.1 in every other row

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
