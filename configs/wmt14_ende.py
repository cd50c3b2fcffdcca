r"""WMT14 English-German, the paper's base and big models (Table 3 rows base/big).

Launch:
    python -m transformer.train --config=configs/wmt14_ende.py:base --workdir=runs/ende_base
    python -m transformer.train --config=configs/wmt14_ende.py:big --workdir=runs/ende_big
Append ',runlocal' to the argument (e.g. `:base,runlocal`) for a tiny model and a few steps.
"""

from transformer import config as config_lib


def get_config(arg=None):
    name, runlocal = config_lib.parse_arg(arg, ('base', 'big'), 'base')
    c = config_lib.base_config()
    c.source_lang, c.target_lang = 'en', 'de'
    c.vocab_size = 37000  # section 5.1: shared BPE of about 37000 tokens
    c.data.source = 'tfds'
    c.data.tfds_name = 'wmt14_translate/de-en'
    config_lib.apply_preset(c, name)
    c.row = name
    return config_lib.shrink(c) if runlocal else c
