"""Exports a trained encoder for use outside this code base: NumPy `.npz` or PyTorch.

Only the encoder is exported (the projector, predictor and probe are training machinery);
by default the online encoder, the one BYOL keeps. Every export has a JSON sidecar (the
weights file's name plus `.json`) with what a user needs to feed it: depth, width, stem,
feature size, input size, eval crop fraction and the normalisation mean/std.

    python -m byol_jax.export --workdir=runs/demo --format=npz
    python -m byol_jax.export --workdir=runs/demo --format=torch --step=200 --network=target

`npz`: flat arrays keyed by Haiku path, `module/param`, e.g. `encoder/stem_conv/w` (HWIO)
and `encoder/~_bn/stem_bn/scale`; BN moving averages are the `.../~/mean_ema/*` and
`.../~/var_ema/*` entries (`average` is what inference uses). `load_npz` returns the params
and state that `networks.build_encoder(model_cfg).apply` takes.

`torch`: a torchvision-style ResNet `state_dict` (conv1, bn1, layer1.0.conv1, ...,
layerN.0.downsample.0/1, running_mean/var, num_batches_tracked; no fc), convs in OIHW.

Padding. Haiku's SAME padding is asymmetric whenever the padding total is odd: a stride-2
conv or max-pool on an even-sized input pads one more pixel at the bottom/right, while
torchvision pads k//2 on every side. Stride-1 convs and odd-sized inputs agree; at 224 px
every stride-2 layer differs. Two ways to run an export in PyTorch:

* Exact (features match the JAX encoder to float32 rounding): the module from this file,
      model = byol_jax.export.load_torch_export('encoder_online_step300.pt')
  or  model = torch_resnet(sidecar['model']); model.load_state_dict(torch.load(path))
  Its stride-2 convs and max-pool pad explicitly (F.pad) as SAME does. It takes NCHW
  float images, normalised as the sidecar says, and returns pooled features [B, D].
* Plain torchvision (slightly different features): for width 1, ImageNet stem,
      model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
      model.load_state_dict(torch.load(path))
  For the CIFAR stem also set `model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)` and
  `model.maxpool = nn.Identity()` before loading; depth 10 is
  `ResNet(BasicBlock, [1, 1, 1, 1])`. If the sidecar's `stem_relu` is false, also set
  `model.relu = nn.Identity()` (torchvision applies it only after `bn1`). Width
  multipliers other than 1 change every layer's channels, which torchvision's constructors
  cannot express: use `torch_resnet`.
  `torch_resnet(..., exact_padding=False)` builds this torchvision behaviour, to measure it.

The ResNet layout (v1.5: stride on the bottleneck's 3x3 conv; 1x1 conv + BN projection
shortcuts) is torchvision's, so only the padding differs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from byol_jax import cli, config_compat, networks

FORMATS = ('npz', 'torch')
NETWORKS = ('online', 'target')
EXTENSIONS = {'npz': '.npz', 'torch': '.pt'}
# Haiku's state modules of a BatchNorm: `<bn module>/~/mean_ema` and `.../~/var_ema`.
_EMA_SUFFIXES = ('/~/mean_ema', '/~/var_ema')
_BLOCK_LEAF = re.compile(r'stage_(\d+)_block_(\d+)_(conv|bn|shortcut_conv|shortcut_bn)(?:_(\d+))?')

Tree = Mapping[str, Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------
# Loading the encoder of a checkpoint.
# ---------------------------------------------------------------------------------------------


def encoder_of(train_state: Any, network: str = 'online') -> tuple[dict, dict]:
  """The (params, BN state) of one network's encoder, as NumPy, from a TrainState."""
  if network not in NETWORKS:
    raise ValueError(f'unknown network {network!r}; valid: {", ".join(NETWORKS)}')
  params = getattr(train_state, f'{network}_params')
  state = getattr(train_state, f'{network}_state')
  return tuple(networks.numpy_tree(networks.encoder_subtree(t)) for t in (params, state))


def load_encoder(workdir: str, step: int | None = None,
                 network: str = 'online') -> tuple[dict, dict, Any, int]:
  """(params, state, run config, step) of a finalised checkpoint; the latest by default."""
  from byol_jax import checkpointing  # local: only the workdir paths need Orbax
  train_state, cfg, step = checkpointing.load_state(workdir, step)
  params, state = encoder_of(train_state, network)
  return params, state, cfg, int(step)


# ---------------------------------------------------------------------------------------------
# The sidecar.
# ---------------------------------------------------------------------------------------------


