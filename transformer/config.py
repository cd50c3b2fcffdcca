"""The config schema and everything done with a config.

Config files under `configs/` build on `base_config()`, pick a model with `apply_preset()`, and
may apply `shrink()` (the `runlocal` switch) for tests and debugging. `validate()` is called by
every entry point after command-line overrides, so a bad field stops the run with one line.
`load_file()` loads a config file by path (as `--config=FILE:ARG` does); `differences()` compares
a config with the one stored in a work directory (`run_config.py` stores and loads it).
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from transformer import paper
from transformer.errors import UsageError

# Table 3 "base" and "big" rows (section 6.2; paper.py).
MODEL_PRESETS = {'base': paper.BASE_MODEL, 'big': paper.BIG_MODEL}

# Section 5.2 and 6.1: 100k steps and the last 5 checkpoints for base; 300k and 20 for big.
TRAIN_PRESETS = {
    'base': dict(steps=100_000, average_last=5),
    'big': dict(steps=300_000, average_last=20),
}

DTYPES = ('float32', 'bfloat16', 'float16')
# Validation metrics early stopping can follow: the loss (lower is better) and greedy BLEU,
# each the result of an evaluator on the validation split (its row: eval/ + this key).
EARLY_STOP_METRICS = {'loss': 'nll', 'bleu': 'greedy_bleu'}

# The in-training evaluators (config.evals.<name> = dict(type=..., ...), big_vision's way;
# evaluators.py builds and runs them) and the fields of each type, with the defaults that an
# entry written in a config file may leave out. `every`: steps between its evaluations (the
# last step is always evaluated), 0 = train.eval_every_steps. `split`: one of EVAL_SPLITS.
# `prefix`: of its rows in the metrics, a name ending in '/'; '' = 'eval/' on the validation
# split, 'SPLIT/' on another. bleu: `sentences`, the first N of the split (0 =
# train.eval_bleu_sentences; 0 there too: the entry is off); `beam_size`, 1 = greedy (row
# greedy_bleu, else beamK_bleu), with decode.length_penalty and decode.max_extra_length.
# `files`: a path prefix of other parallel text, PREFIX.<source_lang> and PREFIX.<target_lang>
# (a second validation set, whatever data.source is), read in place of the split; its rows'
# prefix is then NAME/ by default.
EVAL_TYPES = {
    'loss': dict(every=0, split='validation', prefix='', files=''),
    'bleu': dict(every=0, split='validation', prefix='', files='', sentences=0, beam_size=1),
}
EVAL_SPLITS = ('validation', 'test')


def base_config() -> ml_collections.ConfigDict:
    """The paper's base model on WMT14 EN-DE; config files change what differs."""
    c = ml_collections.ConfigDict()
    # The row of the paper's Table 2 or 3 this config reproduces ('' if none), for `report`.
    c.row = ''
    # Direction is explicit, never inferred from a dataset's key order.
    c.source_lang = 'en'
    c.target_lang = 'de'
    # Shared source-target BPE vocabulary (section 5.1: about 37000 for EN-DE).
    c.vocab_size = 37000

    # Section 3: N = 6, d_model 512, d_ff 2048, h = 8, d_k = d_v = 64 (query/key and value
    # widths per head, 3.2.2).
    c.model = m = ml_collections.ConfigDict(dict(MODEL_PRESETS['base']))
    # m.dropout_rate is P_drop, section 5.4: on sub-layer outputs and embedding sums.
    # Departures from section 5.4, off by default: dropout on attention probabilities
    # and on the feed-forward hidden layer (tensor2tensor used both).
    m.attention_dropout_rate = 0.0
    m.relu_dropout_rate = 0.0
    m.positional = 'sinusoidal'  # section 3.5; 'learned' is Table 3 row E
    m.max_position = 1024  # table size for positions (learned) and the sinusoid cache
    m.norm = 'post'  # section 3.1 post-LN; 'pre' is a modern departure (option)
    m.share_embeddings = True  # section 3.4: one matrix for both embeddings and the softmax
    # Section 3.2.2: the projections W^Q, W^K, W^V, W^O have no biases (nor in tensor2tensor).
    # True adds them, as many implementations do: the key bias then has a true gradient of
    # zero (softmax ignores a constant per query), so Adam moves it on float noise alone.
    m.attention_bias = False
    m.layer_norm_epsilon = 1e-6
    # Attention through jax.nn.dot_product_attention: 'auto' = cuDNN's fused kernel where the
    # backend (GPU), dtype (16-bit) and head width allow it, XLA's otherwise; 'xla' | 'cudnn';
    # 'explicit': this project's softmax formula (multi_head_attention.attention_weights).
    # On the CPU, explicit and XLA's are level (explicit 1.03x small, 1.01x base: within the
    # noise, benchmarks/defaults.py), so auto stays, for GPUs' fused kernel.
    m.attention_impl = 'auto'
    # Rematerialisation: 'block' recomputes each layer's activations in the backward pass
    # (about a third more compute, far less activation memory); 'none' keeps them. 'none' on
    # every platform: the compiled plans hold the paper's batch without it on every target we
    # plan for (one H100: base 12.4 GiB, big 19.1; 8 v5e chips: base 2.5; preflight.py,
    # benchmarks/results/2026-12-03-preflight.json), where 'block' would cost compute.
    m.remat = 'none'
    # The layers of a stack: True runs them in a lax.scan (one layer traced and compiled per
    # stack), False unrolls that loop over the same stacked parameters (either reads the
    # other's checkpoints). 'auto' decides by the platform of the run's devices, by compiled
    # memory per device at the paper's batch (model.PLATFORM_DEFAULTS): unrolled on TPUs and
    # GPUs (base: 2.50 GiB a chip on tpu:v5e:2x4 against 4.07 scanned, 12.4 GiB on gpu:h100
    # against 17.0; benchmarks/results/2026-12-03-preflight.json), scanned on CPUs. On the
    # CPU (benchmarks/defaults.py, 2-core, tcmalloc, 9 paired runs,
    # results/2026-12-01-cpu-defaults-scan_layers-quiet.json) unrolled steps are 1.07x faster
    # on base and 1.11x on a 2-layer model, but at the paper's batch on one device the
    # unrolled base step peaks at 38.7 GiB against 31.1 (results/2026-12-01-cpu-memory_plan*
    # .json; remat saved nothing unrolled then, as XLA merged the recomputation away: fixed
    # 2026-12-02, base on gpu:h100 unrolled 12.4 -> 8.0 GiB with remat); scanned also
    # compiles faster. XLA's cost
    # analysis counts a loop's body once (unroll to count FLOPs). Decoding steps always run
    # the layers one by one (model.py's decode_step).
    m.scan_layers = 'auto'
    # Compute dtype. 'auto': bfloat16 on GPU/TPU, float32 on CPU (the platform of the run's
    # devices, model.PLATFORM_DEFAULTS); parameters and optimizer state stay in param_dtype
    # (float32) either way, and gradients are summed over devices in float32.
    m.dtype = 'auto'
    m.param_dtype = 'float32'

    c.data = d = ml_collections.ConfigDict()
    d.source = 'tfds'  # 'tfds' | 'local' | 'synthetic'
    d.tfds_name = 'wmt14_translate/de-en'
    d.tfds_data_dir = ''  # '' = TFDS default (~/tensorflow_datasets)
    d.manual_dir = ''  # archives downloaded by hand, honoured by download_and_prepare
    # Local parallel text: path prefixes; files are PREFIX.<source_lang>, PREFIX.<target_lang>.
    d.train = ''
    d.validation = ''
    d.test = ''
    d.vocab_sample_sentences = 2_000_000  # sentences per side used to train the BPE model
    # Not the paper's (it scores cased text, section 6.1): True makes the vocabulary lowercase
    # all it encodes, both sides, as Multi30k's published systems are trained (the dataset's
    # scripts run Moses' lowercase.perl; in Marian or fairseq, a preprocessing step). The
    # output is lowercase: score it lowercased.
    d.lowercase = False
    d.max_length = 256  # training pairs longer than this (tokens incl. EOS) are dropped
    # Section 5.1: about 25000 source and 25000 target tokens per batch.
    d.batch_tokens = 25_000
    d.batching = 'bucket'  # 'bucket' (length buckets) | 'pack' (several pairs per row)
    # Bucket boundaries: multiples of bucket_step, each >= bucket_growth x the previous one
    # (4 and 1.15 give 21 shapes up to 256, and real-token fractions of 0.84 on Multi30k and
    # 0.79 on the WMT sample: benchmarks/input_pipeline.py; 'pack' reaches 0.96-0.97).
    d.bucket_step = 4
    d.bucket_growth = 1.15
    d.seed = 0
    d.eval_batch_sentences = 64
    # Synthetic demo task (data.source == 'synthetic').
    d.synthetic_train_size = 20_000
    d.synthetic_eval_size = 200
    d.synthetic_min_words = 3
    d.synthetic_max_words = 12

    c.train = t = ml_collections.ConfigDict()
    t.steps = TRAIN_PRESETS['base']['steps']
    t.warmup_steps = 4000  # section 5.3
    t.learning_rate_scale = 1.0  # multiplies d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    t.adam_b1 = 0.9
    t.adam_b2 = 0.98
    t.adam_eps = 1e-9
    t.label_smoothing = 0.1  # section 5.4
    t.grad_accum_steps = 1
    t.seed = 0
    # The random bits of dropout, chosen by measured step time (benchmarks/defaults.py,
    # 2026-12-01, 2-core CPU, tcmalloc, paired medians): 'threefry2x32', JAX's default, is
    # 1.056x (small model) and 1.054x (base) faster than 'rbg' (XLA's RngBitGenerator), although
    # rbg moves fewer bytes (4.3 against 5.2 GB a small step, benchmarks/step_cost.py). Not
    # measured on a GPU yet (rbg is the usual choice on accelerators): run benchmarks/defaults.py
    # there. Either is reproducible, run to run and across a resume.
    t.dropout_rng_impl = 'threefry2x32'
    # An exponential moving average of the parameters, kept in the training state (float32,
    # sharded like them), updated every step, saved in every checkpoint: validation,
    # evaluate, translate, score and export then use it (--raw_weights: the parameters
    # themselves). 0 = off, as in the paper, which averages checkpoints instead (section 6.1).
    # Its anchors: fairseq --store-ema --ema-decay (0.9999), Marian --exponential-smoothing
    # (1e-4 there, i.e. decay 0.9999, as WMT systems trained with Marian use it), OpenNMT-py
    # --average_decay (e.g. 1e-4). The decay of step k is min(ema_decay, (1 + k) / (10 + k))
    # (train_step.ema_decay_at), so short runs are not held back by the initial weights.
    t.ema_decay = 0.0
    # Early stopping: stop (save, say why, exit 0) after this many evaluations in a row
    # without improvement of early_stop_metric on the validation split (of the EMA weights
    # when train.ema_decay > 0); 0 = off (only train.steps and train.max_minutes stop a run).
    # 'loss': the validation cross-entropy, lower is better (fairseq's default
    # best_checkpoint_metric, Marian's first validation metric); 'bleu': the greedy BLEU of
    # train.eval_bleu_sentences validation sentences, higher is better (single-process runs).
    # The best checkpoint is kept beyond train.keep_checkpoints and is `--step=best` for
    # evaluate, translate, score and export (fairseq --patience and checkpoint_best.pt, Marian
    # --early-stopping, Hugging Face EarlyStoppingCallback with load_best_model_at_end).
    t.early_stop_patience = 0
    t.early_stop_metric = 'loss'
    # Dynamic loss scaling, on only when model.dtype is float16 (bfloat16 has float32's range
    # and needs none): the loss is multiplied by the scale, which starts at loss_scale_init,
    # halves on a step whose gradient overflows (that step is skipped: counted in the
    # metrics as train/skipped_steps) and doubles after loss_scale_period finite steps in a
    # row. The scaled loss is the sum over the batch's target tokens (divided by their count
    # after the backward pass), as fairseq's is, hence fairseq --fp16's initial 2**7;
    # the period is PyTorch GradScaler's and jmp's 2000 (fairseq: 2**14 / devices).
    t.loss_scale_init = 2.0 ** 7
    t.loss_scale_period = 2000

    t.mesh_data = -1  # devices on the 'data' axis; -1 = all that the fsdp axis leaves
    t.mesh_fsdp = 1  # devices on the 'fsdp' axis (parameters and optimizer state sharded)
    t.log_every_steps = 100
    t.eval_every_steps = 1000  # of every evaluator (config.evals) whose `every` is 0
    t.eval_bleu_sentences = 0  # >0: greedy BLEU on that many validation sentences per eval
    t.checkpoint_every_steps = 1000
    t.checkpoint_every_minutes = 10.0  # section 6.1: checkpoints written at 10-minute intervals
    t.keep_checkpoints = 5
    # Stop (save and exit 0) after this many minutes of training, counted across restarts;
    # 0 = no time bound, only train.steps.
    t.max_minutes = 0.0
    # Processes agree on host-side decisions (a stop signal, a time-based save or stop) every
    # this many steps, not every step: each agreement is a collective that stalls the device
    # queue. Also how often the loop checks that an asynchronous save has not failed.
    t.sync_every_steps = 10
    # A multi-process run gives up on a process that has not started, or has stopped
    # answering, after this many seconds (one line, exit status 1): the timeouts of JAX's
    # distributed start-up and heartbeat. Raise it where processes start far apart.
    t.peer_timeout_seconds = 60
    # 'START:STOP' traces steps START+1..STOP with jax.profiler into the work directory's
    # profile/ (TensorBoard's profile plugin, Perfetto); '' traces nothing.
    t.profile_steps = ''

    c.decode = dc = ml_collections.ConfigDict()
    # Section 6.1: beam 4, length penalty 0.6, max length = input length + 50.
    dc.beam_size = 4
    dc.length_penalty = 0.6
    dc.max_extra_length = 50
    dc.average_last = TRAIN_PRESETS['base']['average_last']
    dc.batch_sentences = 64

    # What the loop evaluates (EVAL_TYPES): the validation loss, and the greedy BLEU of
    # train.eval_bleu_sentences validation sentences (when > 0; single-process runs), every
    # train.eval_every_steps steps. A config file adds entries (e.g. c.evals.beam = dict(
    # type='bleu', beam_size=4, sentences=500, every=5000), or a loss on the test split); the
    # command line changes the fields of existing ones (--config.evals.bleu.beam_size=4).
    c.evals = ml_collections.ConfigDict({name: dict(type=name, **fields)
                                         for name, fields in EVAL_TYPES.items()})
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """Sets everything a named preset ('base' or 'big') decides: the model's sizes and
    dropout, and the run length, checkpoints averaged and kept (sections 5.2, 6.1)."""
    if preset not in MODEL_PRESETS:
        raise UsageError(f'unknown model {preset!r}; valid: {", ".join(MODEL_PRESETS)}')
    c.model.update(MODEL_PRESETS[preset])
    c.train.steps = TRAIN_PRESETS[preset]['steps']
    c.decode.average_last = TRAIN_PRESETS[preset]['average_last']
    c.train.keep_checkpoints = max(c.train.keep_checkpoints, c.decode.average_last)
    return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `runlocal` switch: a tiny model and a few steps, same code paths."""
    c.model.update(num_encoder_layers=2, num_decoder_layers=2, d_model=32, d_ff=64,
                   num_heads=4, d_k=8, d_v=8, max_position=256)
    c.vocab_size = min(c.vocab_size, 500)
    c.data.vocab_sample_sentences = min(c.data.vocab_sample_sentences, 2000)
    c.data.max_length = min(c.data.max_length, 64)
    c.data.batch_tokens = 1024
    c.data.eval_batch_sentences = 16
    c.data.synthetic_train_size = min(c.data.synthetic_train_size, 2000)
    c.data.synthetic_eval_size = min(c.data.synthetic_eval_size, 32)
    c.train.update(steps=20, warmup_steps=10, log_every_steps=5, eval_every_steps=10,
                   checkpoint_every_steps=10)
    c.decode.batch_sentences = 16
    return c


def parse_arg(arg: str | None, valid: tuple[str, ...], default: str) -> tuple[str, bool]:
    """Splits a config argument 'NAME[,runlocal]' into (NAME, runlocal)."""
    parts = [p for p in (arg or default).split(',') if p]
    runlocal = 'runlocal' in parts
    names = [p for p in parts if p != 'runlocal'] or [default]
    if len(names) != 1 or names[0] not in valid:
        raise UsageError(
            f'unknown config argument {arg!r}; valid: {", ".join(valid)} '
            '(optionally followed by ",runlocal")')
    return names[0], runlocal


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises UsageError with one line naming the field when the config cannot work."""
    m, d, t = c.model, c.data, c.train

    def need(cond, msg):
        if not cond:
            raise UsageError(msg)

    need(c.source_lang != c.target_lang,
         f'source_lang and target_lang are both {c.source_lang!r}')
    need(c.vocab_size >= 8, f'vocab_size={c.vocab_size} must be at least 8')
    for name in ('num_encoder_layers', 'num_decoder_layers', 'd_model', 'd_ff', 'num_heads',
                 'd_k', 'd_v', 'max_position'):
        need(isinstance(m[name], int) and m[name] > 0,
             f'model.{name}={m[name]!r} must be a positive integer')
    need(m.d_model % m.num_heads == 0,
         f'model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; '
         f'valid num_heads: {[h for h in range(1, m.d_model + 1) if m.d_model % h == 0]}')
    if m.positional == 'sinusoidal':
        need(m.d_model % 2 == 0, f'model.d_model={m.d_model} must be even for sinusoids')
    need(m.positional in ('sinusoidal', 'learned'),
         f'model.positional={m.positional!r}; valid: sinusoidal, learned')
    need(m.norm in ('post', 'pre'), f'model.norm={m.norm!r}; valid: post, pre')
    need(m.attention_impl in ('auto', 'xla', 'cudnn', 'explicit'),
         f'model.attention_impl={m.attention_impl!r}; valid: auto, xla, cudnn, explicit')
    need(m.remat in ('none', 'block'), f'model.remat={m.remat!r}; valid: none, block')
    need(str(m.scan_layers).lower() in ('auto', 'true', 'false'),
         f'model.scan_layers={m.scan_layers!r}; valid: auto, True, False')
    need(m.dtype in DTYPES + ('auto',),
         f'model.dtype={m.dtype!r}; valid: auto, {", ".join(DTYPES)}')
    need(m.param_dtype in DTYPES,
         f'model.param_dtype={m.param_dtype!r}; valid: {", ".join(DTYPES)}')
    for name in ('dropout_rate', 'attention_dropout_rate', 'relu_dropout_rate'):
        need(0.0 <= m[name] < 1.0, f'model.{name}={m[name]} must be in [0, 1)')
    need(d.source in ('tfds', 'local', 'synthetic'),
         f'data.source={d.source!r}; valid: tfds, local, synthetic')
    if 'multi30k_dir' in d:  # configs/table3_mini.py
        need(d.multi30k_dir and os.path.isdir(d.multi30k_dir),
             f'data.multi30k_dir={d.multi30k_dir!r} is not a directory: get Multi30k task 1 '
             '(train, val, test2016 .en/.de) from https://github.com/multi30k/dataset '
             '(data/task1/raw) and set --config.data.multi30k_dir=DIR')
    need(d.batching in ('bucket', 'pack'), f'data.batching={d.batching!r}; valid: bucket, pack')
    need(d.max_length <= m.max_position,
         f'data.max_length={d.max_length} exceeds model.max_position={m.max_position}')
    need(d.batch_tokens >= d.max_length,
         f'data.batch_tokens={d.batch_tokens} is smaller than data.max_length={d.max_length}')
    need(d.bucket_step >= 1 and d.bucket_growth >= 1,
         f'data.bucket_step={d.bucket_step} must be >= 1 and data.bucket_growth='
         f'{d.bucket_growth} >= 1')
    # Values that would otherwise fail only after the vocabulary and the data are built.
    for name in ('vocab_sample_sentences', 'eval_batch_sentences', 'synthetic_train_size',
                 'synthetic_eval_size'):
        need(d[name] >= 1, f'data.{name}={d[name]} must be >= 1')
    need(d.seed >= 0, f'data.seed={d.seed} must be >= 0')
    need(0.0 <= t.label_smoothing < 1.0,
         f'train.label_smoothing={t.label_smoothing} must be in [0, 1)')
    need(t.steps > 0, f'train.steps={t.steps} must be positive')
    need(t.max_minutes >= 0, f'train.max_minutes={t.max_minutes} must be >= 0 (0: no bound)')
    for name in ('sync_every_steps', 'log_every_steps', 'eval_every_steps',
                 'checkpoint_every_steps', 'peer_timeout_seconds'):
        need(isinstance(t[name], int) and t[name] >= 1, f'train.{name}={t[name]!r} must be an '
             'integer >= 1')
    need(t.checkpoint_every_minutes > 0,
         f'train.checkpoint_every_minutes={t.checkpoint_every_minutes} must be > 0')
    profile_steps(t.profile_steps)
    need(t.warmup_steps > 0, f'train.warmup_steps={t.warmup_steps} must be positive')
    # A non-finite or non-positive scale trains nothing, or diverges, from the first step.
    need(math.isfinite(t.learning_rate_scale) and t.learning_rate_scale > 0,
         f'train.learning_rate_scale={t.learning_rate_scale} must be a finite number > 0')
    for name in ('adam_b1', 'adam_b2'):
        need(0.0 <= t[name] < 1.0, f'train.{name}={t[name]} must be in [0, 1)')
    need(math.isfinite(t.adam_eps) and t.adam_eps > 0,
         f'train.adam_eps={t.adam_eps} must be a finite number > 0')
    need(t.grad_accum_steps >= 1, f'train.grad_accum_steps={t.grad_accum_steps} must be >= 1')
    need(t.eval_bleu_sentences >= 0,
         f'train.eval_bleu_sentences={t.eval_bleu_sentences} must be >= 0 (0: none)')
    need(t.dropout_rng_impl in ('rbg', 'threefry2x32'),
         f'train.dropout_rng_impl={t.dropout_rng_impl!r}; valid: rbg, threefry2x32')
    need(0.0 <= t.ema_decay < 1.0, f'train.ema_decay={t.ema_decay} must be in [0, 1) '
         '(0: off; e.g. 0.9999)')
    need(isinstance(t.early_stop_patience, int) and t.early_stop_patience >= 0,
         f'train.early_stop_patience={t.early_stop_patience!r} must be an integer >= 0 (0: off)')
    need(t.early_stop_metric in EARLY_STOP_METRICS,
         f'train.early_stop_metric={t.early_stop_metric!r}; valid: '
         f'{", ".join(EARLY_STOP_METRICS)}')
    writers = {}  # row -> the entry of config.evals that writes it
    for name, entry in evals(c).items():
        for key in eval_keys(entry):
            row = entry['prefix'] + key
            need(row not in writers, f'evals.{writers.get(row)} and evals.{name} both write '
                 f'the row {row}: give evals.{name} another prefix (e.g. {name}/)')
            writers[row] = name
    row = 'eval/' + EARLY_STOP_METRICS[t.early_stop_metric]  # the validation metric followed
    if t.early_stop_patience and row not in writers:
        need(t.early_stop_metric != 'bleu' or t.eval_bleu_sentences > 0,
             'train.early_stop_metric=bleu needs train.eval_bleu_sentences > 0 (the greedy BLEU '
             'it compares), or use early_stop_metric=loss')
        need(False, f'train.early_stop_metric={t.early_stop_metric} follows the row {row}, '
             'which no entry of config.evals writes')
    need(math.isfinite(t.loss_scale_init) and t.loss_scale_init >= 1,
         f'train.loss_scale_init={t.loss_scale_init} must be a finite number >= 1')
    need(isinstance(t.loss_scale_period, int) and t.loss_scale_period >= 1,
         f'train.loss_scale_period={t.loss_scale_period!r} must be an integer >= 1')
    need(c.decode.average_last >= 1, f'decode.average_last={c.decode.average_last} must be >= 1')
    need(t.keep_checkpoints >= c.decode.average_last,
         f'train.keep_checkpoints={t.keep_checkpoints} is fewer than '
         f'decode.average_last={c.decode.average_last}')
    need(c.decode.beam_size >= 1, f'decode.beam_size={c.decode.beam_size} must be >= 1')
    need(c.decode.batch_sentences >= 1,
         f'decode.batch_sentences={c.decode.batch_sentences} must be >= 1')


