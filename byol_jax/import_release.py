"""Imports a checkpoint of the original JAX/Haiku release as a byol-jax run.

Why: the release's pretrained weights (`pretrain_res50x1.pkl`, 74.4% linear top-1 by its
README; `pretrain_res200x2.pkl`, 79.6%) are the paper's own networks. Imported, every
tool here works on them: the kNN eval worker, linear evaluation, fine-tuning, export to
PyTorch, features, and `--config.init_from` to train on from them.

    python -m byol_jax.import_release --pkl=pretrain_res50x1.pkl --workdir=runs/release_r50
    python -m byol_jax.main --config=configs/linear_eval.py:imagenet \\
        --workdir=runs/release_r50 --worker_mode=linear_eval

The pickle (written by the release with dill) holds `experiment_state` (online and
target parameters and BatchNorm states, optimiser state), `step` and `rng`. Its classes
come from the release's own package (`byol.*`) and dill, neither of which is needed here:
they load as plain tuples. Like any pickle, the file can run code when read: import only
the release's files, or others you trust. Parameter names are Haiku's for the release's
ResNet (`res_net50/~/block_group_0/~/block_0/~/conv_0`, ...) and heads
(`projector/linear`, ...); `release_to_byol_jax` maps them to this code's and checks every
shape. Only bottleneck ResNets (50 and deeper) import: the release's ResNet-18 and -34
have a projection shortcut in their first block, which this code's do not.

What the run holds: both networks, their BatchNorm statistics, and the release's online
classifier as the probe; a fresh optimiser state (the release's LARS state is not
carried). Its step is the preset's final step, so `--worker_mode=train` has nothing left to
train; `--config.init_from` starts new training from it. The heads' last layers have no
bias in the release, as in this code's presets (`model.head_output_bias`).
"""

from __future__ import annotations

import collections
import collections.abc
import os
import pickle
import re
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from byol_jax import checkpointing, cli, networks, optim, train_step

# Training images of ImageNet (TFDS imagenet2012 'train'), which the release pretrained on.
IMAGENET_TRAIN_EXAMPLES = 1_281_167
NUM_CLASSES = 1000


class ReleaseFormatError(ValueError):
  """The file is not a checkpoint of the release, or holds a network this code lacks."""


# ------------------------------------------------------------------------------ reading


class _ReleaseTuple(tuple):
  """Stands in for the release's own NamedTuples (`byol.*`): their fields, in order."""

  def __new__(cls, *args):
    return tuple.__new__(cls, args)


def _create_namedtuple(name: str, fields: Any, module: str, *rest: Any) -> type:
  """dill pickles NamedTuple classes as (name, fields, module); a plain namedtuple class
  with those fields reads them without importing the module."""
  del module, rest
  return collections.namedtuple(name.split('.')[-1], fields)


def _create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
  array = f(*args)
  array.__setstate__(state)
  return array


def _create_dtypemeta(scalar_type: Any) -> type:
  return np.dtype if scalar_type is None else type(np.dtype(scalar_type))


# dill's reconstructors that its pickles of these trees may name, by dill's signatures; any
# other dill name needs dill itself (the error says so).
_DILL_STANDINS = {'_create_namedtuple': _create_namedtuple, '_create_array': _create_array,
                  '_create_dtypemeta': _create_dtypemeta}


class _Unpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    if module == 'byol' or module.startswith('byol.'):
      return _ReleaseTuple
    if module.split('.')[0] == 'dill':
      try:
        return super().find_class(module, name)
      except ImportError:
        if name in _DILL_STANDINS:
          return _DILL_STANDINS[name]
        raise ReleaseFormatError(
          f'the pickle needs dill ({module}.{name}): pip install dill') from None
    if module.split('.')[0] == 'haiku' and name in ('FlatMapping', 'FlatMap'):
      try:  # old Haiku's params container, pickled as FlatMapping(dict); Haiku still reads it
        return super().find_class(module, name)
      except (ImportError, AttributeError):  # should a later Haiku drop it
        return lambda data: {k: dict(v) for k, v in dict(data).items()}
    return super().find_class(module, name)


def read_release_pickle(path: str) -> dict[str, Any]:
  """The release checkpoint's dict, its trees as plain dicts of numpy arrays."""
  try:
    with open(path, 'rb') as f:
      data = _Unpickler(f).load()
  except OSError as e:
    raise ReleaseFormatError(f'cannot read {path}: {e.strerror or e}') from None
  except Exception as e:  # noqa: BLE001 -- a file that is no pickle raises almost anything
    # (UnpicklingError, EOFError, ValueError, KeyError, IndexError, ...), by its first bytes
    raise ReleaseFormatError(f'{path} is not a readable release checkpoint: '
                             f'{" ".join(str(e).split())}') from None
  if not isinstance(data, dict) or 'experiment_state' not in data:
    raise ReleaseFormatError(f'{path} holds no experiment_state: not a checkpoint of the '
                             'release\'s pretraining')
  state = data['experiment_state']
  names = ('online_params', 'target_params', 'online_state', 'target_state')
  trees = {n: getattr(state, n, None) for n in names}
  if any(t is None for t in trees.values()):  # the stand-in tuple: fields by position
    fields = tuple(state)[:4] if isinstance(state, tuple) else ()
    if len(fields) < 4 or not all(isinstance(t, collections.abc.Mapping) for t in fields):
      raise ReleaseFormatError(f'{path}: its experiment_state is a {type(state).__name__}, '
                               'not the release\'s (online and target parameters and states '
                               'first): not a checkpoint of the release\'s pretraining')
    trees = dict(zip(names, fields, strict=True))
  return dict(**{n: networks.numpy_tree(t) for n, t in trees.items()},
              step=int(data.get('step', 0)))