def sidecar(cfg: Any, fmt: str, network: str, step: int | None) -> dict[str, Any]:
  """What a user of an export needs besides the weights, as plain JSON values."""
  arch = config_compat.setting(cfg.model, 'model.arch')
  if arch != 'resnet':  # another encoder's fields are its own: keep them all
    model, bottleneck = _plain_dict(cfg.model), None
  else:
    model = {k: cfg.model[k] for k in ('depth', 'width', 'cifar_stem', 'zero_init_last_bn',
                                       'bn_decay', 'bn_eps')}
    model['stem_relu'] = networks.stem_relu_of(cfg.model)
    bottleneck = networks.RESNET_LAYOUTS[model['depth']][1]
  model['arch'] = arch
  return dict(
    format=fmt, network=network, step=step, model=model, bottleneck=bottleneck,
    feature_dim=networks.encoder_feature_dim(cfg.model),
    image_size=int(cfg.image_size), eval_crop_fraction=float(cfg.eval_crop_fraction),
    mean=[float(v) for v in cfg.augment.mean], std=[float(v) for v in cfg.augment.std],
    input=('RGB in [0, 1], centre crop of eval_crop_fraction of the shorter side, resized to '
           'image_size, then (x - mean) / std; NHWC for npz (Haiku), NCHW for torch'),
    padding='Haiku SAME (asymmetric for stride 2 on even sizes); see byol_jax/export.py',
  )


def _plain_dict(section: Any) -> dict[str, Any]:
  """A config section as plain JSON values (tuples as lists), as the sidecar holds them."""
  return json.loads(json.dumps(section.to_dict() if hasattr(section, 'to_dict') else
                               dict(section)))


def sidecar_path(weights_path: str) -> str:
  return weights_path + '.json'  # per file: an npz and a torch export of one step coexist


def write_sidecar(weights_path: str, meta: Mapping[str, Any]) -> str:
  path = sidecar_path(weights_path)
  with open(path, 'w') as f:
    json.dump(dict(meta, weights=os.path.basename(weights_path)), f, indent=2)
  return path


def read_sidecar(weights_path: str) -> dict[str, Any]:
  with open(sidecar_path(weights_path)) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------
# NumPy export.
# ---------------------------------------------------------------------------------------------


def flatten(params: Tree, state: Tree) -> dict[str, np.ndarray]:
  """{'module/name': array} over params and BN state (their module paths never collide)."""
  flat = {}
  for tree in (params, state):
    for module, leaves in tree.items():
      for name, value in leaves.items():
        flat[f'{module}/{name}'] = np.asarray(value)
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """Inverse of `flatten`: EMA modules are state, everything else params."""
  params, state = {}, {}
  for key, value in flat.items():
    module, name = key.rsplit('/', 1)
    tree = state if module.endswith(_EMA_SUFFIXES) else params
    tree.setdefault(module, {})[name] = np.asarray(value)
  return params, state


def save_npz(path: str, params: Tree, state: Tree, meta: Mapping[str, Any]) -> str:
  """Writes the arrays and the sidecar; returns the weights path."""
  _makedirs_for(path)
  with open(path, 'wb') as f:  # a file object: np.savez would append .npz to other names
    np.savez(f, **flatten(params, state))
  write_sidecar(path, meta)
  return path


def load_npz(path: str) -> tuple[dict, dict, dict[str, Any]]:
  """(params, state, sidecar) of an npz export, ready for `networks.build_encoder`."""
  with np.load(path) as data:
    params, state = unflatten({k: data[k] for k in data.files})
  return params, state, read_sidecar(path)


