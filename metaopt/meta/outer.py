"""The outer loop: meta-gradient steps on theta with an optax optimizer.

Per outer step ``s`` (all in jitted, sharded programs):

1. the active tasks are those of window ``s // resample_every`` (drawn from the run's
   seed, so every host and every resumed run agrees), plus, with
   ``MetaConfig.family_pool``, ``family_samples`` configs of each family's pool,
   redrawn every ``family_window`` steps (:func:`active_tasks`);
2. for each active task, its populations (``num_pairs`` informed pairs passing
   ``value=``/``num_steps=``, ``num_blind_pairs`` pairs passing neither) run one
   truncation through the estimator; the task's meta-gradient is the member-weighted
   mean over its populations;
3. the tasks' meta-gradients are averaged, and the outer optimizer (AdamW after global
   norm clipping) updates theta.

Every task keeps its populations between its windows, so episodes run to their
horizons. One program is compiled per task (and one for the update), however the
tasks are drawn.

Members whose episode ended are restarted after the task's program, by a program of
their own (:func:`metaopt.meta.population.restart_groups`): it initializes every
population of the task in one vmapped ``init``, serves the run's first episodes and
every reset, and is shared by the tasks whose inits compute the same function
(:func:`metaopt.meta.population.init_signature`). Keeping ``init`` out of the task's
program halves an MLP task's compile time, and the start-up compiles one small init
program per distinct task (in parallel threads) instead of one program holding every
population's init, whose compile time grows superlinearly with the tasks. Only the tasks
of the first step are started and compiled up front; a config of a family pool drawn
later gets its programs and first episodes then (:meth:`MetaTrainer.prepare`), with the
values it would have had from the start.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

import metaopt
from metaopt import lopt
from metaopt.meta import estimators as est_lib
from metaopt.meta import population as pop_lib
from metaopt.meta import sharding as shard_lib
from metaopt.meta.config import MetaConfig
from metaopt.meta.inner import lo_problem


class MetaState(NamedTuple):
  """Everything a resumed run needs (arrays only; the config is saved beside it).

  Attributes:
    theta: the LO's meta-parameters (replicated).
    opt_state: the outer optimizer's state (replicated).
    populations: group name -> :class:`~metaopt.meta.population.Population` (sharded
      along the member axis).
    key: uint32 ``[2]``, the run's base key (step keys are ``fold_in(key, step)``).
    step: int32, outer steps done.
  """

  theta: dict
  opt_state: Any
  populations: dict
  key: jax.Array
  step: jax.Array


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """One population: a task, whether it passes ``value``/``num_steps``, its size."""

  name: str  # t<task index>_<informed|blind>: a checkpoint key
  task_index: int
  informed: bool
  size: int


def decay_towards(anchor, rate: float) -> optax.GradientTransformation:
  """Adds ``rate * (params - anchor)`` to the updates: decoupled weight decay whose
  fixed point is ``anchor`` instead of zero."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    return jax.tree.map(lambda u, p, a: u + rate * (p - a), updates, params, anchor), state

  return optax.GradientTransformation(init_fn, update_fn)


def outer_optimizer(config: MetaConfig, anchor) -> optax.GradientTransformation:
  r"""AdamW on the clipped meta-gradient, its weight decay pulling toward ``anchor``.

  .. math::

    \theta \leftarrow \theta - \eta\,(\mathrm{adam}(\mathrm{clip}(g))
      + \lambda (\theta - \theta_0))

  with ``theta_0`` the warm start: ES meta-gradients are noisy, and the decay keeps the
  coordinates they do not consistently move near the (working) warm start instead of
  letting them random-walk; decaying toward zero would remove the classical mix. The
  learning rate is constant or, with ``outer_decay_steps``, cosine-decayed to 10%.
  """
  lr = config.outer_learning_rate
  if config.outer_decay_steps:
    lr = optax.cosine_decay_schedule(lr, config.outer_decay_steps, alpha=0.1)
  return optax.chain(
      optax.clip_by_global_norm(config.outer_clip_norm),
      optax.scale_by_adam(),
      decay_towards(anchor, config.outer_weight_decay),
      optax.scale_by_learning_rate(lr))


