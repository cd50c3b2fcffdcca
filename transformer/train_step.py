"""The loss, the training step and the evaluation step: pure functions for `jax.jit`.

The training state is a plain dict of arrays (so Orbax saves it as is):
  params     the model's parameters (`nnx.to_pure_dict` of its state)
  opt_state  Adam's state
  step       the number of updates applied (int32)
  rng        the base dropout key's data (train.dropout_rng_impl); step k uses
             fold_in(rng, k), so a resumed run draws the same dropout masks as an
             uninterrupted one
  ema        (train.ema_decay > 0 only) the exponential moving average of the parameters,
             float32, laid out like them; what validation and the decoding programs use
  loss_scale (model.dtype float16 only) the dynamic loss scale: {'scale' float32,
             'good_steps' finite steps since it last changed, 'skipped' steps skipped in
             all}; saved and restored with the rest, so a resumed run scales as before
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer import schedule, sharding
from transformer.model import (
    abstract_model,
    create_model,
    resolve_dtype,
    resolved,
    segments_and_positions,
)

Batch = dict[str, jax.Array]

# Dynamic loss scaling (float16 only), the scheme of fairseq's DynamicLossScaler, PyTorch's
# GradScaler and jmp: the loss is multiplied by the scale before the backward pass, so that
# small gradients do not underflow in float16 (smallest subnormal 6e-8), and the gradients
# divided by it after; a non-finite gradient skips the update and halves the scale, and
# LOSS_SCALE_FACTOR-fold growth follows train.loss_scale_period finite steps in a row.
LOSS_SCALE_FACTOR = 2.0
LOSS_SCALE_MIN = 1.0  # a scale halved below this means the loss itself overflows: stop


def ema_decay_at(decay: float, step):
    """The decay applied after update `step` (1-based): min(decay, (1 + step) / (10 + step)),
    the warm-up of TensorFlow's ExponentialMovingAverage with num_updates and OpenNMT-py's
    average_decay, so that the average is not dominated by the random initial weights in a
    run shorter than 1 / (1 - decay) steps."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def initial_loss_scale(init: float) -> dict:
    return {'scale': jnp.asarray(init, jnp.float32), 'good_steps': jnp.zeros((), jnp.int32),
            'skipped': jnp.zeros((), jnp.int32)}


def next_loss_scale(loss_scale: dict, finite, period: int) -> dict:
    """The scale after a step: halved (and the step counted as skipped) when its gradient was
    not finite, doubled after `period` finite steps in a row, unchanged otherwise."""
    scale, good = loss_scale['scale'], loss_scale['good_steps'] + 1
    grow = good >= period
    return {'scale': jnp.where(finite, jnp.where(grow, scale * LOSS_SCALE_FACTOR, scale),
                               scale / LOSS_SCALE_FACTOR),
            'good_steps': jnp.where(finite & ~grow, good, 0).astype(jnp.int32),
            'skipped': loss_scale['skipped'] + jnp.where(finite, 0, 1).astype(jnp.int32)}


def cross_entropy(logits, targets, weights, label_smoothing: float):
    """Sums over real target tokens of the label-smoothed and the plain cross-entropy.

    Label smoothing (section 5.4) puts 1 - eps on the reference and spreads eps evenly over
    the other V - 1 tokens, as tensor2tensor did. Returns (smoothed_sum, nll_sum, count).

    Computed from the logits z with two reductions over the vocabulary and never a
    [tokens, V] table of log-probabilities: with lse = logsumexp(z) and t the reference,
    -log p_t = lse - z_t and the sum of -log p_v over v != t is (V - 1) lse - (sum_v z_v - z_t),
    so smoothed = lse - (1 - eps) z_t - eps / (V - 1) (sum_v z_v - z_t). The loss and its
    gradient take 0.43 of the time of log_softmax-then-gather on the 2-core CPU (64 x 32
    tokens x 8000 words), the same to float rounding.
    """
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_target = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    nll = lse - z_target
    if label_smoothing > 0:
        vocab = logits.shape[-1]
        smoothed = (lse - (1 - label_smoothing) * z_target
                    - label_smoothing / (vocab - 1) * (z.sum(-1) - z_target))
    else:
        smoothed = nll
    weights = weights.astype(jnp.float32)
    return (smoothed * weights).sum(), (nll * weights).sum(), weights.sum()