def _makedirs_for(path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Haiku -> torchvision names and layouts (NumPy only).
# ---------------------------------------------------------------------------------------------


def torch_module_name(haiku_module: str) -> str:
  """'encoder/~_block/stage_1_block_0_conv_0' -> 'layer2.0.conv1', and so on."""
  leaf = [part for part in haiku_module.split('/') if not part.startswith('~')][-1]
  if leaf in ('stem_conv', 'stem_bn'):
    return {'stem_conv': 'conv1', 'stem_bn': 'bn1'}[leaf]
  match = _BLOCK_LEAF.fullmatch(leaf)
  if match is None:
    raise ValueError(f'not a ResNet encoder module: {haiku_module!r}')
  stage, block, kind, index = match.groups()
  prefix = f'layer{int(stage) + 1}.{block}'
  if kind.startswith('shortcut'):
    return f'{prefix}.downsample.{0 if kind == "shortcut_conv" else 1}'
  return f'{prefix}.{kind}{int(index) + 1}'


def torchvision_arrays(params: Tree, state: Tree) -> dict[str, np.ndarray]:
  """The encoder as a torchvision ResNet state_dict of NumPy arrays (no fc)."""
  out = {}
  for module, leaves in params.items():
    name = torch_module_name(module)
    if 'w' in leaves:
      out[f'{name}.weight'] = np.ascontiguousarray(np.transpose(leaves['w'], (3, 2, 0, 1)))
    else:
      out[f'{name}.weight'] = np.asarray(leaves['scale']).reshape(-1)
      out[f'{name}.bias'] = np.asarray(leaves['offset']).reshape(-1)
  for module, leaves in state.items():
    bn, ema = module.rsplit('/~/', 1)
    name = torch_module_name(bn)
    key = {'mean_ema': 'running_mean', 'var_ema': 'running_var'}[ema]
    out[f'{name}.{key}'] = np.asarray(leaves['average']).reshape(-1)
    if ema == 'mean_ema':
      out[f'{name}.num_batches_tracked'] = np.asarray(leaves['counter'], np.int64)
  return out


# ---------------------------------------------------------------------------------------------
# PyTorch (imported only here, so the rest of the package never needs it).
# ---------------------------------------------------------------------------------------------


def torch_state_dict(params: Tree, state: Tree) -> dict[str, Any]:
  """`torchvision_arrays` as torch tensors, in torchvision's key order."""
  import torch
  arrays = torchvision_arrays(params, state)
  return {k: torch.from_numpy(np.array(arrays[k])) for k in sorted(arrays, key=_torch_order)}


def _torch_order(key: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in re.split(r'(\d+)', key))


def save_torch(path: str, params: Tree, state: Tree, meta: Mapping[str, Any]) -> str:
  """torch.save of the state_dict plus the sidecar; returns the weights path."""
  import torch
  _makedirs_for(path)
  torch.save(torch_state_dict(params, state), path)
  write_sidecar(path, meta)
  return path


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """(before, after) padding of TensorFlow/Haiku SAME; the extra pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def torch_resnet(model: Any, exact_padding: bool = True):
  """A torch.nn.Module with torchvision's ResNet names that computes this encoder.

  `model` is the run's `cfg.model` or a sidecar's `model` dict (depth, width, cifar_stem,
  bn_eps, bn_decay, stem_relu). In eval mode it returns the pooled features of NCHW normalised
  images. `exact_padding=False` gives torchvision's symmetric padding instead.
  """
  return _torch_classes().ResNet(model, exact_padding)


def load_torch_export(path: str, exact_padding: bool = True):
  """The exact torch module of a `--format=torch` export, weights loaded, in eval mode."""
  import torch
  module = torch_resnet(read_sidecar(path)['model'], exact_padding)
  module.load_state_dict(torch.load(path, map_location='cpu'))
  return module.eval()


@functools.cache
def _torch_classes():
  """Defines the torch modules on first use: importing this file never imports torch."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  class SameConv2d(nn.Conv2d):
    """Conv2d (no bias) with SAME padding computed from the input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
      super().__init__(cin, cout, kernel, stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      (kh, kw), (sh, sw) = self.kernel_size, self.stride
      top, bottom = same_padding(x.shape[-2], kh, sh)
      left, right = same_padding(x.shape[-1], kw, sw)
      return super().forward(F.pad(x, (left, right, top, bottom)))

  class SameMaxPool2d(nn.MaxPool2d):
    """3x3/2 max-pool with SAME padding (padded with -inf, as Haiku's reduce_window)."""

    def __init__(self):
      super().__init__(3, 2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      top, bottom = same_padding(x.shape[-2], 3, 2)
      left, right = same_padding(x.shape[-1], 3, 2)
      return super().forward(F.pad(x, (left, right, top, bottom), value=-math.inf))

  def conv(cin, cout, kernel, stride, exact):
    if exact and stride > 1:  # at stride 1 (odd kernels) SAME is symmetric: k // 2
      return SameConv2d(cin, cout, kernel, stride)
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)

  class Block(nn.Module):
    """torchvision's BasicBlock (two 3x3) or Bottleneck (1x1, 3x3 with the stride, 1x1)."""

    def __init__(self, cin, channels, stride, bottleneck, project, bn, exact):
      super().__init__()
      cout = channels * 4 if bottleneck else channels
      if bottleneck:
        specs = ((cin, channels, 1, 1), (channels, channels, 3, stride), (channels, cout, 1, 1))
      else:
        specs = ((cin, channels, 3, stride), (channels, cout, 3, 1))
      self.depth = len(specs)
      for i, (a, b, k, s) in enumerate(specs, start=1):
        setattr(self, f'conv{i}', conv(a, b, k, s, exact))
        setattr(self, f'bn{i}', bn(b))
      self.relu = nn.ReLU(inplace=True)
      self.downsample = nn.Sequential(conv(cin, cout, 1, stride, exact), bn(cout)) if project \
        else None

    def forward(self, x):
      shortcut = x if self.downsample is None else self.downsample(x)
      for i in range(1, self.depth + 1):
        x = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x))
        if i < self.depth:
          x = self.relu(x)
      return self.relu(x + shortcut)

  class ResNet(nn.Module):
    """The BYOL encoder (ResNet v1 with a width multiplier), torchvision's names, no fc."""

    def __init__(self, model, exact_padding=True):
      super().__init__()
      blocks, bottleneck = networks.RESNET_LAYOUTS[int(model['depth'])]
      width = float(model['width'])
      eps, momentum = float(model['bn_eps']), 1.0 - float(model['bn_decay'])
      bn = lambda c: nn.BatchNorm2d(c, eps=eps, momentum=momentum)
      stem = _scaled(64, width)
      cifar = model['cifar_stem']
      self.conv1 = conv(3, stem, 3 if cifar else 7, 1 if cifar else 2, exact_padding)
      self.bn1 = bn(stem)
      self.relu = nn.ReLU(inplace=True) if networks.stem_relu_of(model) else nn.Identity()
      if cifar:
        self.maxpool = nn.Identity()
      else:
        self.maxpool = SameMaxPool2d() if exact_padding else nn.MaxPool2d(3, 2, 1)
      cin = stem
      for stage, num_blocks in enumerate(blocks):
        channels = _scaled(64 * 2**stage, width)
        layer = []
        for b in range(num_blocks):
          stride = 2 if (stage > 0 and b == 0) else 1
          project = b == 0 and (stage > 0 or bottleneck or stem != channels)
          layer.append(Block(cin, channels, stride, bottleneck, project, bn, exact_padding))
          cin = channels * 4 if bottleneck else channels
        setattr(self, f'layer{stage + 1}', nn.Sequential(*layer))
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.feature_dim = cin

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      for stage in range(1, 5):
        x = getattr(self, f'layer{stage}')(x)
      return torch.flatten(self.avgpool(x), 1)

  return types.SimpleNamespace(ResNet=ResNet, SameConv2d=SameConv2d, SameMaxPool2d=SameMaxPool2d)


