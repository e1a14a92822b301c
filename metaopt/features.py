"""Momentum features: the shared vocabulary of the classical and learned optimizers.

Every classical optimizer in :mod:`metaopt.optimizers` is assembled from these pure,
jittable functions, and the learned optimizer (:mod:`metaopt.lopt`) reads the same
quantities as its input features. Functions whose name starts with ``update_`` return
a new moment; the rest are stateless reductions or formulas.

Conventions: ``g`` is a gradient, ``x`` a parameter, ``count`` the number of updates
already applied (0-based, as in optax), ``t = count + 1`` the 1-based step of the
papers. Tree-level functions act on whole pytrees; functions taking ``leaf`` act on one
array (one tensor), reductions returning a scalar per tensor.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Tree = Any

# ----------------------------------------------------------------------------------
# Exponential moving averages (optax.tree does the tree math; thin names for ours).


def update_ema(*, updates: Tree, moments: Tree, decay) -> Tree:
  """EMA of ``updates``: ``moments <- decay * moments + (1 - decay) * updates`` (leafwise).

  ``optax.tree.update_moment(updates, moments, decay, order=1)``, by keyword only: the two
  trees have the same type, so a positional swap would silently compute another EMA.
  """
  return optax.tree.update_moment(updates, moments, decay, order=1)


def update_second_moment(nu: Tree, g: Tree, decay) -> Tree:
  """EMA of the squared gradient: ``v <- decay * v + (1 - decay) * g^2``."""
  return optax.tree.update_moment_per_elem_norm(g, nu, decay, order=2)


def bias_correction(moment: Tree, decay, count) -> Tree:
  """Adam's bias correction ``m / (1 - decay^count)`` (``count`` is 1-based here)."""
  return optax.tree.bias_correction(moment, decay, count)


def update_sum_momentum(moment: Tree, g: Tree, decay) -> Tree:
  """Heavy-ball sum ``d <- decay * d + g`` (optax.trace; ALR-SMAG, SGD-M)."""
  return jax.tree.map(lambda m, v: decay * m + v, moment, g)


def adam_direction(m_hat, v_hat, eps, eps_root=0.0):
  """Adam's direction ``m_hat / (sqrt(v_hat + eps_root) + eps)`` (leafwise)."""
  return jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), m_hat, v_hat)


def inverse_adam_denominator(v_hat, eps):
  """1 / (sqrt(v_hat) + eps): Adam's preconditioner, for directions built as products."""
  return 1 / (jnp.sqrt(v_hat) + eps)


# ----------------------------------------------------------------------------------
# Adafactor factored second moments.
#
# Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
# arXiv:1804.04235, 2018: for a matrix, keep row means R and column means C of g^2;
#   V_hat = R C^T / mean(R).
# Leaves with fewer than 2 dims keep the full second moment in the row slot.


class FactoredMoment(NamedTuple):
  """Row/column accumulators of one leaf (``col`` is a dummy for ndim < 2)."""

  row: jax.Array
  col: jax.Array


def factored_init(leaf: jax.Array) -> FactoredMoment:
  """Zero accumulators for ``leaf``, in its dtype (float32 at least).

  They are reductions of a zero buffer shaped like ``leaf``, so a sharded ``leaf`` gives
  accumulators sharded like the axes they keep.
  """
  zeros = jnp.zeros_like(leaf, dtype=jnp.promote_types(jnp.result_type(leaf), jnp.float32))
  if jnp.ndim(leaf) < 2:
    return FactoredMoment(zeros, jnp.zeros((), zeros.dtype))
  return FactoredMoment(jnp.sum(zeros, axis=-1), jnp.sum(zeros, axis=-2))


def update_factored(acc: FactoredMoment, g: jax.Array, decay, eps: float = 1e-30
                    ) -> FactoredMoment:
  """EMA of the row and column means of ``g^2 + eps`` (last two axes)."""
  g2 = jnp.square(g) + eps
  if jnp.ndim(g) < 2:
    return FactoredMoment(decay * acc.row + (1 - decay) * g2, acc.col)
  row = decay * acc.row + (1 - decay) * jnp.mean(g2, axis=-1)
  col = decay * acc.col + (1 - decay) * jnp.mean(g2, axis=-2)
  return FactoredMoment(row, col)


