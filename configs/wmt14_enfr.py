r"""WMT14 English-French, the paper's base and big models.

Launch:
    python -m transformer.train --config=configs/wmt14_enfr.py:base --workdir=runs/enfr_base
    python -m transformer.train --config=configs/wmt14_enfr.py:big --workdir=runs/enfr_big
Append ',runlocal' to the argument for a tiny model and a few steps.
"""

from transformer import config as config_lib


def get_config(arg=None):
    name, runlocal = config_lib.parse_arg(arg, ('base', 'big'), 'base')
    c = config_lib.base_config()
    c.source_lang, c.target_lang = 'en', 'fr'
    c.vocab_size = 32000  # section 5.1: 32000 word-piece vocabulary
    c.data.source = 'tfds'
    c.data.tfds_name = 'wmt14_translate/fr-en'
    config_lib.apply_preset(c, name)
    c.row = name
    if name == 'big':
        c.model.dropout_rate = 0.1  # section 6.1: big EN-FR used P_drop = 0.1, not 0.3
    return config_lib.shrink(c) if runlocal else c