def _scaled(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def default_output(workdir: str, fmt: str, network: str, step: int) -> str:
  return os.path.join(workdir, 'export', f'encoder_{network}_step{step}{EXTENSIONS[fmt]}')


def export(workdir: str, fmt: str = 'npz', step: int | None = None, network: str = 'online',
           output: str | None = None) -> str:
  """Exports one checkpoint's encoder; returns the weights path (the sidecar is beside it)."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}; valid: {", ".join(FORMATS)}')
  if fmt == 'torch':
    _require_torch()
  params, state, cfg, step = load_encoder(workdir, step, network)
  arch = config_compat.setting(cfg.model, 'model.arch')
  if fmt == 'torch' and arch != 'resnet':
    raise ValueError(f'--format=torch writes torchvision ResNets; this run\'s encoder is '
                     f'model.arch={arch!r}: use --format=npz')
  path = output or default_output(workdir, fmt, network, step)
  if path.endswith(os.sep) or os.path.isdir(path):  # a folder: the default name inside it
    path = os.path.join(path, os.path.basename(default_output(workdir, fmt, network, step)))
  meta = sidecar(cfg, fmt, network, step)
  save = save_npz if fmt == 'npz' else save_torch
  try:
    return save(path, params, state, meta)
  except (OSError, RuntimeError) as e:  # torch.save reports an unwritable path as RuntimeError
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    raise OSError(f'cannot write {path}: {reason}') from None


def _require_torch() -> None:
  try:
    import torch  # noqa: F401
  except ImportError:
    raise ValueError('--format=torch needs PyTorch: pip install torch') from None


def main() -> None:
  """`python -m byol_jax.export`; flags are defined here, so importing defines none."""
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Run directory with checkpoints.')
  flags.DEFINE_enum('format', 'npz', FORMATS, 'npz (Haiku paths) or torch (torchvision).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; the latest finalised one by default.')
  flags.DEFINE_enum('network', 'online', NETWORKS, 'Which encoder to export.')
  flags.DEFINE_string('output', None, 'Weights path, or a folder for the default file name; '
                      'default WORKDIR/export/encoder_*.')
  cli.validate_path_flag('workdir')
  cli.validate_path_flag('output', 'output')
  cli.quiet_startup_logs()
  app.run(lambda argv: sys.exit(_run(flags.FLAGS)), flags_parser=cli.parse_flags)


def _run(f: Any) -> int:
  from absl import logging

  from byol_jax import checkpointing
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO; -v 0 shows it
  if not f.workdir:
    return _fail('--workdir is required')
  if message := cli.missing_dir_error(f.workdir):
    return _fail(message)
  try:
    path = export(f.workdir, f.format, f.step, f.network, f.output)
  except KeyError as e:
    return _fail(str(e).strip('"\''))  # a KeyError's text comes quoted
  except (ValueError, OSError, checkpointing.CheckpointError) as e:
    return _fail(str(e))
  print(f'exported the {f.network} encoder to {path} (sidecar {sidecar_path(path)})')
  return 0


def _fail(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


if __name__ == '__main__':
  main()
