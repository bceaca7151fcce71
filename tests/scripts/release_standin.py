"""Writes a stand-in for a checkpoint of the original release, and reference features.

    python tests/scripts/release_standin.py DEPTH OUT_DIR   (DEPTH: 18, 50 or 200)

The networks are built the way the release builds them, from Haiku's own modules (Haiku
names them: `res_net50/~/block_group_0/~/block_0/~/conv_0`, `projector/linear`, ...):
a 7x7/2 stem conv, BatchNorm, ReLU, 3x3/2 max-pool, hk.nets.ResNet.BlockGroup x 4 with
projection shortcuts, mean pooling; MLP heads whose last layer has no bias; a classifier.
BatchNorm parameters and moving averages are randomised, so inference depends on them.

The pickle is written as the release's dill pickle is laid out: the state is a NamedTuple
of the release's package (`byol.byol_experiment._ByolExperimentState`) whose class is
pickled as dill does (`dill._dill._create_namedtuple(name, fields, module)`), Haiku trees
as old Haiku's `FlatMapping(dict)`, arrays as numpy arrays. Fake `byol` and `dill` modules
exist only in this process, so the reader has neither, as a user's machine would not.
OUT_DIR gets release.pkl and reference.npz (images, and the Haiku network's inference
embedding and classifier logits on them).
"""

import collections
import pickle
import sys
import types
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from haiku._src import data_structures

LAYOUTS = {18: ((2, 2, 2, 2), False, (64, 128, 256, 512)),
           50: ((3, 4, 6, 3), True, (256, 512, 1024, 2048)),
           200: ((3, 24, 36, 3), True, (256, 512, 1024, 2048))}
BN = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)


class _Torso(hk.Module):
  """Sub-modules made in __init__, as the release's ResNetTorso makes them, so Haiku names
  them `res_net50/~/initial_conv` (the heads make theirs in __call__: `projector/linear`)."""
  layout, width = None, 1

  def __init__(self):
    super().__init__()
    blocks, bottleneck, channels = self.layout
    channels = [c * self.width for c in channels]
    self.conv = hk.Conv2D(64 * self.width, 7, stride=2, with_bias=False, padding='SAME',
                          name='initial_conv')
    self.bn = hk.BatchNorm(name='initial_batchnorm', **BN)
    self.groups = [hk.nets.ResNet.BlockGroup(
      channels=channels[i], num_blocks=blocks[i], stride=(1, 2, 2, 2)[i], bn_config=BN,
      resnet_v2=False, bottleneck=bottleneck, use_projection=True, name=f'block_group_{i}')
      for i in range(4)]

  def __call__(self, x, is_training):
    x = jax.nn.relu(self.bn(self.conv(x), is_training))
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    for group in self.groups:
      x = group(x, is_training, False)
    return jnp.mean(x, axis=(1, 2))


class _MLP(hk.Module):
  def __init__(self, hidden, out, name):
    super().__init__(name=name)
    self.hidden, self.out = hidden, out

  def __call__(self, x, is_training):
    x = hk.Linear(self.hidden, with_bias=True)(x)
    x = jax.nn.relu(hk.BatchNorm(**BN)(x, is_training))
    return hk.Linear(self.out, with_bias=False)(x)


def build(depth, width=1):
  """The release's network (heads 64 wide, 32 out) as a Haiku transform."""
  torso = type(f'ResNet{depth}', (_Torso,), {'layout': LAYOUTS[depth], 'width': width})

  def forward(images, is_training):
    embedding = torso()(images, is_training)
    projection = _MLP(64, 32, 'projector')(embedding, is_training)
    _MLP(64, 32, 'predictor')(projection, is_training)
    return embedding, hk.Linear(1000, name='classifier')(embedding)

  return hk.transform_with_state(forward)


def randomise(tree, rng, names):
  """Random values for the leaves named in `names` (scale, offset, average): BatchNorm's
  defaults (1, 0, 0) would hide a mix-up of its parameters or statistics."""
  out = {}
  for module, values in tree.items():
    out[module] = {}
    for name, leaf in values.items():
      dtype = np.asarray(leaf).dtype
      if name in names:
        positive = name == 'scale' or (name == 'average' and module.endswith('var_ema'))
        leaf = (rng.uniform(0.5, 1.5, np.shape(leaf)) if positive
                else rng.normal(0, 0.1, np.shape(leaf)))
      out[module][name] = np.asarray(leaf, dtype)
  return out


def fake_release_modules():
  """`byol.byol_experiment._ByolExperimentState` and `dill._dill._create_namedtuple`."""
  class _ByolExperimentState(NamedTuple):
    online_params: dict
    target_params: dict
    online_state: dict
    target_state: dict
    opt_state: tuple

  experiment = types.ModuleType('byol.byol_experiment')
  _ByolExperimentState.__module__ = experiment.__name__
  _ByolExperimentState.__qualname__ = '_ByolExperimentState'
  experiment._ByolExperimentState = _ByolExperimentState
  dill = types.ModuleType('dill._dill')

  def _create_namedtuple(name, fieldnames, modulename):
    return collections.namedtuple(name, fieldnames)

  _create_namedtuple.__module__ = dill.__name__
  _create_namedtuple.__qualname__ = '_create_namedtuple'
  dill._create_namedtuple = _create_namedtuple
  sys.modules.update({'byol': types.ModuleType('byol'), experiment.__name__: experiment,
                      'dill': types.ModuleType('dill'), dill.__name__: dill})
  return _ByolExperimentState, _create_namedtuple


class _DillLikePickler(pickle.Pickler):
  create_namedtuple = None

  def reducer_override(self, obj):
    if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, '_fields'):
      return type(self).create_namedtuple, (obj.__qualname__, obj._fields, obj.__module__)
    if isinstance(obj, _HaikuTree):
      return data_structures.FlatMapping, ({k: dict(v) for k, v in obj.items()},)
    return NotImplemented


class _HaikuTree(dict):
  """A Haiku params/state dict, pickled as old Haiku's FlatMapping (the pickler's
  reducer_override never sees plain dicts)."""


def main(depth, out_dir):
  net = build(depth)
  rng = np.random.default_rng(depth)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  # Jitted whole: eagerly, each of the network's few hundred ops compiles on its own (~4x slower).
  init = jax.jit(lambda key, x: net.init(key, x, is_training=True))
  infer = jax.jit(lambda params, state, x: net.apply(params, state, None, x, is_training=False)[0])
  trees = {}
  for name, seed in (('online', 0), ('target', 1)):
    params, state = init(jax.random.PRNGKey(seed), images)
    params = randomise(params, rng, ('scale', 'offset'))
    state = randomise(state, rng, ('average',))
    trees[name] = params, state
  embedding, logits = infer(*trees['online'], images)
  state_cls, create = fake_release_modules()
  _DillLikePickler.create_namedtuple = staticmethod(create)
  experiment_state = state_cls(
    online_params=_HaikuTree(trees['online'][0]), target_params=_HaikuTree(trees['target'][0]),
    online_state=_HaikuTree(trees['online'][1]), target_state=_HaikuTree(trees['target'][1]),
    opt_state=(np.zeros(3, np.float32),))
  with open(f'{out_dir}/release.pkl', 'wb') as f:
    _DillLikePickler(f, protocol=2).dump(dict(experiment_state=experiment_state, step=1234,
                                              rng=np.zeros(2, np.uint32)))
  np.savez(f'{out_dir}/reference.npz', images=images, embedding=np.asarray(embedding),
           logits=np.asarray(logits))


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2])