def warm_start(config: MetaConfig) -> metaopt.LearnedOptimizer:
  """The LO theta starts from (float32): a classical optimizer (its muP version unless
  ``config.mup`` is off) or an artifact (whose muP setting must agree), with the
  switches ``config.step_size_features`` and ``config.muon`` turned on (their new
  weights zero: :meth:`metaopt.LearnedOptimizer.extended`)."""
  if config.warm_start in lopt.CLASSICAL:
    lo = metaopt.LearnedOptimizer.from_classical(config.warm_start, mup=config.mup)
  else:
    lo = metaopt.load(config.warm_start)
    if lo.config.mup != config.mup:
      raise ValueError(f"warm_start {config.warm_start!r} has mup={lo.config.mup} but "
                       f"MetaConfig.mup={config.mup}; set them alike.")
  lo = lo.extended(muon=config.muon, step_size_features=config.step_size_features)
  theta = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), lo.theta)
  if config.hidden_size and config.hidden_size != lo.config.hidden_size:
    lo_config = dataclasses.replace(lo.config, hidden_size=config.hidden_size)
    fresh = lopt.init_theta(lo_config, jax.random.PRNGKey(config.seed),
                            mix=theta["mix"], log_lr=theta["log_lr"],
                            hidden_mix=theta.get("hidden_mix"))
    return metaopt.LearnedOptimizer(lo_config, fresh, lo.metadata)
  return lo.with_theta(theta)


def resolve_tasks(config: MetaConfig) -> list:
  """The run's tasks (built, horizon ``config.horizon``), in a fixed order: the suite's
  (or ``tasks`` and ``families``), then those of ``task_factories``."""
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  own = [tasks_lib.from_factory(spec) for spec in config.task_factories]  # errors first
  return [tasks_lib.build(c, config.horizon) for c in _task_configs(config)] + own


def _task_configs(config: MetaConfig) -> list:
  """The task configs of ``tasks``/``families`` (after the suite's with ``keep_suite``),
  else of the suite (none for ``""``)."""
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  if config.tasks or config.families:
    configs = _suite_configs(config) if config.keep_suite else []
    configs += [tasks_lib.config_from_json(t) for t in config.tasks]
    for pool in family_configs(config):
      configs += pool
    return list(dict.fromkeys(configs))  # a family may draw the same config twice
  return _suite_configs(config)


def _suite_configs(config: MetaConfig) -> list:
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  if not config.suite:
    if config.task_names:
      raise ValueError(f"task_names {list(config.task_names)} need a suite; "
                       "MetaConfig.suite is empty.")
    return []
  entries = tasks_lib.get_suite(config.suite)
  if config.task_names:
    by_name = {e.name: e for e in entries}
    missing = [n for n in config.task_names if n not in by_name]
    if missing:
      raise ValueError(f"task_names {missing} are not in suite {config.suite!r}; it has "
                       f"{sorted(by_name)}.")
    entries = [by_name[n] for n in config.task_names]
  return [e.config for e in entries]


def family_configs(config: MetaConfig) -> list[list]:
  """Per family of ``config.families``, the configs drawn from it when the run starts:
  ``family_pool`` of them (or ``family_samples`` without a pool), deterministic in the
  seed; the first ``family_samples`` of a pool are the configs a run without one draws."""
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  count = config.family_pool or config.family_samples
  pools = []
  for f, name in enumerate(config.families):
    family = tasks_lib.get_family(name)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), f)
    pools.append([family.sample(jax.random.fold_in(key, i)) for i in range(count)])
  return pools


def family_pools(config: MetaConfig, task_configs: list) -> tuple[tuple[int, ...], ...]:
  """Task indices (into ``task_configs``, the run's tasks' configs) of each family's
  pool; empty without ``family_pool`` (then every task is trained as a fixed one). A
  suite or ``tasks`` config that a family also drew is one task, in the pool."""
  if not config.family_pool:
    return ()

  def index(c):
    for i, t in enumerate(task_configs):
      if t == c:
        return i
    raise ValueError(f"family config {c.name} is not among the run's tasks; pass "
                     "task_list=None or include outer.resolve_tasks(config).")

  return tuple(tuple(dict.fromkeys(index(c) for c in pool))
               for pool in family_configs(config))


