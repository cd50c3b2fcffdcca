r"""The paper's models on your own parallel text files (one sentence per line).

Each split is a path prefix; the files are PREFIX.<source_lang> and PREFIX.<target_lang>.

Launch:
    python -m transformer.train --config=configs/local.py:base --workdir=runs/local \
            --config.source_lang=en --config.target_lang=de \
            --config.data.train=data/train --config.data.validation=data/val \
            --config.data.test=data/test --config.vocab_size=8000
Argument: base or big, optionally followed by ',runlocal'.
"""

from transformer import config_defaults as cd


def get_config(arg=None):
    name, runlocal = cd.parse_arg(arg, ('base', 'big'), 'base')
    c = cd.base_config()
    c.data.source = 'local'
    cd.apply_model(c, name)
    return cd.shrink(c) if runlocal else c
