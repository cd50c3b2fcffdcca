r"""A demo that runs offline on a laptop CPU in minutes, end to end.

The data is a synthetic translation task the project generates itself (see
`transformer/synthetic.py`): a small lexicon, word-by-word translation with a reordering rule,
so BLEU is meaningful. Everything else (BPE vocabulary, training, checkpoints, beam search,
BLEU) is the real code path.

Launch:
    python -m transformer.train --config=configs/demo.py --workdir=/tmp/demo
    python -m transformer.evaluate --workdir=/tmp/demo
Argument: none, or 'runlocal' for an even smaller smoke run.
"""

from transformer import config as config_lib


def get_config(arg=None):
    _, runlocal = config_lib.parse_arg(arg, ('demo',), 'demo')
    c = config_lib.base_config()
    c.source_lang, c.target_lang = 'src', 'tgt'
    c.vocab_size = 256
    c.data.source = 'synthetic'
    c.data.max_length = 64
    c.data.batch_tokens = 2048
    c.data.batching = 'pack'
    c.data.vocab_sample_sentences = 20_000
    c.model.update(num_encoder_layers=2, num_decoder_layers=2, d_model=64, d_ff=256,
                   num_heads=4, d_k=16, d_v=16, dropout_rate=0.1, max_position=256)
    c.train.update(steps=1500, warmup_steps=300, learning_rate_scale=1.0,
                   log_every_steps=50, eval_every_steps=500, eval_bleu_sentences=64,
                   checkpoint_every_steps=250, checkpoint_every_minutes=10.0,
                   keep_checkpoints=5)
    c.decode.average_last = 3
    c.decode.batch_sentences = 100
    return config_lib.shrink(c) if runlocal else c
