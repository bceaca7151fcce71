"""Runs two BYOL steps on 1 device and on all devices with the same global views.

Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8; prints the
largest differences as JSON so the test can assert on them.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_config  # noqa: E402

from byol_jax import train_step  # noqa: E402


def run(devices, cfg, views, loss):
  cfg.loss = loss
  # The InfoNCE runs also take the fused-views path, so its per-view BN statistics are
  # checked across devices too (with no extra compilation).
  cfg.fuse_views = loss == 'infonce'
  mesh = train_step.make_mesh(devices)
  fns = train_step.make_step_fns(cfg, 10, num_steps=10, steps_per_epoch=5)
  state = train_step.init_state(fns, jax.random.PRNGKey(0), (16, 16, 3))
  state = train_step.replicate(state, mesh)
  step = train_step.make_views_step(fns, mesh)
  history = []
  for v1, v2, labels in views:
    state, metrics = step(state, *train_step.shard_batch((v1, v2, labels), mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _leaf_diff(x, y):
  """Largest |x - y|; NaN where both are NaN counts as equal (the collapse signals of
  unlogged steps), NaN on one side only as infinitely far."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  both = np.isnan(x) & np.isnan(y)
  d = np.where(both, 0.0, np.abs(x - y))
  return float(np.max(np.where(np.isnan(d), np.inf, d)))


def max_diff(a, b):
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(_leaf_diff, a, b)))


def main():
  cfg = tiny_config()
  rng = np.random.default_rng(0)
  views = [(rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
            rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
            rng.integers(0, 10, size=16).astype(np.int32)) for _ in range(2)]
  # Step 2's labelled images are spread unevenly over the 8 shards of 2 rows (0, 0, 0, 0,
  # 1, 2, 2, 2), as STL-10's unlabelled-first order leaves them: the online probe must
  # still average over the global batch's labelled images.
  views[1][2][[0, 1, 2, 3, 4, 5, 6, 7, 9]] = -1
  out = {'num_devices': jax.device_count()}
  for loss in ('byol', 'infonce'):
    s1, m1 = run(jax.devices()[:1], cfg, views, loss)
    sn, mn = run(jax.devices(), cfg, views, loss)
    out[loss] = dict(
      params=max_diff(s1.online_params, sn.online_params),
      target=max_diff(s1.target_params, sn.target_params),
      bn_state=max_diff(s1.online_state, sn.online_state),
      opt=max_diff(s1.opt_state, sn.opt_state),
      metrics=max_diff(m1, mn),
      moved=max_diff(s1.online_params, train_step.init_state(
        train_step.make_step_fns(cfg, 10, 10, 5), jax.random.PRNGKey(0),
        (16, 16, 3)).online_params),
      metric_names=sorted(m1[0]),
      # log_every_steps=2: step 1 skips the collapse signals, step 2 computes them.
      rank_by_step=[float(m['proj_rank']) for m in mn])
  print(json.dumps(out))


if __name__ == '__main__':
  main()
