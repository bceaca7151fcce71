"""Haiku networks for BYOL: ResNet v1 encoders, projector/predictor MLPs, the online probe.

Everything here is a pure function once wrapped by `hk.transform_with_state`; the only
state is BatchNorm's moving averages. BatchNorm statistics are averaged across devices
through `axis_name` (the training step's named mesh axis), as the paper's cross-replica BN.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from byol_jax import config_compat

# Blocks per stage and whether the stage uses bottleneck blocks, per ResNet depth.
# depth 10 is a tiny variant used only by the CPU demo.
RESNET_LAYOUTS: Mapping[int, tuple[Sequence[int], bool]] = {
  10: ((1, 1, 1, 1), False),
  18: ((2, 2, 2, 2), False),
  34: ((3, 4, 6, 3), False),
  50: ((3, 4, 6, 3), True),
  101: ((3, 4, 23, 3), True),
  152: ((3, 8, 36, 3), True),
  200: ((3, 24, 36, 3), True),
}
NORM_KINDS = ('batchnorm', 'layernorm', 'none')
# Parameter names of BatchNorm and LayerNorm; they stay float32 and are excluded from LARS.
NORM_PARAM_NAMES = ('scale', 'offset')


def _batch_norm(
  x: jax.Array, is_training: bool, axis_name: str | None, decay: float, eps: float,
  scale_init: hk.initializers.Initializer | None = None, name: str | None = None,
  groups: int = 1,
) -> jax.Array:
  """BatchNorm computed in float32 whatever the compute dtype, so bf16 keeps exact stats.

  `groups` > 1 splits the batch into that many equal consecutive groups (the views of one
  fused pass), each normalised by its own statistics, as separate calls would be.
  """
  bn = _BatchNorm(
    create_scale=True, create_offset=True, decay_rate=decay, eps=eps,
    scale_init=scale_init, cross_replica_axis=axis_name if is_training else None,
    name=name or 'batch_norm')
  return bn(x, is_training=is_training, groups=groups)


class _BatchNorm(hk.BatchNorm):
  """hk.BatchNorm (same parameters, state and float32 maths) whose training-mode backward
  pass keeps the input in the compute dtype, and which can normalise groups of the batch
  separately.

  Why: differentiating hk.BatchNorm applied to x.astype(float32) saves a float32 copy of
  every normalised activation for the backward pass (twice the bytes of the bf16
  activation, written in the forward pass and read back), and the BN and ReLU passes, not
  the convolutions, held most of a bf16 ResNet-50 step's time in the H200 profile of
  2026-11-26. `batch_norm_train` saves the bf16 input and recomputes x - mean in the backward.
  Groups let the step run both views through one call (half the kernel launches, twice the
  batch per convolution) and keep the release's per-view statistics; the moving averages
  take the groups' statistics in order, exactly as consecutive calls update them.
  """

  def __call__(self, inputs: jax.Array, is_training: bool,  # type: ignore[override]
               groups: int = 1) -> jax.Array:
    if not is_training:
      return super().__call__(inputs.astype(jnp.float32), is_training=False).astype(inputs.dtype)
    shape = (1,) * (inputs.ndim - 1) + (inputs.shape[-1],)
    scale = hk.get_parameter('scale', shape, jnp.float32, self.scale_init)
    offset = hk.get_parameter('offset', shape, jnp.float32, self.offset_init)
    y, mean, var = batch_norm_train(inputs, scale, offset, self.eps, self.cross_replica_axis,
                                    groups)
    for g in range(groups):
      self.mean_ema(jax.lax.stop_gradient(mean[g]))
      self.var_ema(jax.lax.stop_gradient(var[g]))
    return y


def _grouped(x: jax.Array, groups: int) -> jax.Array:
  """[N, ...] -> [groups, N / groups, ...]."""
  if x.shape[0] % groups:
    raise ValueError(f'a batch of {x.shape[0]} does not split into {groups} equal groups')
  return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


def _bn_axes(x: jax.Array, groups: int) -> tuple[int, ...]:
  """The reduced axes: all but the channels, and but the group axis of a grouped input."""
  return tuple(range(1 if groups > 1 else 0, x.ndim - 1))


def _bn_statistics(x32: jax.Array, axis_name: str | None,
                   groups: int) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and variance (E[x^2] - E[x]^2, as hk.BatchNorm), keepdims; per group
  of a grouped [G, n, ..., C] input."""
  axes = _bn_axes(x32, groups)
  mean = jnp.mean(x32, axes, keepdims=True)
  mean_of_squares = jnp.mean(jnp.square(x32), axes, keepdims=True)
  if axis_name:
    mean = jax.lax.pmean(mean, axis_name)
    mean_of_squares = jax.lax.pmean(mean_of_squares, axis_name)
  return mean, mean_of_squares - jnp.square(mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, offset: jax.Array, eps: float,
                     axis_name: str | None = None,
                     groups: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over all axes but the last: (y in x.dtype, mean, var).

  Float32 statistics and normalisation, as hk.BatchNorm on x.astype(float32) computes them,
  with the statistics averaged over `axis_name`. With `groups` > 1 each of that many equal
  consecutive slices of the batch gets its own statistics. The gradient is BatchNorm's
  closed form, computed from the input saved in its own dtype. mean and var, one per group
  along a new leading axis ([groups, 1, ..., 1, C]), are for the moving averages: their
  cotangents are ignored, so callers stop their gradient (as _BatchNorm does).
  """
  return _bn_forward(x, scale, offset, eps, axis_name, groups)[0]


def _bn_forward(x, scale, offset, eps, axis_name, groups):
  # One group keeps the plain layout: a leading axis of 1 changed XLA's fusions (CPU, 2026-11-27).
  xg = _grouped(x, groups) if groups > 1 else x
  x32 = xg.astype(jnp.float32)
  mean, var = _bn_statistics(x32, axis_name, groups)
  rstd = jax.lax.rsqrt(var + jnp.float32(eps))
  y = ((x32 - mean) * (scale * rstd) + offset).astype(x.dtype).reshape(x.shape)
  stats = (mean, var) if groups > 1 else (mean[None], var[None])
  return (y, *stats), (xg, mean, rstd, scale)


def _bn_backward(eps, axis_name, groups, residuals, cotangents):
  """dx = scale * rstd * (dy - E[dy] - xhat * E[dy * xhat]), the expectations over each
  group of the global batch (pmean over `axis_name`, as the transpose of the forward's
  pmean gives); d scale and d offset are this device's sums, as autodiff of hk.BatchNorm
  gives."""
  del eps
  xg, mean, rstd, scale = residuals
  dy = (_grouped(cotangents[0], groups) if groups > 1 else cotangents[0]).astype(jnp.float32)
  axes = _bn_axes(xg, groups)
  xhat = (xg.astype(jnp.float32) - mean) * rstd
  sum_dy = jnp.sum(dy, axes, keepdims=True)
  sum_dy_xhat = jnp.sum(dy * xhat, axes, keepdims=True)
  count = float(np.prod([xg.shape[a] for a in axes]))
  mean_dy, mean_dy_xhat = sum_dy / count, sum_dy_xhat / count
  if axis_name:
    mean_dy = jax.lax.pmean(mean_dy, axis_name)
    mean_dy_xhat = jax.lax.pmean(mean_dy_xhat, axis_name)
  dx = (scale * rstd) * (dy - mean_dy - xhat * mean_dy_xhat)
  if groups == 1:
    return dx.astype(xg.dtype), sum_dy_xhat, sum_dy
  x_shape = (xg.shape[0] * xg.shape[1], *xg.shape[2:])
  return (dx.astype(xg.dtype).reshape(x_shape), jnp.sum(sum_dy_xhat, 0).reshape(scale.shape),
          jnp.sum(sum_dy, 0).reshape(scale.shape))


batch_norm_train.defvjp(_bn_forward, _bn_backward)


@jax.custom_vjp
def stem_max_pool(x: jax.Array) -> jax.Array:
  """3x3 max-pool, stride 2, SAME padding over [B, H, W, C]: the ImageNet stem's, as
  hk.max_pool computes it.

  Only the gradient differs in how it is computed, not in value: each window's gradient
  goes to the first maximum in row-major window order, as XLA's select-and-scatter does
  (after the ReLU, all-zero windows are common, so the tie rule matters). Written as nine
  strided selections that XLA fuses into one element-wise pass. Faster on a CPU, slower on
  a GPU, so `_stem_pool` picks it on CPUs only (docs/performance.md, 2026-11-27): the demo
  step took 251 ms with it and 282 ms with autodiff's scatter (2-core CPU); on an H200 its
  fusion (the ReLU's gradient included) took 6.1 ms of the ResNet-50 bf16 step at 0.45
  TB/s, against 2.5 ms for the scatter, because it recomputes the stem's BatchNorm and ReLU
  for every window element it tests.
  """
  return _max_pool_forward(x)[0]


_POOL = ((1, 3, 3, 1), (1, 2, 2, 1))  # Window and strides, NHWC.


def _pool_pads(x: jax.Array) -> list[tuple[int, int]]:
  return jax.lax.padtype_to_pads(x.shape, _POOL[0], _POOL[1], 'SAME')


def _max_pool_forward(x):
  y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, _POOL[0], _POOL[1], 'SAME')
  return y, (x, y)


def _max_pool_backward(residuals, dy):
  x, y = residuals
  pads = _pool_pads(x)
  padded = jnp.pad(x, pads, constant_values=-jnp.inf)
  height, width = padded.shape[1:3]
  out_h, out_w = y.shape[1:3]
  zero = jnp.zeros((), dy.dtype)
  dx, taken = None, jnp.zeros(y.shape, bool)
  for a in range(3):
    for b in range(3):
      rows = slice(a, a + 2 * (out_h - 1) + 1, 2)
      cols = slice(b, b + 2 * (out_w - 1) + 1, 2)
      first = (padded[:, rows, cols] == y) & ~taken
      taken = taken | first
      # Back onto the padded grid at stride 2 (interior padding), not a scatter.
      placed = jax.lax.pad(jnp.where(first, dy, zero), zero, (
        (0, 0, 0), (a, height - a - 2 * out_h + 1, 1), (b, width - b - 2 * out_w + 1, 1),
        (0, 0, 0)))
      dx = placed if dx is None else dx + placed
  (_, _), (top, _), (left, _), (_, _) = pads
  return (dx[:, top:top + x.shape[1], left:left + x.shape[2]],)


stem_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def _stem_pool(x: jax.Array) -> jax.Array:
  """The stem's max-pool, with the gradient that measured faster on the backend in use."""
  if jax.default_backend() == 'cpu':
    return stem_max_pool(x)
  return hk.max_pool(x, window_shape=_POOL[0], strides=_POOL[1], padding='SAME')


def _norm(kind: str, x: jax.Array, is_training: bool, axis_name: str | None, bn_decay: float,
          bn_eps: float, groups: int = 1) -> jax.Array:
  if kind == 'batchnorm':
    return _batch_norm(x, is_training, axis_name, bn_decay, bn_eps, groups=groups)
  if kind == 'layernorm':
    ln = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)
    return ln(x.astype(jnp.float32)).astype(x.dtype)
  if kind == 'none':
    return x
  raise ValueError(f'unknown norm {kind!r}; valid: {", ".join(NORM_KINDS)}')


# How conv and linear layers are initialised (`model.weight_init`):
# - 'release': the BYOL release's, which passes no initialiser, so Haiku's defaults: a
#   truncated normal (cut at 2 std, so its std is 0.88x) of std 1/sqrt(fan_in) for
#   convolutions and linear layers, zero biases;
# - 'he_fan_out': He normal (fan_out, truncated) convolutions, linear layers as 'release':
#   what 'release' built before 2026-11-29 (so runs recorded before then with 'release'),
#   about 1.6x the release's 3x3 convolutions;
# - 'pytorch': PyTorch's layer defaults (kaiming_uniform with a=sqrt(5)): weights and biases
#   U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in PyTorch recipes that keep them (lightly's
#   CIFAR-10 ResNet). Convolutions start about 1.5x smaller than 'release' and 2.4x smaller
#   than 'he_fan_out'. That matters under plain SGD: a weight followed by BatchNorm (or by
#   the loss's normalisation) is scale-invariant, so its effective learning rate is
#   LR / |w|^2. LARS's trust ratio cancels the scale, except where `trust_clip` falls back
#   to SGD's step.
WEIGHT_INITS = ('release', 'he_fan_out', 'pytorch')


def _config_weight_init(model_cfg: Any) -> str:
  """The config's weight_init, checked; configs saved before the option have none: release."""
  kind = config_compat.setting(model_cfg, 'model.weight_init')
  _check_weight_init(kind)
  return kind


def head_output_bias_of(model: Any) -> bool:
  """A model config's head_output_bias; configs saved before the option: True."""
  return bool(config_compat.setting(model, 'model.head_output_bias'))


def stem_relu_of(model: Any) -> bool:
  """A model config's (or export sidecar's) stem_relu; those saved before the option: True."""
  return bool(config_compat.setting(model, 'model.stem_relu'))


def _check_weight_init(kind: str) -> None:
  if kind not in WEIGHT_INITS:
    raise ValueError(f'unknown weight_init {kind!r}; valid: {", ".join(WEIGHT_INITS)}')


def _pytorch_uniform() -> hk.initializers.Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in)."""
  return hk.initializers.VarianceScaling(1.0 / 3.0, 'fan_in', 'uniform')


def _conv(channels: int, kernel: int, stride: int, name: str,
          weight_init: str = 'release') -> hk.Conv2D:
  init = {'pytorch': _pytorch_uniform(), 'release': None,  # None: Haiku's default
          'he_fan_out': hk.initializers.VarianceScaling(2.0, 'fan_out', 'truncated_normal'),
          }[weight_init]
  return hk.Conv2D(channels, kernel, stride=stride, with_bias=False, padding='SAME',
                   w_init=init, name=name)


def _linear(size: int, fan_in: int, name: str, weight_init: str = 'release',
            with_bias: bool = True) -> hk.Linear:
  if weight_init == 'pytorch':
    bound = 1.0 / np.sqrt(fan_in)
    return hk.Linear(size, with_bias=with_bias, w_init=_pytorch_uniform(),
                     b_init=hk.initializers.RandomUniform(-bound, bound), name=name)
  return hk.Linear(size, with_bias=with_bias, name=name)


class ResNet(hk.Module):
  """ResNet v1 with a width multiplier on the stem and every stage.

  `cifar_stem` swaps the 7x7/2 conv + max-pool for a single 3x3/1 conv, the usual variant
  for 32 px images. `zero_init_last_bn` zero-initialises each block's last BN scale, which
  the original release did for stability (the paper's runs did not). `bn_groups` splits
  the batch into that many groups with their own BatchNorm statistics (see _BatchNorm).
  `stem_relu=False` drops the ReLU after the stem's BatchNorm, as lightly's CIFAR-10
  benchmark does by accident (its backbone is the ResNet's child modules, and the stem's
  ReLU lives in `forward`); the parameters are the same either way.
  """

  def __init__(self, depth: int, width: float = 1.0, cifar_stem: bool = False,
               zero_init_last_bn: bool = True, bn_decay: float = 0.9, bn_eps: float = 1e-5,
               axis_name: str | None = None, name: str = 'encoder',
               weight_init: str = 'release', bn_groups: int = 1, stem_relu: bool = True):
    super().__init__(name=name)
    if depth not in RESNET_LAYOUTS:
      raise ValueError(f'unknown ResNet depth {depth}; valid: {sorted(RESNET_LAYOUTS)}')
    _check_weight_init(weight_init)
    self.weight_init = weight_init
    self.blocks, self.bottleneck = RESNET_LAYOUTS[depth]
    self.width = width
    self.cifar_stem = cifar_stem
    self.stem_relu = stem_relu
    self.zero_init_last_bn = zero_init_last_bn
    self.bn = dict(decay=bn_decay, eps=bn_eps, axis_name=axis_name, groups=bn_groups)

  @classmethod
  def from_config(cls, model_cfg: Any, **overrides: Any) -> ResNet:
    """The encoder a model config describes; `overrides` replace constructor arguments.

    The one place a config becomes an encoder, so that training, evaluation, fine-tuning and
    export build the same network when a model option is added.
    """
    kwargs = dict(depth=model_cfg.depth, width=model_cfg.width, cifar_stem=model_cfg.cifar_stem,
                  zero_init_last_bn=model_cfg.zero_init_last_bn, bn_decay=model_cfg.bn_decay,
                  bn_eps=model_cfg.bn_eps, weight_init=_config_weight_init(model_cfg),
                  stem_relu=stem_relu_of(model_cfg))
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def output_dim(self) -> int:
    return resnet_output_dim(self.bottleneck, self.width)

  @staticmethod
  def feature_dim(model_cfg: Any) -> int:
    """The pooled feature size a model config gives, without building the network."""
    return resnet_output_dim(RESNET_LAYOUTS[model_cfg.depth][1], model_cfg.width)

  def _bn(self, x, is_training, name, last=False):
    scale_init = jnp.zeros if (last and self.zero_init_last_bn) else None
    return _batch_norm(x, is_training, self.bn['axis_name'], self.bn['decay'], self.bn['eps'],
                       scale_init=scale_init, name=name, groups=self.bn['groups'])

  def _block(self, x, channels, stride, is_training, project, name):
    shortcut = x
    out_channels = channels * 4 if self.bottleneck else channels
    if project:
      shortcut = _conv(out_channels, 1, stride, f'{name}_shortcut_conv', self.weight_init)(x)
      shortcut = self._bn(shortcut, is_training, f'{name}_shortcut_bn')
    if self.bottleneck:
      specs = ((channels, 1, 1), (channels, 3, stride), (out_channels, 1, 1))
    else:
      specs = ((channels, 3, stride), (out_channels, 3, 1))
    for i, (ch, k, s) in enumerate(specs):
      last = i == len(specs) - 1
      x = _conv(ch, k, s, f'{name}_conv_{i}', self.weight_init)(x)
      x = self._bn(x, is_training, f'{name}_bn_{i}', last=last)
      if not last:
        x = jax.nn.relu(x)
    return jax.nn.relu(x + shortcut)

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    stem = _scaled(64, self.width)
    x = _conv(stem, 3 if self.cifar_stem else 7, 1 if self.cifar_stem else 2, 'stem_conv',
              self.weight_init)(x)
    x = self._bn(x, is_training, 'stem_bn')
    if self.stem_relu:
      x = jax.nn.relu(x)
    if not self.cifar_stem:
      x = _stem_pool(x)
    for stage, num_blocks in enumerate(self.blocks):
      channels = _scaled(64 * 2**stage, self.width)
      for b in range(num_blocks):
        stride = 2 if (stage > 0 and b == 0) else 1
        project = b == 0 and (stage > 0 or self.bottleneck or stem != channels)
        x = self._block(x, channels, stride, is_training, project, f'stage_{stage}_block_{b}')
    return jnp.mean(x, axis=(1, 2))


def _scaled(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


def resnet_output_dim(bottleneck: bool, width: float) -> int:
  """The pooled feature size: 512*w for basic blocks, 2048*w for bottlenecks."""
  return _scaled(512, width) * (4 if bottleneck else 1)


class UnknownEncoder(ValueError):
  """`model.arch` names no encoder this process can build (not registered, not importable).

  Its own type so that a checkpoint of such a run is not taken for a damaged one: every
  checkpoint was skipped as 'unreadable' and the CLI said 'no usable checkpoint'."""


# Encoders by `model.arch`. Each is an hk.Module class with
# - `from_config(model_cfg, **overrides)`: the module a model config describes; `overrides`
#   are `axis_name` (cross-replica BatchNorm), `bn_groups` and `bn_decay` (see ResNet);
# - `feature_dim(model_cfg)`: the size of its pooled output;
# - `module(images [B, H, W, 3], is_training) -> [B, feature_dim]`, built under the name
#   'encoder' (checkpoints, evaluators and `encoder_subtree` find it by that name).
# Register one from your own code or config file: `networks.ENCODERS['mine'] = MyEncoder`.
ENCODERS: dict[str, Any] = {'resnet': ResNet}


def encoder_class(model_cfg: Any) -> Any:
  """The class `model.arch` names; runs saved before the field are ResNets.

  Why one place: training, every evaluator, fine-tuning and features build the encoder
  through here, so a new architecture is one entry in ENCODERS, not one edit per worker.
  """
  arch = config_compat.setting(model_cfg, 'model.arch')
  if arch in ENCODERS:
    return ENCODERS[arch]
  if ':' in arch:
    return _import_encoder(arch)
  raise UnknownEncoder(f'model.arch={arch!r}; valid: {", ".join(sorted(ENCODERS))} '
                   "(networks.ENCODERS), or an importable 'module:Class'")


def _import_encoder(path: str) -> Any:
  """The class a 'module:Class' arch names, imported where it is needed.

  Why: a class registered in ENCODERS by a user's config file exists only in the process
  that ran that file; the export and plot tools, and evaluation configs, read the run's
  saved config and could not rebuild its encoder. A module on PYTHONPATH imports anywhere.
  """
  import importlib
  module, _, name = path.partition(':')
  try:
    found = importlib.import_module(module)
  except ImportError as e:
    if isinstance(e, ModuleNotFoundError) and e.name and (
        module == e.name or module.startswith(e.name + '.')):
      raise UnknownEncoder(f'model.arch={path!r}: cannot import it ({e}); put {module}.py on '
                       'PYTHONPATH') from None
    # Found, but its own import failed (a module it imports is missing): PYTHONPATH is not
    # the fix, and the message says what is.
    raise UnknownEncoder(f'model.arch={path!r}: importing {module} failed: {e}') from None
  if not hasattr(found, name):
    raise UnknownEncoder(f'model.arch={path!r}: {module} has no {name!r} '
                     f'({getattr(found, "__file__", None) or module})')
  return getattr(found, name)


def encoder_from_config(model_cfg: Any, **overrides: Any) -> hk.Module:
  """The encoder module of a model config (inside an hk.transform)."""
  module = encoder_class(model_cfg).from_config(model_cfg, **overrides)
  # A backbone under another name trained, then every evaluator, the features API and the
  # export found no 'encoder/...' parameters (a Haiku traceback at the first kNN).
  if module.module_name != 'encoder':  # not 'encoder_1', nor inside another module
    arch = config_compat.setting(model_cfg, 'model.arch')
    raise UnknownEncoder(f'model.arch={arch!r} builds a module named '
                         f'{module.module_name!r}; build it as \'encoder\' (its __init__\'s '
                         "name='encoder', as ResNet's): checkpoints, evaluators and the export "
                         'find its parameters by that name')
  return module


def encoder_feature_dim(model_cfg: Any) -> int:
  """The encoder's pooled feature size [D] for a model config."""
  return int(encoder_class(model_cfg).feature_dim(model_cfg))


class MLP(hk.Module):
  """Linear -> norm -> ReLU -> Linear, the projector and predictor of BYOL.

  The release's last Linear has no bias (`output_bias=False`); PyTorch heads such as
  lightly's keep one.
  """

  def __init__(self, hidden: int, output: int, norm: str, bn_decay: float = 0.9,
               bn_eps: float = 1e-5, axis_name: str | None = None, name: str | None = None,
               weight_init: str = 'release', bn_groups: int = 1, output_bias: bool = True):
    super().__init__(name=name)
    if norm not in NORM_KINDS:
      raise ValueError(f'unknown norm {norm!r}; valid: {", ".join(NORM_KINDS)}')
    _check_weight_init(weight_init)
    self.hidden, self.output, self.norm = hidden, output, norm
    self.bn = (bn_decay, bn_eps, axis_name, bn_groups)
    self.weight_init = weight_init
    self.output_bias = output_bias

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    bn_decay, bn_eps, axis_name, groups = self.bn
    x = _linear(self.hidden, x.shape[-1], 'linear_0', self.weight_init)(x)
    x = _norm(self.norm, x, is_training, axis_name, bn_decay, bn_eps, groups)
    x = jax.nn.relu(x)
    return _linear(self.output, self.hidden, 'linear_1', self.weight_init,
                   with_bias=self.output_bias)(x)


def _cast_getter(dtype: jnp.dtype) -> Callable[..., Any]:
  """Casts conv and linear weights to the compute dtype; norm parameters stay float32."""

  def getter(next_getter, value, context):
    if context.name in NORM_PARAM_NAMES:
      return next_getter(value)
    return next_getter(value.astype(dtype) if value.dtype == jnp.float32 else value)

  return getter


@contextlib.contextmanager
def _mixed_precision(dtype: jnp.dtype):
  """Params are created and stored in float32 and cast to `dtype` where they are used."""

  def creator(next_creator, shape, _, init, context):
    del context
    return next_creator(shape, jnp.float32, init)

  with hk.custom_creator(creator), hk.custom_getter(_cast_getter(dtype)):
    yield


def build_network(model_cfg: Any, num_classes: int, axis_name: str | None = None,
                  dtype: jnp.dtype = jnp.float32) -> hk.TransformedWithState:
  """The BYOL network as one transformed function.

  `apply(params, state, rng, images, is_training, views=1)` returns a dict with the
  encoder's pooled `embedding`, the projector's `projection`, the predictor's `prediction`
  and the online probe's `logits`. `views` > 1 says `images` are that many views stacked
  along the batch: in training each gets its own BatchNorm statistics, so one call on the
  stacked views equals one call per view (and launches half the kernels). The probe sees
  stop_gradient(embedding) so it never shapes the encoder. Online and target share this
  structure; the target simply ignores prediction and logits.
  `images` are normalised float images (see `augment.normalize`).
  """
  cfg = model_cfg
  weight_init = _config_weight_init(cfg)  # checked here: a bad value fails before tracing
  encoder_class(cfg)  # and an unknown arch
  output_bias = head_output_bias_of(cfg)

  def forward(images: jax.Array, is_training: bool, views: int = 1) -> dict[str, jax.Array]:
    cast = dtype != jnp.float32
    with (_mixed_precision(dtype) if cast else contextlib.nullcontext()):
      encoder = encoder_from_config(cfg, axis_name=axis_name, bn_groups=views)
      embedding = encoder(images.astype(dtype), is_training)
      projector = MLP(cfg.projector_hidden, cfg.projection_dim, cfg.projector_norm,
                      cfg.bn_decay, cfg.bn_eps, axis_name, name='projector',
                      weight_init=weight_init, bn_groups=views, output_bias=output_bias)
      predictor = MLP(cfg.predictor_hidden, cfg.projection_dim, cfg.predictor_norm,
                      cfg.bn_decay, cfg.bn_eps, axis_name, name='predictor',
                      weight_init=weight_init, bn_groups=views, output_bias=output_bias)
      projection = projector(embedding, is_training)
      prediction = predictor(projection, is_training)
    logits = hk.Linear(num_classes, name='probe')(jax.lax.stop_gradient(embedding)
                                                  .astype(jnp.float32))
    return dict(embedding=embedding.astype(jnp.float32),
                projection=projection.astype(jnp.float32),
                prediction=prediction.astype(jnp.float32), logits=logits)

  return hk.transform_with_state(forward)


def build_encoder(model_cfg: Any) -> hk.TransformedWithState:
  """The encoder alone, in inference mode, for evaluation and export.

  Its parameter names match `build_network`'s `encoder/...` subtree, so the params of a
  trained network can be passed in after `encoder_subtree`.
  """

  def forward(images: jax.Array) -> jax.Array:
    return encoder_from_config(model_cfg)(images, is_training=False)

  return hk.transform_with_state(forward)


def encoder_subtree(tree: Mapping[str, Any]) -> dict[str, Any]:
  """The encoder's modules of a network params or state dict."""
  return {k: v for k, v in tree.items() if k.startswith('encoder')}


def numpy_tree(tree: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
  """A Haiku params or state dict ({module: {name: array}}) as plain dicts of numpy arrays."""
  return {m: {k: np.asarray(v) for k, v in leaves.items()} for m, leaves in tree.items()}


def count_params(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
