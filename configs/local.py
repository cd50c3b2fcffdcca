r"""The paper's models on your own parallel text files (one sentence per line).

Each split is a path prefix; the files are PREFIX.<source_lang> and PREFIX.<target_lang>.

Launch:
    python -m transformer.train --config=configs/local.py:base --workdir=runs/local \
            --config.source_lang=en --config.target_lang=de \
            --config.data.train=data/train --config.data.validation=data/val \
            --config.data.test=data/test --config.vocab_size=8000
Argument: base or big, optionally followed by ',runlocal'.
"""

from transformer import config as config_lib


def get_config(arg=None):
    name, runlocal = config_lib.parse_arg(arg, ('base', 'big'), 'base')
    c = config_lib.base_config()
    c.data.source = 'local'
    config_lib.apply_preset(c, name)
    return config_lib.shrink(c) if runlocal else c