def _forward_sums(graphdef, params, batch: Batch, rng, label_smoothing: float):
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=rng) if rng is not None else None
    logits = model(batch['inputs'], batch['targets'], batch['inputs_segmentation'],
                   batch['targets_segmentation'], batch['inputs_position'],
                   batch['targets_position'], rngs=rngs)
    return cross_entropy(logits, batch['targets'], batch['targets_segmentation'] > 0,
                         label_smoothing)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, label_smoothing: float,
                    grad_accum_steps: int = 1, dropout: bool = True, learning_rate=None,
                    rng_impl: str = 'threefry2x32', mesh=None, param_specs=None,
                    compute_dtype=None, ema_decay: float = 0.0, loss_scale_period: int = 0):
    """Returns step(state, batch) -> (state, metrics), to be jitted with the state donated.

    With `ema_decay` > 0 the state's 'ema' follows the new parameters (ema_decay_at). With
    `loss_scale_period` > 0 (float16 compute) the loss is scaled by the state's
    'loss_scale' before the backward pass and a step whose gradient is not finite leaves the
    parameters and Adam's state as they were (next_loss_scale); its metrics say `skipped`.

    The gradient is the mean over every real target token of the global batch, also when the
    batch is split into `grad_accum_steps` micro-batches that run one after the other.

    With a `mesh` (and the parameters' PartitionSpecs), each device computes the gradient of
    its own rows (`sharding.device_local`): the parameters are all-gathered once, in the
    compute dtype, and the gradients summed over the devices once, in float32 (reduce-scatter
    over 'fsdp', all-reduce over 'data'). Left to XLA's partitioner, the sum was taken on the
    bfloat16 gradients of the 16-bit compute (before their cast to the float32 parameters),
    each weight gathered per use and the batch itself all-reduced (issue 23's compiled TPU
    plans). Dropout masks then depend on (seed, step, device index).
    """

    def grads_of(params, micro: Batch, rng, scale):
        def loss(p):
            smoothed, nll, count = _forward_sums(graphdef, p, micro, rng, label_smoothing)
            return smoothed * scale, (smoothed, nll, count)
        (_, (smoothed, nll, count)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, jnp.stack([smoothed, nll, count])

    def accumulated(params, batch: Batch, rng, scale):
        """Gradient sums (times `scale`) and [smoothed, nll, count] sums of `batch`, in
        micro-batches."""
        if grad_accum_steps == 1:
            return grads_of(params, batch, rng, scale)
        # [rows, len] -> [accum, rows/accum, len]. Consecutive rows go to one micro-batch
        # index each, which keeps every device's rows on that device.
        micro = jax.tree.map(
            lambda x: jnp.moveaxis(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 1, 0), batch)

        def body(carry, xs):
            index, mb = xs
            r = jax.random.fold_in(rng, index) if rng is not None else None
            g, s = grads_of(params, mb, r, scale)
            return jax.tree.map(jnp.add, carry, (g, s)), None

        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                 jnp.zeros((3,), jnp.float32))
        (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
        return grads, sums

    if mesh is not None:
        accumulated = sharding.device_local(accumulated, mesh, param_specs, compute_dtype)

    def step(state: dict[str, Any], batch: Batch):
        params = state['params']
        rng = None
        if dropout:
            key = jax.random.wrap_key_data(state['rng'], impl=rng_impl)
            rng = jax.random.fold_in(key, state['step'])
        scale = state['loss_scale']['scale'] if loss_scale_period else jnp.float32(1.0)
        grads, sums = accumulated(params, batch, rng, scale)
        count = jnp.maximum(sums[2], 1.0)
        # Unscaled in float32 (the sums over devices already are), then cast.
        grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / (count * scale)).astype(
            p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, state['opt_state'], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, params=new_params, opt_state=opt_state, step=state['step'] + 1)
        grad_norm = optax.global_norm(grads)
        metrics = {}
        if loss_scale_period:
            finite = jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_params = keep(new_params, params)
            new_state.update(params=new_params, opt_state=keep(opt_state, state['opt_state']),
                             loss_scale=next_loss_scale(state['loss_scale'], finite,
                                                        loss_scale_period))
            metrics.update(loss_scale=scale, skipped=(~finite).astype(jnp.float32),
                           skipped_steps=new_state['loss_scale']['skipped'])
            grad_norm = jnp.where(finite, grad_norm, 0.0)  # a skipped step is not a fault
        if ema_decay:
            d = ema_decay_at(ema_decay, state['step'] + 1)
            new_state['ema'] = jax.tree.map(
                lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), state['ema'],
                new_params)
        metrics.update({
            'loss': sums[0] / count, 'nll': sums[1] / count, 'target_tokens': sums[2],
            'source_tokens': (batch['inputs_segmentation'] > 0).sum().astype(jnp.float32),
            'grad_norm': grad_norm})
        if learning_rate is not None:  # for the metrics; the optimizer has its own
            metrics['learning_rate'] = learning_rate(state['step'] + 1)
        return new_state, metrics

    return step


def make_eval_step(graphdef):
    """Returns eval(params, batch) -> [nll_sum, count] (no dropout, no label smoothing)."""

    def evaluate(params, batch: Batch):
        batch = dict(batch)
        for side in ('inputs', 'targets'):
            batch[f'{side}_segmentation'], batch[f'{side}_position'] = segments_and_positions(
                batch[side], batch.get(f'{side}_segmentation'), batch.get(f'{side}_position'))
        _, nll, count = _forward_sums(graphdef, params, batch, None, 0.0)
        return jnp.stack([nll, count])

    return evaluate