def family_window(config: MetaConfig) -> int:
  """Outer steps between redraws of the families' active configs."""
  return config.family_window or -(-config.horizon // config.truncation_length)


def active_tasks(config: MetaConfig, num_tasks: int, step: int,
                 pools: tuple[tuple[int, ...], ...] = ()) -> tuple[int, ...]:
  """Task indices trained at outer step ``step``, sorted; a pure function of the config,
  the step and the pools, so every host and every resumed run agrees.

  Tasks outside ``pools`` (the suite's, ``tasks``, factories) are all active or, with
  ``tasks_per_step``, that many of them redrawn every ``resample_every`` steps. Each
  pool (one per family, :func:`family_pools`) adds ``family_samples`` of its configs,
  redrawn every :func:`family_window` outer steps.

  Why a fixed pool of K configs per family, redrawn per window, rather than a fresh
  config per episode: a population's members share one config (the arrays of its
  parameters and optimizer states have that config's shapes, and one compiled program
  steps them), so the config can only change for a whole population, and a new shape
  is a new compilation (tens of seconds, then used for one episode). A bounded cache of
  fresh samples would also drop the populations of evicted configs mid-episode (a bias
  against long horizons) and make the checkpointed state's shapes depend on the step.
  With a pool, compilations are bounded (K per family, each compiled when first drawn:
  :meth:`MetaTrainer.prepare`), the state has fixed shapes (bit-exact resume), and a
  paused config keeps its populations, so its episodes resume where they stopped and
  always reach their horizons. The window
  defaults to the longest episode (``ceil(horizon / K)`` truncations): an active
  population runs about one episode per draw, so the configs a family trains change
  about once per episode.
  """
  pooled = {i for pool in pools for i in pool}
  fixed = [i for i in range(num_tasks) if i not in pooled]
  count = min(config.tasks_per_step or len(fixed), len(fixed))
  if count == len(fixed):
    chosen = list(fixed)
  else:
    rng = np.random.default_rng([config.seed, step // config.resample_every])
    chosen = [fixed[int(i)] for i in rng.choice(len(fixed), count, replace=False)]
  window = step // family_window(config) if pools else 0
  for f, pool in enumerate(pools):
    rng = np.random.default_rng([config.seed, window, 1 + f])
    k = min(config.family_samples, len(pool))
    chosen += [pool[int(i)] for i in rng.choice(len(pool), k, replace=False)]
  return tuple(sorted(chosen))


class MetaTrainer:
  """Builds the state and the jitted, sharded programs of one meta-training run.

  Example::

    trainer = MetaTrainer(PRESETS["smoke"])
    state = trainer.init()
    for _ in range(10):
      state, metrics = trainer.step(state)
    lo = trainer.learned_optimizer(state)
  """

  def __init__(self, config: MetaConfig, *, mesh: Mesh | None = None,
               task_list: list | None = None):
    self.config = config
    self.tasks = resolve_tasks(config) if task_list is None else list(task_list)
    if not self.tasks:
      raise ValueError("no tasks to meta-train on: MetaConfig.suite is empty and no "
                       "tasks, families, task_factories or tasks=[...] were given.")
    self.mesh = shard_lib.population_mesh() if mesh is None else mesh
    lo = warm_start(config)
    self.lo_config = lo.config
    self.warm_theta = lo.theta
    flat, self.unravel = ravel_pytree(lo.theta)
    self.dim = int(flat.size)
    self.optimizer = outer_optimizer(config, lo.theta)
    self.antithetic = est_lib.is_antithetic(config.estimator)
    self.estimator = est_lib.get_estimator(config.estimator, config.sigma, reset=False)
    self.schedule = pop_lib.TruncationSchedule(
        config.truncation_length, config.horizon, config.min_horizon,
        config.horizon_schedule)
    self.groups = self._group_specs()
    self.pools = family_pools(config, [t.config for t in self.tasks])
    self._rep = shard_lib.replicated(self.mesh)
    self._pop_sharding = shard_lib.population_sharding(self.mesh)
    self._programs: dict[int, Any] = {}
    self._restarts: dict[int, Any] = {}  # task index -> its restart program
    self._restarts_by_init: dict[Any, Any] = {}  # init signature -> restart program
    self._compiled_restarts: set = set()  # (program id, population sizes) compiled
    self._not_first = None
    self._state_shapes = None
    self._update = jax.jit(self._apply_update, out_shardings=self._rep)
    self._all_zero = jax.jit(lambda xs: jnp.stack([jnp.all(x == 0) for x in xs]),
                             out_shardings=self._rep)
    # Tasks (and _UPDATE) whose programs are lowered for compile_all; one whose compile
    # was cut short compiles at its first call instead (jit), so nothing is lost.
    self._compiled_programs: set[int] = set()

  # ------------------------------------------------------------------ structure
  def _group_specs(self) -> dict[int, tuple[GroupSpec, ...]]:
    c = self.config
    groups = {}
    for i, task in enumerate(self.tasks):
      specs = [GroupSpec(f"t{i:02d}_informed", i, True, c.num_members)]
      if c.num_blind_pairs:
        specs.append(GroupSpec(f"t{i:02d}_blind", i, False, c.num_blind_members))
      for s in specs:
        shard_lib.check_population_size(s.size, self.mesh, s.name)
      groups[i] = tuple(specs)
    return groups

  def spec(self, group: GroupSpec) -> est_lib.UnrollSpec:
    problem = lo_problem(self.tasks[group.task_index], self.lo_config,
                         informed=group.informed, augment_scale=self.config.augment_scale)
    return est_lib.UnrollSpec(problem, self.schedule, self.config.loss_bound,
                              self.unravel, self.mesh,
                              log_loss=self.config.log_loss)

  def active_tasks(self, step: int) -> tuple[int, ...]:
    return active_tasks(self.config, len(self.tasks), step, self.pools)

  # ------------------------------------------------------------------ state
  def _init_state(self) -> MetaState:
    """The initial state, one :func:`~metaopt.meta.population.init_population` per
    population: the reference :meth:`init` equals (and the state's shapes)."""
    c = self.config
    key = jax.random.PRNGKey(c.seed)
    pops = {}
    for i, specs in self.groups.items():
      for g in specs:
        spec = self.spec(g)
        pops[g.name] = pop_lib.init_population(spec.problem.init, self.schedule,
                                               _group_key(key, g.name), g.size, self.dim,
                                               antithetic=self.antithetic)
    theta = self.warm_theta
    return MetaState(theta=theta, opt_state=self.optimizer.init(theta), populations=pops,
                     key=key, step=jnp.zeros([], jnp.int32))

  def restart_program(self, task_index: int):
    """The jitted :func:`~metaopt.meta.population.restart_groups` of a task's
    populations: ``(group keys [G, 2], populations, done masks, first) -> populations``;
    one program per distinct init (:func:`~metaopt.meta.population.init_signature`)."""
    if task_index not in self._restarts:
      init_fn = self.spec(self.groups[task_index][0]).problem.init  # informed or not
      signature = pop_lib.init_signature(init_fn)
      if signature not in self._restarts_by_init:
        fn = functools.partial(pop_lib.restart_groups, init_fn, self.schedule, self.dim,
                               self.antithetic)
        pop = self._pop_sharding
        self._restarts_by_init[signature] = jax.jit(
            fn, in_shardings=(self._rep, pop, pop, self._rep), out_shardings=pop)
      self._restarts[task_index] = self._restarts_by_init[signature]
    return self._restarts[task_index]

  def init_programs(self) -> int:
    """How many distinct init (restart) programs the run's tasks need."""
    return len({id(self.restart_program(i)) for i in self.groups})

  def _restart_args(self, task_index: int, populations: dict, group_keys, done, first):
    names = [g.name for g in self.groups[task_index]]
    return (group_keys, tuple(populations[n] for n in names), done, first)

  def _lower_restarts(self, args_of: dict[int, tuple]) -> list:
    """The restart programs not compiled yet, lowered once per (program, sizes)."""
    lowered = {}
    for i, args in args_of.items():
      key = (id(self.restart_program(i)), tuple(g.size for g in self.groups[i]))
      if key not in self._compiled_restarts and key not in lowered:
        lowered[key] = self.restart_program(i).lower(*args)
    self._compiled_restarts.update(lowered)
    return list(lowered.values())

  def shardings(self) -> MetaState:
    """The sharding of every leaf of the state (a :class:`MetaState` tree)."""
    shapes = self.state_shapes()
    rep, pop = self._rep, self._pop_sharding
    return MetaState(theta=jax.tree.map(lambda _: rep, shapes.theta),
                     opt_state=jax.tree.map(lambda _: rep, shapes.opt_state),
                     populations=jax.tree.map(lambda _: pop, shapes.populations),
                     key=rep, step=rep)

  def abstract_state(self) -> MetaState:
    """``ShapeDtypeStruct`` tree with shardings: the target of a checkpoint restore."""
    shapes = self.state_shapes()
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.shardings())

  def blank_populations(self) -> dict[str, pop_lib.Population]:
    """Every population as zeros, placed with its sharding: members not started yet
    (horizon 0, which a started episode never has; :meth:`start_tasks` starts them)."""
    return jax.tree.map(lambda s: shard_lib.global_zeros(s.shape, s.dtype, s.sharding),
                        self.abstract_state().populations)

  def init(self) -> MetaState:
    """The initial state, created directly on the devices with its shardings.

    The tasks active at step 0 start their first episodes (:meth:`start_tasks`); the
    other tasks of family pools get blank populations, started when first drawn, so
    the start-up initializes and compiles only what the first step runs. Started
    populations equal :meth:`_init_state`'s (``tests/test_meta_startup.py``), whenever
    they start.
    """
    theta = self.warm_theta
    theta, opt_state = jax.jit(lambda: (theta, self.optimizer.init(theta)),
                               out_shardings=self._rep)()
    state = MetaState(theta=theta, opt_state=opt_state,
                      populations=self.blank_populations(),
                      key=shard_lib.global_array(jax.random.PRNGKey(self.config.seed),
                                                 self._rep),
                      step=shard_lib.global_array(np.int32(0), self._rep))
    return self.start_tasks(state, self.active_tasks(0))

  def unstarted_tasks(self, state: MetaState, tasks: tuple[int, ...]) -> tuple[int, ...]:
    """Those of ``tasks`` whose populations are blank (every horizon 0)."""
    if not tasks:
      return ()
    horizons = [state.populations[g.name].horizon for i in tasks for g in self.groups[i]]
    blank = np.asarray(self._all_zero(horizons))
    per_task = np.split(blank, np.cumsum([len(self.groups[i]) for i in tasks])[:-1])
    return tuple(i for i, b in zip(tasks, per_task) if b.any())

  def start_tasks(self, state: MetaState, tasks: tuple[int, ...]) -> MetaState:
    """``state`` with the first episodes of ``tasks``' blank populations started.

    Each task's first episodes come from its restart program (every member ``done``,
    ``first`` set, the run's first-episode keys): the same values whenever a task
    starts. The restart programs not compiled yet are compiled in parallel threads.
    """
    pending = self.unstarted_tasks(state, tuple(tasks))
    if not pending:
      return state
    key = jax.random.PRNGKey(self.config.seed)
    first = self._first_flag(True)
    args_of = {}
    for i in pending:
      specs = self.groups[i]
      # Arguments typed (shape, dtype, sharding) as a step passes them: one compilation.
      # Global arrays (every process places its devices' slices), as a step's are.
      keys = shard_lib.global_array(
          np.stack([np.asarray(_group_key(key, g.name)) for g in specs]), self._rep)
      done = tuple(shard_lib.global_array(np.ones([g.size], bool), self._pop_sharding)
                   for g in specs)
      args_of[i] = self._restart_args(i, state.populations, keys, done, first)
    compile_all(self._lower_restarts(args_of))
    pops = dict(state.populations)
    for i in pending:
      pops.update(zip([g.name for g in self.groups[i]],
                      self.restart_program(i)(*args_of[i])))
    return state._replace(populations=pops)

  # ------------------------------------------------------------------ programs
  def _task_estimate(self, task_index: int, theta, pops: dict, key, step):
    """Meta-loss, flat meta-gradient, new populations (not restarted yet), metrics of
    one task, and its populations' restart keys ``[G, 2]`` and done masks."""
    flat, _ = ravel_pytree(theta)
    task_key = jax.random.fold_in(jax.random.fold_in(key, step), task_index)
    losses, grads, weights, new_pops, metrics = [], [], [], {}, {}
    reset_keys, done = [], []
    for g in self.groups[task_index]:
      gkey = jax.random.fold_in(task_key, hash_name(g.name))
      e = self.estimator(self.spec(g), flat, pops[g.name], gkey)
      new_pops[g.name] = e.population
      reset_keys.append(e.reset_key)
      done.append(e.done)
      losses.append(e.meta_loss)
      grads.append(e.gradient)
      weights.append(g.size)
      for k, v in e.metrics.items():
        metrics[k] = metrics.get(k, 0) + v
      kind = "informed" if g.informed else "blind"
      metrics[f"loss/{self.tasks[task_index].name}/{kind}"] = e.meta_loss
    w = jnp.asarray(weights, jnp.float32) / sum(weights)
    loss = jnp.dot(w, jnp.stack(losses))
    grad = w @ jnp.stack(grads)
    return loss, grad, new_pops, metrics, (jnp.stack(reset_keys), tuple(done))

  def program(self, task_index: int):
    """The jitted estimate of one task (compiled on first use)."""
    if task_index not in self._programs:
      pop_sh = {g.name: jax.tree.map(lambda _: self._pop_sharding,
                                     self.state_shapes().populations[g.name])
                for g in self.groups[task_index]}
      self._programs[task_index] = jax.jit(
          functools.partial(self._task_estimate, task_index),
          out_shardings=(self._rep, self._rep, pop_sh, self._rep,
                         (self._rep, self._pop_sharding)))
    return self._programs[task_index]

  def lower_programs(self, state: MetaState, tasks: tuple[int, ...] | None = None
                     ) -> list:
    """The programs of ``tasks`` (default: those active at ``state``'s step) not lowered
    before, their restart programs not compiled yet and (the first time) the update,
    lowered for ``state`` (not compiled). Tasks drawn later are compiled when drawn
    (:meth:`prepare`)."""
    if tasks is None:
      tasks = self.active_tasks(int(state.step))
    lowered, restart_args = [], {}
    for i in tasks:
      if i in self._compiled_programs:
        continue
      self._compiled_programs.add(i)
      sub = {g.name: state.populations[g.name] for g in self.groups[i]}
      lowered.append(self.program(i).lower(state.theta, sub, state.key, state.step))
      keys = jax.ShapeDtypeStruct((len(self.groups[i]), 2), jnp.uint32, sharding=self._rep)
      done = tuple(jax.ShapeDtypeStruct((g.size,), jnp.bool_, sharding=self._pop_sharding)
                   for g in self.groups[i])
      restart_args[i] = self._restart_args(i, sub, keys, done, self._first_flag(False))
    lowered += self._lower_restarts(restart_args)
    if _UPDATE not in self._compiled_programs:
      self._compiled_programs.add(_UPDATE)
      count = len(self.active_tasks(0))
      grads = jax.ShapeDtypeStruct((count, self.dim), jnp.float32, sharding=self._rep)
      lowered.append(self._update.lower(state.theta, state.opt_state, grads, state.step))
    return lowered

  def prepare(self, state: MetaState) -> tuple[MetaState, tuple[int, ...]]:
    """``state`` ready for its step: the active tasks' programs compiled (in parallel
    threads) and their blank populations started. Returns it and the tasks compiled or
    started now (a redraw of the family pools brings new ones; else none)."""
    active = self.active_tasks(int(state.step))
    compiled = tuple(i for i in active if i not in self._compiled_programs)
    compile_all(self.lower_programs(state, active))
    started = self.unstarted_tasks(state, active)
    return self.start_tasks(state, started), tuple(sorted(set(compiled) | set(started)))

  def state_shapes(self) -> MetaState:
    """``ShapeDtypeStruct`` tree of the state (traced once, no computation)."""
    if self._state_shapes is None:
      self._state_shapes = jax.eval_shape(self._init_state)
    return self._state_shapes

  def _apply_update(self, theta, opt_state, grads, step):
    grad = self.unravel(jnp.mean(grads, axis=0))
    updates, opt_state = self.optimizer.update(grad, opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    return theta, opt_state, step + 1, optax.global_norm(grad)

  def step(self, state: MetaState, *, prepared: bool = False) -> tuple[MetaState, dict]:
    """One outer step; returns the new state and host-side metrics.

    ``prepared``: the caller has just passed ``state`` through :meth:`prepare` (as
    ``meta_train`` does, to report a redraw), so the step does not check it again.
    """
    if not prepared:
      state, _ = self.prepare(state)
    step = int(state.step)
    pops = dict(state.populations)
    losses, grads, metrics = [], [], {}
    for i in self.active_tasks(step):
      sub = {g.name: pops[g.name] for g in self.groups[i]}
      loss, grad, sub, m, (keys, done) = self.program(i)(state.theta, sub, state.key,
                                                         state.step)
      names = [g.name for g in self.groups[i]]
      pops.update(zip(names, self.restart_program(i)(
          *self._restart_args(i, sub, keys, done, self._first_flag(False)))))
      losses.append(loss)
      grads.append(grad)
      for k, v in m.items():
        metrics[k] = metrics.get(k, 0) + v
    theta, opt_state, new_step, grad_norm = self._update(
        state.theta, state.opt_state, jnp.stack(grads), state.step)
    new = MetaState(theta, opt_state, pops, state.key, new_step)
    host = {k: _to_python(v) for k, v in metrics.items()}
    host.update(step=step + 1, meta_loss=float(np.mean([float(l) for l in losses])),
                grad_norm=float(grad_norm), log_lr=float(theta["log_lr"]),
                tasks=[self.tasks[i].name for i in self.active_tasks(step)])
    return new, host

  def _first_flag(self, first: bool) -> jax.Array:
    if self._not_first is None:
      self._not_first = shard_lib.global_array(np.bool_(False), self._rep)
    return self._not_first if not first else shard_lib.global_array(np.bool_(True),
                                                                    self._rep)

  def learned_optimizer(self, state: MetaState) -> metaopt.LearnedOptimizer:
    theta = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float32), state.theta)
    return metaopt.LearnedOptimizer(self.lo_config, theta)


_UPDATE = -1  # the update's entry in MetaTrainer._compiled_programs (tasks are >= 0)


def compile_all(lowered: list, workers: int | None = None) -> float:
  """Compiles lowered programs in parallel threads (XLA compiles outside the GIL);
  later calls of the same jitted functions reuse the executables. Returns seconds."""
  start = time.perf_counter()
  if not lowered:
    return 0.0
  workers = workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(lowered)))) as pool:
    list(pool.map(lambda low: low.compile(), lowered))
  return time.perf_counter() - start


def _group_key(key: jax.Array, name: str) -> jax.Array:
  """The key of a population's first episodes (from the run's base key)."""
  return jax.random.fold_in(jax.random.fold_in(key, 1_000_003), hash_name(name))


def hash_name(name: str) -> int:
  """A stable 31-bit integer for a string (Python's hash() is salted per process)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _to_python(v):
  a = np.asarray(v)
  return a.item() if a.ndim == 0 else a.tolist()