def factored_second_moment(acc: FactoredMoment, like: jax.Array) -> jax.Array:
  """Reconstructs ``V_hat = R C^T / mean(R)`` with the shape of ``like``."""
  if jnp.ndim(like) < 2:
    return acc.row
  row_mean = jnp.mean(acc.row, axis=-1, keepdims=True)
  return (acc.row / jnp.maximum(row_mean, 1e-30))[..., :, None] * acc.col[..., None, :]


# ----------------------------------------------------------------------------------
# AdEMAMix (Pagliardini et al, "The AdEMAMix Optimizer: Better, Faster, Older",
# arXiv:2409.03137, 2024).  Schedulers are evaluated at the 0-based count, as optax's
# contrib.ademamix does with schedules for ``alpha`` and ``b3``.  They compute in the
# default float dtype (float64 under jax_enable_x64): a float32 b3 = 0.9999 would change
# 1 - b3 by 1e-4 relative.


def ademamix_alpha(count, alpha, t_alpha=None):
  """alpha(t) = min(t / T_alpha, 1) * alpha  (constant ``alpha`` when T_alpha is None)."""
  if t_alpha is None:
    return jnp.asarray(alpha, float) * jnp.ones([])
  frac = jnp.minimum(jnp.asarray(count, float) / t_alpha, 1.0)
  return frac * alpha


def ademamix_beta3(count, beta_start, beta3, t_beta3=None):
  """Slow-EMA decay scheduler, increasing the half-life linearly from b_start to b3.

  b3(t) = exp(ln(b_s) ln(b3) / ((1 - a) ln(b3) + a ln(b_s))),  a = min(t / T_b3, 1).
  """
  if t_beta3 is None:
    return jnp.asarray(beta3, float) * jnp.ones([])
  a = jnp.minimum(jnp.asarray(count, float) / t_beta3, 1.0)
  log_start, log_end = jnp.log(beta_start), jnp.log(beta3)
  return jnp.exp(log_start * log_end / ((1 - a) * log_end + a * log_start))


def ademamix_direction(m1_hat, m2, nu_hat, alpha, eps):
  """(m1_hat + alpha * m2) / (sqrt(nu_hat) + eps) (leafwise)."""
  return jax.tree.map(lambda a, b, v: (a + alpha * b) / (jnp.sqrt(v) + eps), m1_hat, m2,
                      nu_hat)


# ----------------------------------------------------------------------------------
# Torque-Aware Momentum (Malviya et al, "Torque-Aware Momentum", arXiv:2412.18790,
# 2024).  No official code was found; the per-tensor scalar cosine follows the paper.


def torque_cosine(m_prev: jax.Array, g: jax.Array, eps: float = 1e-12) -> jax.Array:
  """s_t = <m_{t-1}, g_t> / (||m_{t-1}|| ||g_t||) per tensor; 0 where a norm is 0."""
  m = m_prev.astype(jnp.promote_types(m_prev.dtype, jnp.float32))
  gg = g.astype(m.dtype)
  # Sums over all axes, not jnp.vdot: its ravel is a reshape that explicitly sharded
  # arrays refuse.
  return torque_cosine_from_sums(jnp.sum(m * gg), jnp.sum(jnp.square(m)),
                                 jnp.sum(jnp.square(gg)), eps)


def torque_cosine_from_sums(m_dot_g, m_sq, g_sq, eps: float = 1e-12):
  """:func:`torque_cosine` from <m, g>, ||m||^2 and ||g||^2 (for fused reductions)."""
  return cosine_from_sums(m_dot_g, m_sq, g_sq, eps)


def cosine_from_sums(a_dot_b, a_sq, b_sq, eps: float = 1e-12):
  """<a, b> / (||a|| ||b||) from <a, b>, ||a||^2 and ||b||^2; 0 where ||a|| ||b|| <= eps."""
  denom = jnp.sqrt(a_sq) * jnp.sqrt(b_sq)
  return jnp.where(denom > eps, a_dot_b / jnp.maximum(denom, eps), 0.0)


