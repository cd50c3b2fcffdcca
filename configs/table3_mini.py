r"""A miniature Table 3: every row of the paper's Table 3, scaled to Multi30k EN-DE on a CPU.

The miniature base is 3 + 3 layers, d_model 256, d_ff 1024, h = 4 heads of d_k = d_v = 64, on
Multi30k's 29,000 training pairs with a shared BPE vocabulary of 8000, about 2048 source and
2048 target tokens a batch. Each row changes what the paper's row changes, by the same ratios
where they can be kept:

  A  heads with h x d_k = d_model: h = 1, 2, 8, 16 (the paper: 1, 4, 16, 32 around its 8);
  B  a smaller key width only: d_k = 16, 32 (the paper: 16, 32 of 64);
  C  N = 1, 2, 4 (the paper's 2, 4, 8 of 6); d_model 128 and 512 with d_k = d_v = 32 and 128
     (half and double, as the paper's 256 and 1024); d_ff 512 and 2048 (half and double);
  D  P_drop 0.0, 0.2; eps_ls 0.0, 0.2 (the paper's values);
  E  learned positional embeddings;
  big  d_model 512, d_ff 2048, h = 8, P_drop 0.3 (the paper's big doubles the same three).

Every row trains for the same wall time (train.max_minutes, 8 by default: what a 2-core CPU
affords for 20 rows), not the same steps: the paper trained all rows 100k steps (big 300k) on
8 GPUs. The learning-rate schedule is the paper's with a warm-up scaled to the short runs.
Validation is Multi30k's val split, test is test2016. Like Table 3, rows are compared on the
validation split with beam search and no checkpoint averaging.

Launch (experiments/table3.sh does every row and ends with the report):
    python -m transformer.train --config=configs/table3_mini.py:A1 --workdir=runs/mini/A1
    CONFIG=configs/table3_mini.py RUNS_DIR=runs/mini experiments/table3.sh base A1 C5
Append ',runlocal' to the argument for a tiny model and a few steps.
"""

import pathlib

import ml_collections

from transformer import config as config_lib
from transformer import paper

# Multi30k task 1, raw (train, val, test2016 .en/.de): on the project's machines beside the
# checkout; elsewhere from https://github.com/multi30k/dataset (data/task1/raw, gunzipped), with
# --config.data.multi30k_dir=DIR.
SHARED_MULTI30K = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'multi30k'

# The miniature base; each row changes what paper.TABLE3_CHANGES says, sizes scaled by the
# same ratio to this base (rounded, at least 1), and a row that sets the number of heads keeps
# h x d_k = h x d_v = d_model, as row A does.
BASE = dict(num_encoder_layers=3, num_decoder_layers=3, d_model=256, d_ff=1024, num_heads=4,
            d_k=64, d_v=64, dropout_rate=0.1)
PAPER_BASE = paper.BASE_MODEL


def scaled(changes: dict) -> dict:
    """A paper row's changes, scaled to the miniature base."""
    out = {}
    for field, value in changes.items():
        if isinstance(value, int) and field in PAPER_BASE:
            out[field] = max(1, round(BASE[field] * value / PAPER_BASE[field]))
        else:  # dropout rates, positional encodings: as the paper's row
            out[field] = value
    if 'num_heads' in changes:
        out['d_k'] = out['d_v'] = out.get('d_model', BASE['d_model']) // out['num_heads']
    return out


ROWS = {row: scaled(changes) for row, changes in paper.TABLE3_CHANGES.items()}


def get_config(arg=None):
    name, runlocal = config_lib.parse_arg(arg, tuple(ROWS), 'base')
    c = config_lib.base_config()
    c.row = name
    c.source_lang, c.target_lang = 'en', 'de'
    c.vocab_size = 8000
    # The split prefixes follow data.multi30k_dir, also when it is set on the command line.
    c.data.multi30k_dir = ml_collections.FieldReference(
        str(SHARED_MULTI30K) if SHARED_MULTI30K.is_dir() else '')
    where = c.data.get_ref('multi30k_dir')
    c.data.update(source='local', train=where + '/train', validation=where + '/val',
                  test=where + '/test2016', batch_tokens=2048, batching='pack', max_length=128)
    c.model.update(BASE)
    c.model.update(ROWS[name])
    c.train.label_smoothing = paper.TABLE3_LABEL_SMOOTHING.get(name, 0.1)
    # Bounded by time: steps is only a ceiling. The warm-up is scaled to a few hundred steps.
    c.train.update(steps=100_000, max_minutes=8.0, warmup_steps=200, learning_rate_scale=0.5,
                   log_every_steps=20, eval_every_steps=100, checkpoint_every_steps=100_000,
                   checkpoint_every_minutes=4.0, keep_checkpoints=5)
    c.decode.average_last = 1  # Table 3: no checkpoint averaging
    return config_lib.shrink(c) if runlocal else c