class Setup(NamedTuple):
    """Everything the training loop (and the train-step benchmark) builds from a config."""
    graphdef: Any
    init_state: Callable[[], dict]  # builds the initial state (jit it with state_shardings)
    abstract_state: Any
    state_shardings: dict
    batch_sharding: Any
    replicated: Any
    step_fn: Callable  # step(state, batch) -> (state, metrics), not yet jitted


def setup(config, mesh) -> Setup:
    """Model, optimizer, state layout and step function of `config` on `mesh`.

    Parameters and Adam moments follow the sharding rules (sharding.py); the step counter and
    the dropout key are replicated. 'auto' model settings are decided for the platform of the
    mesh's devices (model.resolved), which need not be this host's (a pre-flight plan).
    """
    config = resolved(config, mesh.devices.flat[0].platform)
    t = config.train
    optimizer = schedule.make_optimizer(config)
    model_fn = lambda: create_model(config, seed=t.seed)
    graphdef, abstract_model_state = abstract_model(config, seed=t.seed)
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_model_state, mesh))
    replicated = sharding.replicated(mesh)

    loss_scaling = config.model.dtype == 'float16'  # resolved: 'auto' is never float16

    def init_state():
        params = nnx.to_pure_dict(nnx.state(model_fn()))
        state = {'params': params, 'opt_state': optimizer.init(params),
                 'step': jnp.zeros((), jnp.int32),
                 'rng': jax.random.key_data(jax.random.key(t.seed + 1,
                                                           impl=t.dropout_rng_impl))}
        if t.ema_decay > 0:
            state['ema'] = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        if loss_scaling:
            state['loss_scale'] = initial_loss_scale(t.loss_scale_init)
        return state

    abstract_state = jax.eval_shape(init_state)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state['opt_state'], param_shardings,
        transform_non_params=lambda _: replicated)
    state_shardings = {'params': param_shardings, 'opt_state': opt_shardings,
                       'step': replicated, 'rng': replicated}
    if t.ema_decay > 0:
        state_shardings['ema'] = param_shardings
    if loss_scaling:
        state_shardings['loss_scale'] = jax.tree.map(lambda _: replicated,
                                                     abstract_state['loss_scale'])
    m = config.model
    step_fn = make_train_step(
        graphdef, optimizer, label_smoothing=t.label_smoothing,
        grad_accum_steps=t.grad_accum_steps,
        dropout=max(m.dropout_rate, m.attention_dropout_rate, m.relu_dropout_rate) > 0,
        learning_rate=schedule.rate(config), rng_impl=t.dropout_rng_impl, mesh=mesh,
        param_specs=jax.tree.map(lambda s: s.spec, param_shardings),
        compute_dtype=resolve_dtype(m.dtype), ema_decay=t.ema_decay,
        loss_scale_period=t.loss_scale_period if loss_scaling else 0)
    return Setup(graphdef, init_state, abstract_state, state_shardings,
                 sharding.batch_sharding(mesh), replicated, step_fn)


def jit_sharded_step(s: Setup, donate: bool = True):
    """The training step as train runs it: sharded in and out, the state donated (updated in
    place), traced under the mesh (activations stay split by rows: sharding.constrain_batch)."""
    mesh = s.batch_sharding.mesh

    def traced_under_mesh(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return s.step_fn(state, batch)

    return jax.jit(traced_under_mesh, in_shardings=(s.state_shardings, s.batch_sharding),
                   out_shardings=(s.state_shardings, s.replicated),
                   donate_argnums=0 if donate else ())


class CompiledSteps:
    """A jitted step compiled ahead of time, once per batch shape, each compilation inside
    `apart()` (e.g. `clocks.apart('compile')`), so that its time is told apart from the
    steps' (bucketed batches bring new shapes after the first step)."""

    def __init__(self, jitted, apart=None):
        self._jitted, self._apart, self._compiled = jitted, apart, {}

    def __call__(self, state, batch: Batch):
        shapes = tuple((k, v.shape) for k, v in sorted(batch.items()))
        compiled = self._compiled.get(shapes)
        if compiled is None:
            with self._apart('compile') if self._apart else contextlib.nullcontext():
                compiled = self._jitted.lower(state, batch).compile()
            self._compiled[shapes] = compiled
        return compiled(state, batch)


def abstract_batch(config, rows: int, length: int, batch_sharding) -> Batch:
    """Shapes of a global training batch of `rows` x `length` tokens on both sides."""
    shape = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding)
    return {k: shape for k in ('inputs', 'targets', 'inputs_segmentation',
                               'targets_segmentation', 'inputs_position', 'targets_position')}