# ------------------------------------------------------------------------------ names


_BLOCK = re.compile(r'^block_group_(\d+)/block_(\d+)/(conv|batchnorm|shortcut_conv|'
                    r'shortcut_batchnorm)(?:_(\d+))?$')
_HEAD = {'linear': 'linear_0', 'linear_1': 'linear_1', 'batch_norm': 'batch_norm'}
_EMAS = ('/mean_ema', '/var_ema')


def _plain_name(module: str) -> str:
  """Haiku writes `parent/~/child` for a sub-module made in the parent's __init__ and
  `parent/child` for one made in a method; which one the release's modules used is not
  what the mapping should hang on."""
  return module.replace('/~/', '/')


def _encoder_prefix(params: dict[str, Any]) -> str:
  prefixes = {_plain_name(m).rsplit('/', 1)[0] for m in params
              if _plain_name(m).endswith('/initial_conv')}
  if len(prefixes) != 1:
    raise ReleaseFormatError('no ResNet (an `initial_conv` module) among the parameters: '
                             f'{sorted(params)[:5]}...')
  return prefixes.pop()


def our_module(module: str, prefix: str) -> str | None:
  """This code's module for one of the release's (None: not part of the networks)."""
  name, ema = _plain_name(module), ''
  for suffix in _EMAS:
    if name.endswith(suffix):
      name, ema = name[:-len(suffix)], '/~' + suffix
  if name == 'classifier':
    return 'probe'
  head, _, rest = name.partition('/')
  if head in ('projector', 'predictor') and rest in _HEAD:
    return f'{head}/{_HEAD[rest]}{ema}'
  if not name.startswith(prefix + '/'):
    return None
  rest = name[len(prefix) + 1:]
  if rest == 'initial_conv':
    return 'encoder/stem_conv'
  if rest == 'initial_batchnorm':
    return f'encoder/~_bn/stem_bn{ema}'
  m = _BLOCK.match(rest)
  if not m:
    return None
  group, block, kind, index = m.groups()
  stem = f'stage_{group}_block_{block}_'
  stem += {'conv': f'conv_{index}', 'batchnorm': f'bn_{index}', 'shortcut_conv': 'shortcut_conv',
           'shortcut_batchnorm': 'shortcut_bn'}[kind]
  return f'encoder/~_block/{stem}' if 'conv' in kind else f'encoder/~_bn/{stem}{ema}'


def _rename(tree: dict[str, dict[str, np.ndarray]], prefix: str) -> dict[str, dict]:
  out, unknown = {}, []
  for module, values in tree.items():
    ours = our_module(module, prefix)
    if ours is None:
      unknown.append(module)
    else:
      out[ours] = dict(values)
  if unknown:
    raise ReleaseFormatError(f'modules this code has no place for: {", ".join(unknown[:3])}'
                             + (f' (and {len(unknown) - 3} more)' if len(unknown) > 3 else ''))
  return out


# ------------------------------------------------------------------------------ the model


def model_of(params: dict[str, Any]) -> dict[str, Any]:
  """Depth, width and head sizes of the release's network, read from its shapes."""
  prefix = _encoder_prefix(params)
  plain = {_plain_name(m): v for m, v in params.items()}
  blocks = collections.Counter()
  bottleneck = False
  for name in plain:
    m = _BLOCK.match(name[len(prefix) + 1:]) if name.startswith(prefix + '/') else None
    if m:
      blocks[int(m.group(1))] = max(blocks[int(m.group(1))], int(m.group(2)) + 1)
      bottleneck |= m.group(3) == 'conv' and m.group(4) == '2'
  layout = (tuple(blocks[g] for g in range(4)), bottleneck)
  depths = {(tuple(b), bn): d for d, (b, bn) in networks.RESNET_LAYOUTS.items()}
  if layout not in depths:
    kind = 'bottleneck' if bottleneck else 'basic'
    raise ReleaseFormatError(f'a ResNet with {kind} blocks {layout[0]} is not among this '
                             f'code\'s depths {sorted(networks.RESNET_LAYOUTS)}')
  try:
    return dict(depth=depths[layout], width=plain[f'{prefix}/initial_conv']['w'].shape[-1] / 64,
                projector_hidden=int(plain['projector/linear']['w'].shape[1]),
                projection_dim=int(plain['projector/linear_1']['w'].shape[1]),
                predictor_hidden=int(plain['predictor/linear']['w'].shape[1]),
                head_output_bias='b' in plain['projector/linear_1'])
  except KeyError as e:
    raise ReleaseFormatError(f'no {e.args[0]} parameters: not the release\'s BYOL '
                             'network') from None


