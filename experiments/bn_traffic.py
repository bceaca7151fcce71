"""The memory traffic a training step's BatchNorm passes cannot avoid, and its time floor.

On a GPU, XLA runs convolutions as cuDNN calls and everything around them (BatchNorm
statistics, normalisation, ReLU, residual adds and their gradients) as separate
memory-bound fusions that read and write every activation. This counts the elements that
enter the network's BatchNorm layers (the encoder's, and the heads' few) for one image,
traced from the real network, and
turns them into the fewest bytes a step must move, and the time that takes at a given
memory bandwidth:

  online network (both views, forward and backward), per BN layer and element:
    forward: statistics read x; normalise reads x, writes y               3 passes
    backward: gradient sums read dy and x; dx reads dy and x, writes dx   5 passes
  target network (both views, forward only)                              3 passes

Each pass moves one element in the compute dtype. The ReLUs, residual adds and casts fuse
into these passes at best, so they add nothing to the floor. Real fusions run below peak
bandwidth, so a profile's BN/ReLU time is this floor divided by their efficiency.

  python experiments/bn_traffic.py --config=configs/byol.py:r50 --bandwidth_tbs=4.8
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from byol_jax import networks, train_step  # noqa: E402

ONLINE_PASSES, TARGET_PASSES = 3 + 5, 3


def bn_input_sizes(model_cfg: Any, image_size: int, dtype: Any = jnp.bfloat16) -> list[int]:
  """Elements per image entering each training-mode BatchNorm of the network, in order.

  Traced, not computed: nothing runs, and a change to the network changes the count.
  """
  net = networks.build_network(model_cfg, 10, dtype=dtype)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params, state = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), images, True))
  jaxpr = jax.make_jaxpr(lambda p, s, x: net.apply(p, s, None, x, True)[0])(
    params, state, images)
  return [int(np.prod(eqn.invars[0].aval.shape)) for eqn in _eqns(jaxpr.jaxpr)
          if _is_batch_norm(eqn)]


def _is_batch_norm(eqn: Any) -> bool:
  """A call of networks.batch_norm_train, the one custom-gradient op with three outputs
  (y, mean, var). The other, networks.stem_max_pool (one output), is what the ImageNet stem
  pools with when traced on a CPU; on a GPU the stem pools with hk.max_pool."""
  return eqn.primitive.name.startswith('custom_vjp_call') and len(eqn.outvars) == 3


def _eqns(jaxpr: Any):
  """Every equation of a jaxpr, nested ones (pjit, remat, custom rules) after their parent."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name.startswith('custom_vjp_call'):
      continue  # its body is the BN itself: no BN inside
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _eqns(inner)


def floor(cfg: Any, bandwidth_tbs: float) -> dict[str, float]:
  """Bytes per step and milliseconds at bandwidth_tbs (TB/s) for a config's training step."""
  dtype = train_step.precision_dtype(cfg.precision)
  sizes = bn_input_sizes(cfg.model, cfg.image_size, dtype)
  per_image = float(sum(sizes))
  views = 2 * cfg.batch_size
  itemsize = jnp.dtype(dtype).itemsize
  step_bytes = views * per_image * itemsize * (ONLINE_PASSES + TARGET_PASSES)
  return dict(bn_layers=len(sizes), elements_per_image=per_image, step_bytes=step_bytes,
              floor_ms=step_bytes / (bandwidth_tbs * 1e12) * 1e3)


def main(argv: list[str]) -> None:
  del argv
  cfg = _CONFIG.value
  f = floor(cfg, _BANDWIDTH.value)
  print(f"{cfg.preset}, {cfg.image_size} px, batch {cfg.batch_size}, {cfg.precision}: "
        f"{f['bn_layers']} BatchNorm layers, {f['elements_per_image'] / 1e6:.2f} M elements "
        f"per image; {f['step_bytes'] / 1e9:.1f} GB per step at the least "
        f"({ONLINE_PASSES} passes online, {TARGET_PASSES} target); "
        f"{f['floor_ms']:.1f} ms at {_BANDWIDTH.value:g} TB/s")


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/byol.py:r50', 'Run config.')
  _BANDWIDTH = flags.DEFINE_float('bandwidth_tbs', 4.8, 'Memory bandwidth, TB/s '
                                  '(H200: 4.8; H100 SXM: 3.35).')
  app.run(main)