def update_torque_ema(s_hat, s, gamma):
  """Smoothed cosine: s_hat <- gamma * s_hat + (1 - gamma) * s."""
  return gamma * s_hat + (1 - gamma) * s


def tam_damping(s_hat):
  """Damping factor d = (1 + s_hat) / 2 in [0, 1]."""
  return (1.0 + s_hat) / 2.0


def update_tam_momentum(m, g, beta, damping, eps):
  """TAM momentum: m <- beta * m + (eps + d) * g."""
  return beta * m + (eps + damping) * g


# ----------------------------------------------------------------------------------
# Cautious optimizers (Liang et al, "Cautious Optimizers: Improving Training with One
# Line of Code", arXiv:2411.16085, 2024).


def cautious_mask(u: jax.Array, g: jax.Array, min_mean: float = 1e-3) -> jax.Array:
  """phi = 1[u * g > 0] / max(mean(1[u * g > 0]), min_mean), per tensor."""
  phi = agreement(u, g)
  return phi / jnp.maximum(jnp.mean(phi), min_mean).astype(u.dtype)


def agreement(u: jax.Array, g: jax.Array) -> jax.Array:
  """1[u * g > 0]: where a direction agrees in sign with the gradient (the cautious mask
  before its renormalization)."""
  return (u * g > 0).astype(u.dtype)


# ----------------------------------------------------------------------------------
# Sign-based directions.


def lion_direction(m_prev: jax.Array, g: jax.Array, b1) -> jax.Array:
  """Lion's sign(b1 m_{t-1} + (1 - b1) g_t) (Chen et al, "Symbolic Discovery of
  Optimization Algorithms", arXiv:2302.06675, 2023)."""
  return jnp.sign(b1 * m_prev + (1 - b1) * g)


def grams_direction(g: jax.Array, u: jax.Array) -> jax.Array:
  """Grams' sign(g) |u|: the magnitude of ``u`` with the gradient's sign (Cao et al,
  "Grams: Gradient Descent with Adaptive Momentum Scaling", arXiv:2412.17107, 2024)."""
  return jnp.sign(g) * jnp.abs(u)


# ----------------------------------------------------------------------------------
# Polyak-type step sizes.
#
# MoMo: Schaipp et al, "MoMo: Momentum Models for Adaptive Learning Rates",
# arXiv:2305.07583, 2023.  ALR-SMAG: Wang et al, "Generalized Polyak Step Size for
# First Order Optimization with Momentum", arXiv:2305.12939, 2023.


def tree_vdot(a: Tree, b: Tree) -> jax.Array:
  """Inner product <a, b> of real trees, summed over all leaves.

  Each leaf's elementwise product summed over all its axes: ``optax.tree.vdot`` (0.2.8
  under jax >= 0.10) ravels the leaves for ``jnp.vdot``, a reshape that explicitly
  sharded arrays refuse.
  """
  return jax.tree.reduce(operator.add, jax.tree.map(lambda x, y: jnp.sum(x * y), a, b),
                         initializer=0)


def tree_lowest_dtype(tree: Tree) -> jnp.dtype:
  """``optax.tree.dtype(tree, "lowest")``, reading each leaf's dtype without converting
  the leaf, so that it also takes a tree of ``jax.ShapeDtypeStruct``."""
  return optax.tree.dtype(
      jax.tree.map(lambda x: np.zeros((), jnp.result_type(x)), tree), "lowest")


def global_norm_sq(tree: Tree) -> jax.Array:
  """||tree||^2 summed over all leaves."""
  return optax.tree.norm(tree, squared=True)


def tensor_norm(leaf: jax.Array) -> jax.Array:
  """Frobenius norm of one tensor."""
  return jnp.sqrt(jnp.sum(jnp.square(leaf)))


def tensor_rms(leaf: jax.Array, eps: float = 0.0) -> jax.Array:
  """sqrt(mean(leaf^2) + eps) of one tensor."""
  return jnp.sqrt(jnp.mean(jnp.square(leaf)) + eps)