def config_for(model: dict[str, Any]) -> Any:
  """The ImageNet preset of that depth and width (r50 with them set where none is)."""
  if cli.REPO not in sys.path:  # the checkout's presets: one source of the recipe
    sys.path.append(cli.REPO)
  from configs import byol
  name = next((n for n, (d, w) in byol.IMAGENET_PRESETS.items()
               if d == model['depth'] and w == model['width']), 'r50')
  cfg = byol.get_config(name)
  cfg.model.update(model)
  return cfg


def release_to_byol_jax(release: dict[str, Any], cfg: Any) -> train_step.TrainState:
  """The byol-jax TrainState of an imported release checkpoint (see the module docstring)."""
  prefix = _encoder_prefix(release['online_params'])
  source = {name: _rename(release[name], prefix) for name in
            ('online_params', 'online_state', 'target_params', 'target_state')}
  num_steps = optim.total_steps(cfg, IMAGENET_TRAIN_EXAMPLES)
  # Zeros are a fresh optimiser state (LARS's momentum and step count); every network
  # array is replaced below, so nothing needs a real initialisation (or a compilation).
  fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                 checkpointing.state_template(cfg, NUM_CLASSES))
  fresh = fresh._replace(rng=np.asarray(jax.random.PRNGKey(cfg.seed)))
  try:
    state = train_step.warm_start_state(fresh, train_step.TrainState(
      step=None, rng=None, opt_state=None, **source))
  except ValueError as e:
    raise ReleaseFormatError(f'the release\'s networks do not fit: {e}') from None
  probes = {}
  for field in ('online_params', 'target_params'):
    probe, ours = source[field].get('probe'), getattr(state, field)['probe']
    if probe is not None:
      if {k: np.shape(v) for k, v in probe.items()} != {k: np.shape(v) for k, v in ours.items()}:
        raise ReleaseFormatError(f'the release\'s classifier is not a {NUM_CLASSES}-class '
                                 'linear layer on the embedding')
      probes[field] = {**getattr(state, field), 'probe': probe}
  return state._replace(step=np.int32(num_steps), **probes)


def import_release(pkl: str, workdir: str) -> tuple[str, int, dict[str, Any]]:
  """Writes the release checkpoint `pkl` as a finished byol-jax run in `workdir`.

  Returns (preset, step written, model with the release's step). Refuses a workdir that
  already has checkpoints.
  """
  if checkpointing.finalised_steps(workdir):
    raise ReleaseFormatError(f'{workdir} already holds checkpoints; use a new --workdir')
  checkpointing.quiet_orbax_logs()
  size = os.path.getsize(pkl) / 2**30 if os.path.isfile(pkl) else 0.0
  logging.info('reading %s (%.2f GiB)', pkl, size)
  release = read_release_pickle(pkl)
  model = model_of(release['online_params'])
  cfg = config_for(model)
  state = release_to_byol_jax(release, cfg)
  logging.info('ResNet-%d x%g, %d online parameters, mapped onto the %s preset; writing the '
               'checkpoint', model['depth'], model['width'],
               networks.count_params(state.online_params), cfg.preset)
  num_steps = int(state.step)
  meta = dict(config=checkpointing.config_to_dict(cfg), num_classes=NUM_CLASSES,
              num_examples=IMAGENET_TRAIN_EXAMPLES, num_steps=num_steps,
              steps_per_epoch=optim.steps_per_epoch(IMAGENET_TRAIN_EXAMPLES, cfg.batch_size),
              num_devices=jax.device_count(), process_count=1, faults={},
              saved_at=time.time(), jax_version=jax.__version__,
              imported_from=pkl, release_step=release['step'])
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, keep=1, keep_every_steps=0,
                                    barrier_timeout_secs=600.0)
  ckpt.save(state, meta)
  ckpt.close()
  with open(f'{workdir}/config.json', 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  return cfg.preset, num_steps, {**model, 'release_step': release['step']}


def main() -> None:
  from absl import app, flags
  flags.DEFINE_string('pkl', None, 'The release checkpoint, e.g. pretrain_res50x1.pkl.')
  flags.DEFINE_string('workdir', None, 'New run directory to write it into.')
  flags.mark_flags_as_required(['pkl', 'workdir'])
  cli.validate_path_flag('pkl', 'pkl')
  cli.validate_path_flag('workdir')
  cli.quiet_startup_logs()
  app.run(lambda argv: sys.exit(_run(flags.FLAGS)), flags_parser=cli.parse_flags)


def _run(f: Any) -> int:
  try:
    preset, step, model = import_release(f.pkl, f.workdir)
  except (ReleaseFormatError, checkpointing.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'imported {f.pkl} into {f.workdir}: ResNet-{model["depth"]} x{model["width"]:g} '
        f'({preset} preset), saved at the release\'s step {model["release_step"]} as '
        f'checkpoint step {step}, the preset\'s last')
  return 0


if __name__ == '__main__':
  main()