def evals(c: ml_collections.ConfigDict) -> dict[str, dict]:
    """config.evals as the loop runs them, in the order of their names: each entry over its
    type's defaults (EVAL_TYPES), with the `every`, `prefix` and `sentences` that follow
    other fields made explicit; a BLEU entry of no sentences (off) is left out. UsageError
    naming the field for an entry that cannot work."""
    out = {}
    for name in sorted(c.get('evals') or {}):
        entry = _eval_entry(name, c.evals[name])
        entry['every'] = entry['every'] or c.train.eval_every_steps
        split = entry['split']
        entry['prefix'] = entry['prefix'] or (
            f'{name}/' if entry['files'] else 'eval/' if split == 'validation' else f'{split}/')
        if entry['type'] == 'bleu':
            entry['sentences'] = entry['sentences'] or c.train.eval_bleu_sentences
            if entry['sentences'] == 0:
                continue
        out[name] = entry
    return out


def _eval_entry(name: str, given) -> dict:
    """Entry `name` of config.evals over its type's defaults, its fields checked."""
    if not isinstance(given, (dict, ml_collections.ConfigDict)):
        raise UsageError(f'evals.{name}={given!r} must be a dict(type=..., ...); types: '
                         f'{", ".join(EVAL_TYPES)}')
    kind = given.get('type')
    if kind not in EVAL_TYPES:
        raise UsageError(f'evals.{name}.type={kind!r}; valid: {", ".join(EVAL_TYPES)}')
    entry = {'type': kind, **EVAL_TYPES[kind], **dict(given)}
    unknown = sorted(set(entry) - set(EVAL_TYPES[kind]) - {'type'})
    if unknown:
        raise UsageError(f'evals.{name}.{unknown[0]}: a {kind} evaluator has no such field; '
                         f'valid: type, {", ".join(EVAL_TYPES[kind])}')
    for field, minimum, zero in (('every', 0, 'train.eval_every_steps'),
                                 ('sentences', 0, 'train.eval_bleu_sentences'),
                                 ('beam_size', 1, '')):
        value = entry.get(field, minimum)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise UsageError(f'evals.{name}.{field}={value!r} must be an integer >= {minimum}'
                             + (f' (0: {zero})' if zero else ''))
    if entry['split'] not in EVAL_SPLITS:
        raise UsageError(f'evals.{name}.split={entry["split"]!r}; valid: '
                         f'{", ".join(EVAL_SPLITS)}')
    if not isinstance(entry['files'], str):
        raise UsageError(f'evals.{name}.files={entry["files"]!r} must be a path prefix '
                         '(PREFIX.<source_lang> and PREFIX.<target_lang>), or \'\' (the split)')
    prefix = entry['prefix']
    if not (isinstance(prefix, str) and (prefix == '' or (
            prefix.endswith('/') and prefix.count('/') == 1 and len(prefix) > 1))):
        raise UsageError(f'evals.{name}.prefix={prefix!r} must be a name ending in / '
                         "(e.g. 'test/'), or '' (eval/ on the validation split, SPLIT/ on "
                         'another)')
    return entry