def momo_polyak_step(lr, fbar, gamma, d_dot_x, d_norm_sq, lower_bound=0.0,
                     weight_decay=0.0, denom_eps=None, max_step=None):
  """MoMo's truncated Polyak step.

  tau = min(cap, [(1 + lr*lam) (fbar - f* - gamma) + <d, x>]_+ / ||d||^2), and 0 when
  ||d||^2 is below ``denom_eps`` (float eps of the platform's default float);
  ``cap = max_step`` if given, else ``lr``.

  For MoMo-Adam pass ``max_step = alpha / rho_k``, ``lower_bound = rho_k f*`` and
  ``d_norm_sq = <d, d / D>`` (``lr`` stays alpha, as in the weight-decay factor).
  """
  if denom_eps is None:
    denom_eps = jnp.finfo(jnp.asarray(d_norm_sq).dtype).eps
  lam = 1 + lr * weight_decay
  num = jnp.maximum(lam * (fbar - lower_bound - gamma) + d_dot_x, 0.0)
  t1 = jnp.where(d_norm_sq <= denom_eps, 0.0, num / jnp.where(d_norm_sq <= denom_eps, 1.0,
                                                                 d_norm_sq))
  return jnp.minimum(lr if max_step is None else max_step, t1)


def momo_lower_bound_reset(lb, lr, fbar, gamma, d_dot_x, weight_decay, floor, rho=1.0):
  """MoMo's online lower bound, before the step (paper Sec. 5 / optax's rule).

  If the model's cap h = (1 + lr lam)(fbar - gamma) + <d, x> falls below
  (1 + lr lam) rho f*, reset f* <- max(h / (2 rho (1 + lr lam)), floor).
  ``rho = 1 - b1^k`` for MoMo-Adam (EMAs from zero), 1 for MoMo.
  """
  lam = 1 + lr * weight_decay
  cap = lam * (fbar - gamma) + d_dot_x
  return jnp.where(cap < lam * rho * lb, jnp.maximum(cap / (2 * rho * lam), floor), lb)


def momo_lower_bound_update(tau, fbar, gamma, d_dot_x, d_norm_sq, floor, rho=1.0):
  """MoMo's online lower bound after the step.

  f* <- max((fbar + <d,x> - gamma - tau ||d||^2 / 2) / rho, floor), with ``rho`` as in
  :func:`momo_lower_bound_reset`.
  """
  return jnp.maximum(((fbar + d_dot_x - gamma) - 0.5 * tau * d_norm_sq) / rho, floor)


def alr_smag_step(loss, d_norm_sq, lower_bound=0.0, c=1.0, max_step=0.1, eps=0.0):
  """ALR-SMAG's Polyak step with momentum: tau = min(gamma_b, (f - f*) / (c ||d||^2 + eps))."""
  return jnp.minimum(max_step, (loss - lower_bound) / (c * d_norm_sq + eps))


# ----------------------------------------------------------------------------------
# Orthogonalized momentum (Muon: Jordan et al, "Muon: An optimizer for hidden layers in
# neural networks", 2024 blog; conventions of ``optax.contrib.muon``, optax 0.2.8).

# Quintic Newton-Schulz coefficients (a, b, c) of Jordan et al: the slope at 0 is
# maximized, so 5 iterations of s <- a s + b s^3 + c s^5 push every singular value
# s >= 1.6e-3 (after Frobenius normalization) into [0.68, 1.21] instead of converging to
# exactly 1 (the polar factor U V^T).
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)


def nesterov_momentum(mu: Tree, g: Tree, decay, count) -> Tree:
  """Bias-corrected Nesterov look-ahead of an EMA, as optax's Adam and Muon compute it.

  ``decay * mu / (1 - decay^(t+1)) + (1 - decay) * g / (1 - decay^t)`` with ``mu`` the
  EMA already updated with ``g`` and ``count`` the 1-based step ``t``.
  """
  return jax.tree.map(lambda m, v: decay * m + (1 - decay) * v,
                      bias_correction(mu, decay, optax.safe_increment(count)),
                      bias_correction(g, decay, count))


