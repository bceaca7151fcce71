"""Embedding whole datasets with a frozen encoder, shared by every evaluator.

Evaluation always uses eval preprocessing (centre crop, no augmentation) and the encoder in
inference mode (BN moving averages), on whichever network the caller passes: the online
encoder by default.

It also builds the encoder at initialisation, the baseline that pretraining must beat, with
BatchNorm statistics that are estimated rather than left at their initial values; see
`initial_state` and `recalibrate_batch_norm` for why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import haiku as hk
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import augment, networks, train_step

# Images whose batch statistics make up a recalibrated BN state: Wu & Johnson (2021,
# "Rethinking 'Batch' in BatchNorm") find population statistics converge after about 10^4.
BN_CALIBRATION_EXAMPLES = 10_000


def make_embed_fn(model_cfg: Any, image_size: int, crop_fraction: float, mesh: Mesh,
                  aug_cfg: Any = None) -> Callable[[hk.Params, hk.State, np.ndarray], jax.Array]:
  """embed(params, state, uint8 images [B, H, W, 3]) -> features [B, D], computed sharded.

  `params`/`state` may be the full network's; only the encoder subtree is used. B must be
  a multiple of the mesh size (see `embed_arrays`, which pads). aug_cfg supplies the
  normalisation (None: `augment.default_augment_config()`).
  """
  encoder = networks.build_encoder(model_cfg)
  data_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))

  # Replicated features: every process of a multi-process run can read them (an all-gather
  # of [B, D] features, small next to the encoder's work).
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
  def embed(params, state, images):
    x = augment.eval_view(images, image_size, crop_fraction, aug_cfg)
    feats, _ = encoder.apply(networks.encoder_subtree(params), networks.encoder_subtree(state),
                             None, x)
    return feats

  def run(params, state, images):
    return embed(params, state, jax.device_put(images, data_sharding))

  return run


def device_batch(batch_size: int, num_devices: int) -> int:
  """The largest multiple of num_devices not above batch_size (at least one per device):
  the batch an evaluation shards evenly over the data axis."""
  return max(num_devices, batch_size - batch_size % num_devices)


def embed_arrays(embed: Callable, params: hk.Params, state: hk.State, images: np.ndarray,
                 batch_size: int, num_devices: int) -> np.ndarray:
  """Features of every image, in order, with a fixed batch shape (no recompiles)."""
  batch_size = device_batch(batch_size, num_devices)
  return embed_batches(embed, params, state, _chunks(images, batch_size))


def _chunks(images: np.ndarray, batch_size: int) -> Iterable[tuple[np.ndarray, int]]:
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:
      pad = np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    yield chunk, valid


def embed_batches(embed: Callable, params: hk.Params, state: hk.State,
                  batches: Iterable[tuple[np.ndarray, int]]) -> np.ndarray:
  """Concatenated features of (padded batch, number of valid rows) pairs.

  One batch stays in flight: the next batch is dispatched before the previous one's
  features are fetched, so the device does not idle while the host copies and pads.
  """
  out, pending = [], None
  for batch, valid in batches:
    features = embed(params, state, batch)
    if pending is not None:
      out.append(np.asarray(pending[0])[:pending[1]])
    pending = features, valid
  if pending is not None:
    out.append(np.asarray(pending[0])[:pending[1]])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def stream_features(apply: Callable[[np.ndarray], Any], stream: Iterable[dict[str, Any]],
                    limit: int = 0, what: str = '',
                    labelled_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """apply(uint8 batch) -> features over one pass of an eval stream
  (`input_pipeline.eval_stream`): the valid rows' features and int32 labels, in order.

  Why streamed: a split too large to keep decoded (ImageNet's 1.28M training images) is
  read batch by batch, so only its features are held. With `limit` > 0 the pass stops once
  that many rows are in (a first-N subset, as `knn.train_examples` takes). With
  `labelled_only` rows labelled -1 are dropped after embedding (the stream's batch count is
  fixed for multi-host padding, so it cannot be filtered) and do not count towards `limit`:
  STL-10's 'unlabelled+train' puts 100,000 unlabelled images before the labelled ones.

  Multi-process: `apply` is a collective (a jit over the global mesh), so every process must
  make the same calls. They do because every process streams the whole split (evaluation
  streams are not sharded by process), so masks, labels and the early stop agree; a sharded
  stream would need the skip and the stop decided across processes.
  """
  outputs, labels, count = [], [], 0
  total = len(stream) if hasattr(stream, '__len__') else 0
  for i, b in enumerate(stream):
    keep = np.asarray(b['mask'])
    batch_labels = np.asarray(b['labels'])
    if labelled_only:
      keep = keep & (batch_labels >= 0)
    if keep.any():  # an all-unlabelled batch is not embedded
      outputs.append(np.asarray(apply(b['images']))[keep])
      labels.append(batch_labels[keep])
      count += len(labels[-1])
    if limit and count >= limit:
      break
    if what and (i + 1) % 100 == 0:
      logging.info('%s: %d/%d batches', what, i + 1, total)
  if not outputs and not labelled_only:
    raise ValueError(f'{what or "the stream"}: no images')
  if not outputs:
    return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32)
  end = limit or None
  return np.concatenate(outputs)[:end], np.concatenate(labels).astype(np.int32)[:end]


def spread_batches(stream: Any, batch_size: int, max_examples: int,
                   num_devices: int = 1) -> Iterable[np.ndarray]:
  """Full batches spread evenly over one pass of an eval stream, about max_examples images
  in all, for BN recalibration: every stride-th batch, so a split stored class by class
  still contributes every class; padded batches are left out. A stream with no full batch
  (a split smaller than the batch, or one whose unreadable files left its only batch
  short) gives the real images of its first padded batch instead, a multiple of
  num_devices of them, rather than nothing (which failed the recalibration)."""
  wanted = max(1, max_examples // batch_size)
  stride = max(1, len(stream) // wanted)
  full, partial = False, None
  for i, b in enumerate(stream):
    mask = np.asarray(b['mask'], bool)
    if np.all(mask):
      full = True
      if i % stride == 0 and i // stride < wanted:
        yield b['images']
    elif partial is None and mask.any():
      partial = np.asarray(b['images'])[mask]
  if not full and partial is not None and len(partial) >= num_devices:
    yield partial[:len(partial) - len(partial) % num_devices]


# ------------------------------------------------------------------------------------------
# The encoder at initialisation, with estimated BatchNorm statistics.
# ------------------------------------------------------------------------------------------


def initial_state(run_cfg: Any) -> train_step.TrainState:
  """The state a pretraining run starts from (same seed, same init), built without data.

  The probe's class count does not change the encoder's initialisation (Haiku draws the
  encoder's keys first), so one class is used. Its BN statistics are the initial ones; see
  `calibrated_initial_state` for the state evaluators should use.
  """
  fns = train_step.make_step_fns(run_cfg, 1, num_steps=1, steps_per_epoch=1, axis_name=None)
  shape = (run_cfg.image_size, run_cfg.image_size, 3)
  return jax.jit(lambda rng: train_step.init_state(fns, rng, shape))(
    jax.random.PRNGKey(run_cfg.seed))


def _ema_modules(state: hk.State) -> list[str]:
  """Names of the moving averages (hk.ExponentialMovingAverage state) in a state dict."""
  return sorted(k for k, v in state.items() if {'average', 'hidden', 'counter'} <= set(v))


def bn_statistics_missing(state: hk.State) -> bool:
  """True if some encoder BN moving average was never updated (its EMA counter is 0).

  That is the state of any network before its first training step: mean 0 and variance 0,
  so inference-mode BN divides by sqrt(eps) instead of normalising.
  """
  enc = networks.encoder_subtree(state)
  return any(int(np.asarray(enc[k]['counter'])) == 0 for k in _ema_modules(enc))


def make_batch_stats_fn(model_cfg: Any, image_size: int, crop_fraction: float, mesh: Mesh,
                        aug_cfg: Any = None) -> Callable[[hk.Params, hk.State, np.ndarray],
                                                         hk.State]:
  """stats(params, state, uint8 images) -> {EMA module: this batch's BN statistic}.

  The encoder runs in training mode on the eval view of the images (what `make_embed_fn`
  feeds it), so every BN layer normalises with the batch's own mean and variance, over the
  whole (sharded) batch. Built with BN decay 0, Haiku's debiased EMA of one update is
  exactly that update's value, so the returned averages are the batch statistics: per
  channel, the mean and the biased variance (E[x^2] - E[x]^2) of each BN layer's input.
  """
  def forward(images):
    return networks.encoder_from_config(model_cfg, bn_decay=0.0)(images, is_training=True)

  encoder = hk.transform_with_state(forward)

  # Replicated statistics: every process of a multi-process run can read them.
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
  def stats(params, state, images):
    x = augment.eval_view(images, image_size, crop_fraction, aug_cfg)
    _, new_state = encoder.apply(networks.encoder_subtree(params),
                                 networks.encoder_subtree(state), None, x)
    return {k: new_state[k]['average'] for k in _ema_modules(new_state)}

  data_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  return lambda params, state, images: stats(params, state,
                                             jax.device_put(images, data_sharding))


_STATS_FNS: dict[tuple, Callable] = {}


def _cached_batch_stats_fn(model_cfg: Any, image_size: int, crop_fraction: float, mesh: Mesh,
                           aug_cfg: Any) -> Callable:
  """`make_batch_stats_fn`, built once per setting: each build is a new jitted function, so
  recalibrating the online and then the target network would otherwise compile twice."""
  key = (repr(sorted(model_cfg.to_dict().items())), image_size, crop_fraction, mesh,
         None if aug_cfg is None else repr(sorted(aug_cfg.to_dict().items())))
  if key not in _STATS_FNS:
    _STATS_FNS[key] = make_batch_stats_fn(model_cfg, image_size, crop_fraction, mesh, aug_cfg)
  return _STATS_FNS[key]


def calibration_batches(images: np.ndarray, batch_size: int, num_devices: int,
                        max_examples: int = BN_CALIBRATION_EXAMPLES,
                        seed: int = 0) -> list[np.ndarray]:
  """Equal-size batches of a seeded random sample of at most max_examples images.

  Equal sizes make the mean of the batch means the mean over every image used; a random
  sample avoids class-ordered files. Rows that do not fill a last batch are left out.
  """
  n = min(len(images), max_examples) if max_examples else len(images)
  batch = min(batch_size, n)
  batch = device_batch(batch, num_devices)
  if n < batch:
    raise ValueError(f'BN recalibration needs at least {batch} images, got {len(images)}')
  rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:n - n % batch])
  return [images[rows[i:i + batch]] for i in range(0, len(rows), batch)]


def recalibrate_batch_norm(model_cfg: Any, params: hk.Params, state: hk.State,
                           batches: Iterable[np.ndarray], image_size: int,
                           crop_fraction: float, mesh: Mesh,
                           aug_cfg: Any = None) -> tuple[hk.State, int]:
  """The encoder BN statistics of `state` re-estimated from images; returns (state, images).

  Why: Haiku keeps BN moving averages at mean 0 / variance 0 until the first training step,
  so a never-trained encoder in inference mode divides every BN input by sqrt(eps) (x316
  per layer) without centring it: its features are huge and dominated by a few directions,
  and evaluating them measures that artefact, not what random weights can represent. A
  trained encoder's averages were estimated from its training batches; the fair baseline
  gets its own estimate, as "precise BN" does (Wu & Johnson, 2021): one pass of the frozen
  weights in training mode over training images, averaging the per-batch statistics.

  Every BN layer gets, per channel, the mean over batches of its input's batch mean and of
  its biased batch variance, as seen in training mode (where each layer normalises with the
  batch statistics). Batches must be equal-sized uint8 [B, H, W, 3] arrays (see
  `calibration_batches`); they get the same eval view as `make_embed_fn` (pass the same
  aug_cfg). The EMA state is made self-consistent for later updates: counter = number of
  batches, hidden = average x (1 - decay^counter). Other entries of `state` are unchanged.
  """
  stats_fn = _cached_batch_stats_fn(model_cfg, image_size, crop_fraction, mesh, aug_cfg)
  sums: dict[str, np.ndarray] = {}
  count, num_images, size = 0, 0, None
  for batch in batches:
    if size is not None and len(batch) != size:
      raise ValueError(f'calibration batches must share one size ({size} != {len(batch)})')
    size = len(batch)
    stats = jax.device_get(stats_fn(params, state, batch))
    for k, v in stats.items():
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
    count, num_images = count + 1, num_images + size
  if not count:
    raise ValueError('BN recalibration got no images')
  decay = float(model_cfg.bn_decay)
  out = dict(state)
  for k, total in sums.items():
    average = (total / count).astype(np.float32)
    out[k] = dict(counter=np.asarray(count, np.int32), average=average,
                  hidden=(average * (1.0 - decay ** count)).astype(np.float32))
  return out, num_images


def ensure_bn_statistics(model_cfg: Any, params: hk.Params, state: hk.State,
                         images: Callable[[], Iterable[np.ndarray]], image_size: int,
                         crop_fraction: float, mesh: Mesh, aug_cfg: Any = None,
                         source: str = '') -> tuple[hk.State, str]:
  """`state` as is if its encoder BN statistics exist, else recalibrated; (state, note).

  The single rule every evaluator applies before embedding with a network: statistics that
  training never updated (`bn_statistics_missing`: the encoder at initialisation, or any
  state saved before its first step) are re-estimated by `recalibrate_batch_norm` from the
  batches of `images()`, a factory (called only then) of equal-size uint8 batches of
  TRAINING images, never test, e.g. `lambda: calibration_batches(train_images, ...)`.
  image_size, crop_fraction and aug_cfg must be those of the evaluator's embedding function,
  so the statistics describe the inputs it then sees. The note, for the records, is
  'checkpoint' (left as trained) or says what the recalibration used.
  """
  if not bn_statistics_missing(state):
    return state, 'checkpoint'
  state, num = recalibrate_batch_norm(model_cfg, params, state, images(), image_size,
                                      crop_fraction, mesh, aug_cfg)
  note = f'recalibrated on {num} training images{f" of {source}" if source else ""}'
  logging.info('BN statistics were never updated: %s (eval views, training mode)', note)
  return state, note


def calibrated_initial_state(run_cfg: Any, images: Callable[[], Iterable[np.ndarray]],
                             mesh: Mesh, crop_fraction: float, image_size: int,
                             aug_cfg: Any = None,
                             source: str = '') -> tuple[train_step.TrainState, str]:
  """The encoder at initialisation as evaluators should see it; returns (state, note).

  `initial_state(run_cfg)` with `ensure_bn_statistics` applied to the online and the target
  network (arguments as there).
  """
  state = initial_state(run_cfg)
  out, note = {}, ''
  for name in ('online', 'target'):
    out[name], note = ensure_bn_statistics(
      run_cfg.model, getattr(state, f'{name}_params'), getattr(state, f'{name}_state'),
      images, image_size, crop_fraction, mesh, aug_cfg, source)
  return state._replace(online_state=out['online'], target_state=out['target']), note
