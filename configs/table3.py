r"""Every row of the paper's Table 3 (EN-DE, variations on the base model).

Rows, in the paper's order: base, A1-A4, B1-B2, C1-C7, D1-D4, E, big. Unlisted values are the
base model's. Table 3 reports newstest2013 (the validation split) without checkpoint averaging.

Launch:
    python -m transformer.train --config=configs/table3.py:A1 --workdir=runs/table3_A1
    python -m transformer.summary --config=configs/table3.py:C5
Append ',runlocal' to the argument for a tiny model and a few steps.
"""

from transformer import config as config_lib

ROWS = {
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
    # (D) dropout and label smoothing (label smoothing lives in train, see below).
    'D1': dict(dropout_rate=0.0),
    'D2': dict(dropout_rate=0.2),
    'D3': {},
    'D4': {},
    # (E) learned positional embedding instead of sinusoids.
    'E': dict(positional='learned'),
    'big': None,  # the big preset
}
LABEL_SMOOTHING = {'D3': 0.0, 'D4': 0.2}


def get_config(arg=None):
    name, runlocal = config_lib.parse_arg(arg, tuple(ROWS), 'base')
    c = config_lib.base_config()
    c.source_lang, c.target_lang = 'en', 'de'
    c.data.source = 'tfds'
    c.data.tfds_name = 'wmt14_translate/de-en'
    config_lib.apply_model(c, 'big' if name == 'big' else 'base')
    if ROWS[name]:
        c.model.update(ROWS[name])
    if name in LABEL_SMOOTHING:
        c.train.label_smoothing = LABEL_SMOOTHING[name]
    c.decode.average_last = 1  # Table 3: no checkpoint averaging
    c.row = name
    return config_lib.shrink(c) if runlocal else c