def newton_schulz_orthogonalize(m: jax.Array, steps: int = 5,
                                coeffs=NEWTON_SCHULZ_COEFFS, eps=1e-8) -> jax.Array:
  r"""Approximate polar factor U V^T of the matrices in the last two axes of ``m``.

  .. math::
    X_0 = M / (\|M\|_F + \epsilon), \qquad
    X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \quad A_k = X_k X_k^\top,

  computed on the transpose when ``M`` has more rows than columns (so ``A`` is the
  smaller Gram matrix) and transposed back; the Frobenius norm is taken per matrix.
  Leading axes are batch axes (each matrix is orthogonalized on its own), so the
  function also works under ``jax.vmap``. The singular vectors are kept and each
  singular value follows the scalar map ``s <- a s + b s^3 + c s^5`` from
  ``s / ||M||_F``: with the default coefficients and 5 steps, singular values of at
  least 1.6e-3 ``||M||_F`` end in [0.68, 1.21] (smaller ones stay smaller; a zero matrix
  stays 0).

  Computes in at least float32 and returns ``m``'s dtype (optax computes bfloat16
  inputs in bfloat16; float32 and float64 agree with it).

  Args:
    m: an array of rank >= 2, ``[..., rows, cols]``.
    steps: number of iterations for constant coefficients (a Python int unrolls them;
      a traced int, as ``optax.inject_hyperparams`` makes, runs a loop).
    coeffs: ``(a, b, c)``, or an ``(n, 3)`` table of per-iteration coefficients (then
      its ``n`` rows run in order and ``steps`` is not used, as in optax).
    eps: added to the Frobenius norm before dividing.

  Returns:
    An array of ``m``'s shape and dtype.
  """
  if jnp.ndim(m) < 2:
    raise ValueError(f"newton_schulz_orthogonalize needs a matrix; got shape {jnp.shape(m)}.")
  dtype = jnp.promote_types(m.dtype, jnp.float32)
  x = m.astype(dtype)
  table = jnp.asarray(coeffs, dtype)
  if table.shape != (3,) and (table.ndim != 2 or table.shape[-1] != 3):
    raise ValueError(f"coeffs must have shape (3,) or (n, 3); got {table.shape}.")
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + eps)

  def iteration(x, abc):
    gram = x @ jnp.swapaxes(x, -1, -2)
    poly = abc[1] * gram + abc[2] * (gram @ gram)
    return abc[0] * x + poly @ x

  if table.ndim == 2:
    x, _ = jax.lax.scan(lambda x, abc: (iteration(x, abc), None), x, table, unroll=True)
  else:  # unrolled for a Python int; a traced count (inject_hyperparams) loops
    x = jax.lax.fori_loop(0, steps, lambda _, x: iteration(x, table), x, unroll=True)
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(m.dtype)


def muon_shape_scale(fan_in, fan_out, consistent_rms=None):
  """Muon's per-matrix update scale for a ``[fan_in, fan_out]`` weight.

  ``sqrt(max(1, fan_out / fan_in))`` (Jordan et al; their PyTorch ``[out, in]``
  weights read it as ``sqrt(max(1, rows / cols))``), or with ``consistent_rms``
  ``sqrt(max(fan_in, fan_out)) * consistent_rms`` (Liu et al, "Muon is Scalable for
  LLM Training", arXiv:2502.16982, 2025: an update RMS of ``consistent_rms`` like
  AdamW's, 0.2 in the paper).
  """
  if consistent_rms is None:
    return math.sqrt(max(1.0, fan_out / fan_in))
  return math.sqrt(max(fan_in, fan_out)) * consistent_rms


