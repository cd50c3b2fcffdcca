"""The learning rate of section 5.3 and the Adam optimizer that follows it."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate(step, d_model: int, warmup_steps: int, scale: float = 1.0):
    """lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (section 5.3, eq. 3).

    `step` counts from 1: optax passes the number of updates already applied, so the optimizer
    below adds one. Linear warm-up for `warmup_steps`, then inverse square root decay.
    """
    step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    return scale * d_model ** -0.5 * jnp.minimum(step ** -0.5, step * warmup_steps ** -1.5)


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam(beta1 0.9, beta2 0.98, eps 1e-9) with the schedule above (section 5.3)."""
    t = config.train
    schedule = lambda count: learning_rate(count + 1, config.model.d_model, t.warmup_steps,
                                           t.learning_rate_scale)
    return optax.adam(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)
