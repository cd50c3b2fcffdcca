r"""Every row of the paper's Table 3 (EN-DE, variations on the base model).

Rows, in the paper's order: base, A1-A4, B1-B2, C1-C7, D1-D4, E, big. Unlisted values are the
base model's. Table 3 reports newstest2013 (the validation split) without checkpoint averaging.

Launch:
    python -m transformer.train --config=configs/table3.py:A1 --workdir=runs/table3_A1
    python -m transformer.summary --config=configs/table3.py:C5
Append ',runlocal' to the argument for a tiny model and a few steps.
"""

from transformer import config as config_lib
from transformer import paper

ROWS = paper.ROWS  # the paper's order; paper.TABLE3_CHANGES says what each changes


def get_config(arg=None):
    name, runlocal = config_lib.parse_arg(arg, ROWS, 'base')
    c = config_lib.base_config()
    c.source_lang, c.target_lang = 'en', 'de'
    c.data.source = 'tfds'
    c.data.tfds_name = 'wmt14_translate/de-en'
    config_lib.apply_preset(c, 'big' if name == 'big' else 'base')
    c.model.update(paper.TABLE3_CHANGES[name])
    c.train.label_smoothing = paper.TABLE3_LABEL_SMOOTHING.get(name, 0.1)
    c.decode.average_last = 1  # Table 3: no checkpoint averaging
    c.row = name
    return config_lib.shrink(c) if runlocal else c
