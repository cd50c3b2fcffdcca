"""The learning rate of section 5.3 and the Adam optimizer that follows it."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax


def learning_rate(step, d_model: int, warmup_steps: int, scale: float = 1.0):
    """lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (section 5.3, eq. 3).

    `step` counts from 1. Linear warm-up for `warmup_steps`, then inverse square root decay.
    """
    step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    return scale * d_model ** -0.5 * jnp.minimum(step ** -0.5, step * warmup_steps ** -1.5)


def rate(config) -> Callable:
    """The config's learning rate as a function of the 1-based step number."""
    t = config.train
    return lambda step: learning_rate(step, config.model.d_model, t.warmup_steps,
                                      t.learning_rate_scale)


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam(beta1 0.9, beta2 0.98, eps 1e-9) with the schedule above (section 5.3)."""
    t = config.train
    step_rate = rate(config)
    # optax passes the number of updates already applied: the step being taken is one more.
    return optax.adam(lambda count: step_rate(count + 1), b1=t.adam_b1, b2=t.adam_b2,
                      eps=t.adam_eps)