def eval_keys(entry: dict) -> tuple[str, ...]:
    """The keys of an evaluator's results (an entry of `evals`); its rows are prefix + key."""
    if entry['type'] == 'loss':
        return ('nll', 'perplexity', 'target_tokens')
    beam = entry['beam_size']
    return ('greedy_bleu' if beam == 1 else f'beam{beam}_bleu',)


def profile_steps(spec: str) -> tuple[int, int] | None:
    """train.profile_steps 'START:STOP' -> (START, STOP), 0 <= START < STOP; '' -> None."""
    if not spec:
        return None
    try:
        start, stop = (int(x) for x in str(spec).split(':'))
    except ValueError:
        start = stop = -1
    if not 0 <= start < stop:
        raise UsageError(f'train.profile_steps={spec!r}: want START:STOP with 0 <= START < STOP '
                         "(e.g. '10:15' traces steps 11 to 15), or '' for none")
    return start, stop


# -- loading, storing and comparing ------------------------------------------------------------

# Fields that may change between a run and its resumption: the run length, how often it logs,
# evaluates and checkpoints. Anything else would silently train a different model.
RESUMABLE_CHANGES = ('train.steps', 'train.max_minutes', 'train.log_every_steps',
                     'train.eval_every_steps', 'train.checkpoint_every_steps',
                     'train.checkpoint_every_minutes', 'train.eval_bleu_sentences',
                     'train.sync_every_steps', 'train.profile_steps',
                     'train.peer_timeout_seconds',
                     # When to stop, not what is trained (a new metric starts its best anew).
                     'train.early_stop_patience', 'train.early_stop_metric',
                     # How the same model is computed: the same parameters, the same function.
                     'model.scan_layers', 'model.remat', 'model.attention_impl',
                     # What is evaluated, and how often (every field under config.evals).
                     'evals')