def muon_direction(m: jax.Array, fan_in: int, steps: int = 5,
                   coeffs=NEWTON_SCHULZ_COEFFS, eps=1e-8, consistent_rms=None, *,
                   adaptive: bool = False) -> jax.Array:
  """Muon's direction for one weight tensor: orthogonalized, shape-scaled momentum.

  The tensor is viewed as a ``[fan_in, size / fan_in]`` matrix (a conv kernel
  ``[*spatial, in, out]`` with ``fan_in = prod(spatial) * in``; see
  :func:`metaopt.mup.default_fan_in`), orthogonalized by
  :func:`newton_schulz_orthogonalize`, scaled by :func:`muon_shape_scale` and reshaped
  back. ``m`` is typically the Nesterov momentum :func:`nesterov_momentum`. With
  ``adaptive`` the orthogonalized ``O`` is first multiplied by ``<m, O>`` (summed over
  the tensor; Bernstein et al, "Old Optimizer, New Norm: An Anthology",
  arXiv:2409.20325, 2024), as optax does before the shape scale.
  """
  shape = jnp.shape(m)
  size = math.prod(shape)
  if len(shape) < 2 or fan_in < 1 or size % fan_in:
    raise ValueError(f"muon_direction: a tensor of shape {shape} has no 2-D view with "
                     f"fan_in={fan_in}.")
  fan_out = size // fan_in
  o = jnp.reshape(newton_schulz_orthogonalize(jnp.reshape(m, (fan_in, fan_out)), steps,
                                              coeffs, eps), shape)
  if adaptive:
    o = o * jnp.sum(m * o).astype(o.dtype)
  scale = muon_shape_scale(fan_in, fan_out, consistent_rms)
  return (o * jnp.asarray(scale, o.dtype)).astype(m.dtype)


# ----------------------------------------------------------------------------------
# Distance from the initialization (the step-size estimate of D-Adaptation, Defazio &
# Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", arXiv:2301.07733, 2023,
# and Prodigy, Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive
# Parameter-Free Learner", arXiv:2306.06101, 2023). Both grow the step size d as long
# as the gradients keep pointing away from x_0: their estimate is
#   d_hat = sum_k lambda_k <g_k, x_0 - x_k> / ||sum_k lambda_k g_k||   (Prodigy Alg. 1),
# the distance travelled along the averaged gradient. Per tensor and scale-free, the
# same information is the distance travelled relative to the tensor's own size and
# the cosine between the momentum and the displacement x_0 - x_k.


def distance_ratio(x: jax.Array, x0: jax.Array) -> jax.Array:
  """RMS(x - x_0) / max(RMS(x_0), RMS(x)) of one tensor (0 where both are 0)."""
  return distance_ratio_from_sums(jnp.sum(jnp.square(x - x0)), jnp.sum(jnp.square(x0)),
                                  jnp.sum(jnp.square(x)))


def distance_ratio_from_sums(disp_sq, x0_sq, x_sq, tiny: float = 1e-30):
  """:func:`distance_ratio` from ||x - x_0||^2, ||x_0||^2 and ||x||^2 (one size, so
  the RMS ratio is the ratio of norms). In [0, 2]; 0 where ``max(||x_0||^2, ||x||^2)``
  is at most ``tiny`` (a zero tensor that has not moved)."""
  ref = jnp.maximum(x0_sq, x_sq)
  return jnp.where(ref > tiny, jnp.sqrt(disp_sq / jnp.maximum(ref, tiny)), 0.0)


def log_distance(ratio, eps: float = 1e-8):
  """log10(ratio + eps) / 4: a :func:`distance_ratio` on an O(1) scale, in
  [-2, 0.08] (-2: not moved; 0: moved by the tensor's own size)."""
  return jnp.log10(ratio + eps) / 4.0


def loss_trend(fast, slow):
  """(f_fast - f_slow) / (|f_fast| + |f_slow|) of two loss EMAs, in [-1, 1].

  For positive losses it is tanh(log(f_fast / f_slow) / 2): negative while the loss
  falls, positive while it rises; it does not change when the loss is multiplied by a
  constant. 0 where both EMAs are 0.
  """
  denom = jnp.abs(fast) + jnp.abs(slow)
  return jnp.where(denom > 0, (fast - slow) / jnp.where(denom > 0, denom, 1), 0.0)


# ----------------------------------------------------------------------------------
# Time.


def time_features(count, num_steps=None, taus=(10.0, 100.0, 1000.0, 10000.0)):
  """tanh(t / tau) for each tau, plus the fraction of training t / num_steps (0 if unknown).

  Returns a float32 vector ``[len(taus) + 1]``.
  """
  t = jnp.asarray(count, jnp.float32)
  feats = [jnp.tanh(t / tau) for tau in taus]
  if num_steps is None:
    frac = jnp.zeros([], jnp.float32)
  else:
    frac = jnp.clip(t / jnp.asarray(num_steps, jnp.float32), 0.0, 1.0)
  return jnp.stack(feats + [frac])