# Fields added after runs were stored, with the value that reproduces those runs (what the
# code did before the field existed); other missing fields take base_config()'s default.
STORED_BEFORE_THE_FIELD = {'model.attention_bias': True}


def from_stored(stored: dict) -> ml_collections.ConfigDict:
    """A config stored by an earlier version as the current schema: every field of
    base_config(), the stored values over them (see STORED_BEFORE_THE_FIELD)."""
    config = base_config()
    flat = _flatten(stored)
    for name, value in STORED_BEFORE_THE_FIELD.items():
        flat.setdefault(name, value)
    for name, value in flat.items():
        *groups, field = name.split('.')
        node = config
        for group in groups:
            if group not in node:
                node[group] = ml_collections.ConfigDict()
            node = node[group]
        if field in node and isinstance(node[field], tuple) and isinstance(value, list):
            value = tuple(value)
        with node.ignore_type():
            node[field] = value
    return config


def load_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(ARG)` of the config file in `spec` = 'FILE[:ARG]', loaded by path."""
    path, _, arg = spec.partition(':')
    if not os.path.isfile(path):
        raise UsageError(f'config file {path!r} does not exist')
    module_spec = importlib.util.spec_from_file_location('_transformer_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
                ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields whose values differ between two configs, but those in
    `ignore` (a name there also stands for every field under it)."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb)
                  if fa.get(k) != fb.get(k)
                  and not any(k == i or k.startswith(i + '.') for i in ignore))


def _flatten(d, prefix=''):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
    return out
