"""`--worker_mode=linear_eval`: linear classifiers on a pretrained, frozen BYOL encoder.

Why a separate worker: the paper's headline numbers are linear-evaluation accuracies of a
checkpoint, measured after (or beside) pretraining on any classification dataset, so this
reads the pretraining workdir's checkpoint and config and appends one self-describing record
to `<workdir>/metrics/linear_eval.jsonl`.

Protocol (../shared/reference/byol_facts.md): the encoder (online by default, or the target) runs in
inference mode; one zero-initialised linear head per candidate LR trains with SGD, Nesterov
momentum 0.9, no weight decay and cosine decay, all heads at once; the LR is picked on a
validation split held out of the training data; with `refit` (the default) one head is
then retrained at that LR on train + validation and reported on test, else the sweep's head.
A multi-label dataset (VOC2007) trains a sigmoid per class and picks and reports by mAP.
Two modes:
- 'cached': features of centre crops are computed once and the heads train on them
  (`evaluators.linear.linear_eval`, a single compiled program). Fast; the usual choice for
  transfer, where the paper (after SimCLR) also trains on centre-crop features.
- 'augmented': the paper's ImageNet protocol. Every training step takes a random resized
  crop + flip of its minibatch and runs the frozen encoder, so features are recomputed every
  epoch. The SGD update, head initialisation, batch order and LR report are
  `evaluators.linear`'s (`init_heads`, `head_update`, `epoch_batches`, `report_heads`); only
  the source of the features differs. Validation and test use centre crops. A train split
  too large for memory (ImageNet) streams: tf.data takes the crop on the host, as the
  pretraining stream does, and the device flips and runs the encoder
  (`train_heads_on_stream`); the refit streams 'trainval'.

This module also holds what `finetune` shares: loading the pretrained state (or a fresh init
as a baseline), resolving the dataset against the pretraining config, loading splits with
their definitions, and the crop + flip training view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import augment, datasets, metric_writers, networks, train_step
from byol_jax import data as data_lib
from byol_jax.evaluators import common
from byol_jax.evaluators import linear as linear_lib
from byol_jax.train import ConfigError

MODES = ('cached', 'augmented')
NETWORKS = ('online', 'target')


# ------------------------------------------------------------------------------------------
# The pretrained network.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pretrained:
  """A pretraining run's config and state at one step; weights says where they came from.

  bn_statistics says where the encoder's BN moving averages came from: 'checkpoint' (the
  pretraining run's), or a recalibration note for the encoder at initialisation.
  """
  config: ml_collections.ConfigDict
  state: train_step.TrainState
  step: int
  weights: str  # 'checkpoint' | 'random_init'
  bn_statistics: str = 'checkpoint'


def require_eval_config(cfg: Any) -> None:
  """Rejects a pretraining config passed to an evaluation worker, in one line."""
  if 'learning_rates' not in cfg or 'random_init' not in cfg:
    raise ConfigError('this worker needs an evaluation config: '
                      '--config=configs/linear_eval.py:PRESET (e.g. :demo)')


def load_pretrained(cfg: Any, workdir: str) -> Pretrained:
  """The checkpoint named by cfg.step (0 = latest), or the initial encoder if cfg.random_init.

  The initial encoder is the run's initialisation (same config and seed) with its BN
  statistics recalibrated on training images of the evaluation (`initial_encoder`), so
  linear_eval and finetune of the baseline see a sanely normalised network.
  """
  from byol_jax import checkpointing  # orbax only for this path
  require_eval_config(cfg)
  if cfg.random_init:
    pre_cfg = _run_config(workdir)
    state, note = initial_encoder(resolve_config(cfg, pre_cfg), pre_cfg)
    return Pretrained(pre_cfg, state, 0, 'random_init', note)
  steps = checkpointing.finalised_steps(workdir)
  if not steps:
    hint = checkpointing.not_a_run_hint(workdir)
    raise ConfigError(f'no finalised checkpoint in {workdir}' + (hint or ': train there first, or '
                      'set --config.random_init to evaluate an untrained encoder'))
  if cfg.step and cfg.step not in steps:
    raise ConfigError(f'no checkpoint at step {cfg.step} in {workdir}; finalised steps: '
                      f'{steps}')
  try:
    state, pre_cfg, step = checkpointing.load_state(workdir, cfg.step or None)
  except checkpointing.CheckpointError as e:
    raise ConfigError(str(e)) from None
  return Pretrained(pre_cfg, state, int(step), 'checkpoint')


def initial_encoder(cfg: Any, pre_cfg: Any) -> tuple[train_step.TrainState, str]:
  """The run's initial state, BN recalibrated on cfg.train_split; returns (state, note).

  Uses `common.calibrated_initial_state` with the view the evaluation embeds with (centre
  crop of cfg.crop_fraction at cfg.image_size, the run's normalisation). Why the
  evaluation's training split rather than the pretraining data: the data is at hand, and
  statistics of the very distribution that is then embedded can only favour the baseline,
  so a trained encoder that beats it does so for its weights, not a BN mismatch. Up to
  cfg.bn_calibration_examples images are used; validation hold-out rows may be among them
  (no labels are read).
  """
  mesh = train_step.make_mesh()
  if evaluation_input_mode(cfg) == 'stream':  # the statistics of the pixels then embedded
    images, crop = _streamed_calibration_batches(cfg, mesh.size), 1.0
  else:
    decoded = []  # decoded once, on first use

    def images():
      if not decoded:
        decoded.append(load_split(cfg, cfg.train_split, pre_cfg.seed).images)
      return common.calibration_batches(decoded[0], cfg.embed_batch_size, mesh.size,
                                        cfg.bn_calibration_examples, cfg.seed)
    crop = cfg.crop_fraction
  return common.calibrated_initial_state(pre_cfg, images, mesh, crop, cfg.image_size,
                                         pre_cfg.augment, f'{cfg.dataset}/{cfg.train_split}')


def _streamed_calibration_batches(cfg: Any, num_devices: int) -> Callable:
  """A factory of full host-cropped batches spread evenly over a streamed split (crops are
  final: embed with crop 1.0)."""
  from byol_jax import input_pipeline  # TensorFlow only on this path
  batch = common.device_batch(cfg.embed_batch_size, num_devices)

  def batches():
    stream = input_pipeline.eval_stream(
      datasets.parse_dataset(cfg.dataset), cfg.train_split, batch_size=batch,
      image_size=cfg.image_size, data_dir=cfg.data_dir or None,
      crop_fraction=cfg.crop_fraction, strict=cfg.strict_data)
    return common.spread_batches(stream, batch, cfg.bn_calibration_examples, num_devices)

  return batches


def _run_config(workdir: str) -> ml_collections.ConfigDict:
  """The pretraining config: from the newest checkpoint, else the config.json of the run."""
  from byol_jax import checkpointing
  try:
    return checkpointing.load_config(workdir)
  except checkpointing.CheckpointError as e:
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise ConfigError(f'random_init needs the run\'s config: {e}; no {path} either') from None
  with open(path) as f:
    return checkpointing.config_from_dict(json.load(f))


def encoder_weights(state: train_step.TrainState, network: str) -> tuple[hk.Params, hk.State]:
  """The encoder's params and BN statistics of the online or target network."""
  if network not in NETWORKS:
    raise ConfigError(f'network={network!r}; valid: {", ".join(NETWORKS)}')
  params, bn_state = ((state.online_params, state.online_state) if network == 'online'
                      else (state.target_params, state.target_state))
  return networks.encoder_subtree(params), networks.encoder_subtree(bn_state)


# ------------------------------------------------------------------------------------------
# Config and data.
# ------------------------------------------------------------------------------------------


def resolve_config(cfg: Any, pre_cfg: Any) -> ml_collections.ConfigDict:
  """A copy of cfg with '' / 0 fields taken from the pretraining config, then validated."""
  require_eval_config(cfg)
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.dataset = cfg.dataset or pre_cfg.dataset
  out.data_dir = cfg.data_dir or pre_cfg.get('data_dir', '')
  out.image_size = cfg.image_size or pre_cfg.image_size
  out.crop_fraction = cfg.crop_fraction or pre_cfg.get('eval_crop_fraction', 0.875)
  _validate(out)
  return out


def _validate(cfg: Any) -> None:
  """Fails before any data is decoded or anything compiles."""
  if cfg.mode not in MODES:
    raise ConfigError(f'mode={cfg.mode!r}; valid: {", ".join(MODES)}')
  if cfg.network not in NETWORKS:
    raise ConfigError(f'network={cfg.network!r}; valid: {", ".join(NETWORKS)}')
  if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.learning_rates:
    raise ConfigError('need epochs >= 1, batch_size >= 1 and at least one learning rate')
  # As the pretraining config's base_lr: a non-positive LR trained a head uphill, or not at
  # all, without a word (the sweep then passed it over).
  for name, rates in (('learning_rates', cfg.learning_rates),
                      ('finetune.learning_rates', cfg.finetune.learning_rates)):
    if any(not lr > 0 for lr in rates):
      raise ConfigError(f'{name}={tuple(rates)} must all be positive')
  if not 0 <= cfg.seed < 2**32:  # a negative one ended finetune in numpy's traceback
    raise ConfigError(f'seed={cfg.seed} must be in [0, 2**32)')
  if not 0.0 < cfg.crop_fraction <= 1.0:
    raise ConfigError(f'crop_fraction={cfg.crop_fraction} must be in (0, 1]')
  if cfg.image_size < 8:
    raise ConfigError(f'image_size={cfg.image_size} must be at least 8 pixels')
  if cfg.max_examples < 0:  # `split[:-N]` dropped N examples of every split, test included
    raise ConfigError(f'max_examples={cfg.max_examples} must be >= 0 (0: every example)')
  if not 0.0 <= cfg.subset_fraction < 1.0:
    raise ConfigError(f'subset_fraction={cfg.subset_fraction} must be in [0, 1) (0 = all)')
  if cfg.normalize_features and cfg.mode != 'cached':
    raise ConfigError("normalize_features needs mode='cached' (features are not stored "
                      "in mode='augmented')")
  if cfg.random_init and cfg.bn_calibration_examples < 1:
    raise ConfigError('random_init needs bn_calibration_examples >= 1 (the initial encoder\'s '
                      'BN statistics are estimated from that many training images)')
  if not cfg.val_split and not _valid_val_size(cfg.val_size):
    raise ConfigError(f"val_split='' needs val_size, the share of train_split held out, as a "
                      f"fraction in (0, 1) or a whole count >= 1; got {cfg.val_size:g}")
  try:
    datasets.parse_dataset(cfg.dataset)
  except datasets.DataError as e:
    raise ConfigError(str(e)) from None


def _valid_val_size(val_size: float) -> bool:
  """Whether val_size reads as `linear.split_validation` takes it. Why: 1.5 held out one
  image and -0.1 none (a traceback once the split was decoded), both without a word."""
  return 0 < val_size < 1 or (val_size >= 1 and float(val_size).is_integer())


def decode_size(cfg: Any) -> int:
  """Stored image side (data.eval_decode_size)."""
  return data_lib.eval_decode_size(cfg.image_size, cfg.crop_fraction)


def multilabel(cfg: Any) -> bool:
  """Whether the dataset gives each image a set of classes (VOC2007): heads then train with
  a sigmoid per class and are scored by mAP (`evaluators.linear`)."""
  return datasets.is_multilabel(datasets.parse_dataset(cfg.dataset), cfg.data_dir or None)


def input_mode(cfg: Any, split: str) -> str:
  """'device' (decoded into memory) or 'stream' (tf.data) for one split."""
  spec = datasets.parse_dataset(cfg.dataset)
  if spec.kind == 'demo':
    return 'device'
  # The whole split, even with max_examples: `load_split` decodes all of it before keeping
  # the first max_examples (a stream stops after them instead).
  num = datasets.dataset_size(spec, split, cfg.data_dir or None)
  mode, reason = datasets.choose_input_mode(num, decode_size(cfg), data_lib.device_memory_bytes(),
                                            cfg.input_mode)
  if mode == 'stream' and multilabel(cfg):
    raise ConfigError(f'{cfg.dataset} is multi-label, read into memory only, and {reason}; '
                      "pass --config.input_mode=device if it fits, or lower image_size")
  logging.info('%s/%s: %s (%s)', cfg.dataset, split, mode, reason)
  return mode


def evaluation_input_mode(cfg: Any) -> str:
  """One input path for every split of an evaluation: 'stream' if any split must stream.

  Why: the streamed path (host crop of crop_fraction, TF bicubic without antialiasing: the
  release's `_decode_and_center_crop`) and the resident path (PIL's antialiased short-side
  resize to decode_size, then a device crop) give different pixels for the same image. A
  head trained on one path's features and chosen / reported on the other's measures that
  shift too (split by split, the imagenet preset would stream 'train' but keep 'valid' and
  'test' resident).
  """
  splits = [cfg.train_split, cfg.test_split] + ([cfg.val_split] if cfg.val_split else [])
  modes = {input_mode(cfg, s) for s in splits}
  return 'stream' if 'stream' in modes else 'device'


def load_split(cfg: Any, split: str, seed: int, random_crops: bool = False) -> data_lib.Split:
  """Decodes one split at decode_size; `seed` only changes the demo data. `random_crops`
  (a split that heads train on crops of) warns when centre squares lose much of the images."""
  spec = datasets.parse_dataset(cfg.dataset)
  start = time.time()
  images, labels, info = datasets.load_arrays(
    spec, split, data_dir=cfg.data_dir or None, image_size=decode_size(cfg),
    strict=cfg.strict_data, seed=seed, multilabel=multilabel(cfg))
  if cfg.max_examples:
    images, labels = images[:cfg.max_examples], labels[:cfg.max_examples]
  logging.info('%s/%s: %d images at %d px decoded in %.1f s', cfg.dataset, split, len(labels),
               decode_size(cfg), time.time() - start)
  warning = datasets.centre_square_warning(info, f'{cfg.dataset}/{split}', '')
  if random_crops and warning:
    logging.warning('%s', warning)
  return data_lib.Split(*labelled(cfg, split, images, labels.astype(np.int32)))


def labelled(cfg: Any, split: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rows of a single-label split that have a class: label -1 (STL-10's 'unlabelled'
  images) has nothing to train or score a classifier with. Multi-label rows pass as they are."""
  if y.ndim != 1 or np.all(y >= 0):
    return x, y
  keep = y >= 0
  if not keep.any():
    raise ConfigError(f'{cfg.dataset}/{split} has no labelled images (label -1 throughout); '
                      'evaluate on a labelled split (--config.train_split, test_split)')
  logging.info('%s/%s: %d images without a class (label -1) left out', cfg.dataset, split,
               int(np.sum(~keep)))
  return x[keep], y[keep]


def split_definition(cfg: Any, split: str, seed: int) -> str:
  """What a logical split means for this dataset, e.g. 'cifar10[train[10%:]]'."""
  spec = datasets.parse_dataset(cfg.dataset)
  if spec.kind == 'tfds':
    builder = datasets.tfds_builder(spec, cfg.data_dir or None)
    return f'{spec.name}[{datasets.resolve_tfds_split(builder, spec, split)}]'
  if spec.kind == 'folder':
    return f'{spec.root} ({split}, see datasets.scan_folder)'
  return f'demo[{split}] (generated, seed {seed})'


def num_classes(cfg: Any, *label_sets: np.ndarray) -> int:
  """Classes of the dataset (metadata where it has any, else the largest label + 1)."""
  if label_sets and label_sets[0].ndim == 2:  # multi-label targets [N, C]
    return int(label_sets[0].shape[1])
  spec = datasets.parse_dataset(cfg.dataset)
  known = datasets.num_classes(spec, cfg.data_dir or None) if spec.kind != 'demo' else 0
  return max([known] + [int(np.max(y)) + 1 for y in label_sets if len(y)])


def hold_out(cfg: Any, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, validation rows) of train_split; no rows held out when val_split is set."""
  if cfg.val_split:
    return np.arange(num_examples), np.zeros(0, np.int64)
  try:
    return linear_lib.split_validation(num_examples, cfg.val_size, cfg.seed)
  except ValueError as e:  # a count as large as the split: ValueError's traceback, unnamed
    raise ConfigError(f'val_size={cfg.val_size:g} cannot be held out of the {num_examples} '
                      f'images of {cfg.dataset}/{cfg.train_split} ({e}); lower it, or set '
                      '--config.val_split') from None


def split_record(cfg: Any, seed: int, sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
  """Provenance of train/val/test: logical split, its definition and the size used."""
  train_def = split_definition(cfg, cfg.train_split, seed)
  out = {'train': dict(split=cfg.train_split, definition=train_def, size=sizes['train']),
         'test': dict(split=cfg.test_split, definition=split_definition(cfg, cfg.test_split,
                                                                        seed),
                      size=sizes['test'])}
  if cfg.val_split:
    out['val'] = dict(split=cfg.val_split, definition=split_definition(cfg, cfg.val_split, seed),
                      size=sizes['val'])
  else:
    held = f'{cfg.val_size} of {train_def}, held out with seed {cfg.seed}'
    out['val'] = dict(split=f'{cfg.train_split} (held out)', definition=held, size=sizes['val'])
    out['train']['definition'] = f'{train_def} minus the validation hold-out'
  return out


def refit_splits(cfg: Any, seed: int, splits: dict[str, dict[str, Any]], size: int,
                 split: str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """(splits, sweep) of a record whose test scores are the refit's: `splits['train']` then
  describes the refit's training set (train + validation, `size` images; `split`: the one
  logical split a streamed refit reads) and `sweep['train']` the sweep's.

  Why: the record described the sweep's training set beside the refit's test figure, so a
  reader took 9,000 training images for a number trained on 10,000 (DTD, Flowers: half).
  """
  train, val = splits['train'], splits['val']
  if split:
    refit = dict(split=split, definition=split_definition(cfg, split, seed), size=size)
  elif cfg.val_split:
    refit = dict(split=f"{train['split']}+{val['split']}",
                 definition=f"{train['definition']} + {val['definition']}", size=size)
  else:
    refit = dict(split=cfg.train_split, size=size, definition=(
      f'{split_definition(cfg, cfg.train_split, seed)}, its validation hold-out included'))
  return dict(splits, train=refit), dict(train=train)


def provenance(cfg: Any, pre: Pretrained, protocol: str) -> dict[str, Any]:
  """The fields every evaluation record carries, so a number can be traced to its inputs.

  `split` is the split the reported accuracy (test_top1/top5) is measured on; `splits`
  (see `split_record`) describes train, validation and test in full.
  """
  return dict(checkpoint_step=pre.step, weights=pre.weights, bn_statistics=pre.bn_statistics,
              network=cfg.network, protocol=protocol, dataset=cfg.dataset,
              split=cfg.test_split, pretrain_dataset=pre.config.dataset,
              preset=cfg.preset, image_size=cfg.image_size, crop_fraction=cfg.crop_fraction,
              seed=cfg.seed, max_examples=cfg.max_examples)


# ------------------------------------------------------------------------------------------
# Views and features.
# ------------------------------------------------------------------------------------------


def random_crop_flip(key: jax.Array, images: jax.Array, out_size: int,
                     aug_cfg: Any) -> jax.Array:
  """Training view of uint8 [B, H, W, 3]: random resized crop + flip, normalised float.

  Crop area, aspect range, flip probability and normalisation are the pretraining config's,
  so the encoder sees the statistics it was trained on; no colour augmentation.
  """
  height, width = images.shape[1:3]

  def one(key, image):
    k_crop, k_flip = jax.random.split(key)
    box = augment.sample_crop_box(k_crop, height, width, aug_cfg)
    crop = augment.crop_and_resize(image.astype(jnp.float32) / 255.0, box, out_size)
    return _flip_normalize(k_flip, crop, aug_cfg)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def random_flip(key: jax.Array, crops: jax.Array, aug_cfg: Any) -> jax.Array:
  """Training view of host crops uint8 [B, S, S, 3] (the streamed protocol: the tf.data
  pipeline took the random resized crop): the flip, normalised float."""
  return jax.vmap(lambda k, c: _flip_normalize(k, c.astype(jnp.float32) / 255.0, aug_cfg))(
    jax.random.split(key, crops.shape[0]), crops)


def _flip_normalize(key: jax.Array, crop: jax.Array, aug_cfg: Any) -> jax.Array:
  crop = jnp.where(jax.random.uniform(key) < aug_cfg.flip_prob, crop[:, ::-1], crop)
  return augment.normalize(jnp.clip(crop, 0.0, 1.0), aug_cfg)


class Embedder:
  """Centre-crop features of whole splits with the frozen encoder, resident or streamed."""

  def __init__(self, cfg: Any, pre: Pretrained):
    self.cfg, self.mesh = cfg, train_step.make_mesh()
    self.params, self.state = train_step.replicate(encoder_weights(pre.state, cfg.network),
                                                   self.mesh)
    self._embed = {}
    self.model_cfg, self.aug_cfg = pre.config.model, pre.config.augment

  def _fn(self, crop_fraction: float) -> Callable:
    if crop_fraction not in self._embed:
      self._embed[crop_fraction] = common.make_embed_fn(self.model_cfg, self.cfg.image_size,
                                                        crop_fraction, self.mesh, self.aug_cfg)
    return self._embed[crop_fraction]

  def arrays(self, images: np.ndarray) -> np.ndarray:
    """Features [N, D] of decoded images, in order."""
    return common.embed_arrays(self._fn(self.cfg.crop_fraction), self.params, self.state,
                               images, self.cfg.embed_batch_size, self.mesh.size)

  def stream(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a split streamed through tf.data (host centre crops)."""
    embed = self._fn(1.0)  # Host crops are final: the device crop is the identity.
    return stream_split(self.cfg, split, lambda images: embed(self.params, self.state, images),
                        self.mesh.size)


def stream_split(cfg: Any, split: str, apply: Callable[[np.ndarray], Any],
                 num_devices: int) -> tuple[np.ndarray, np.ndarray]:
  """apply(centre crops uint8 [B, S, S, 3]) over a split streamed by tf.data, and labels."""
  from byol_jax import input_pipeline  # TensorFlow only on this path
  spec = datasets.parse_dataset(cfg.dataset)
  batch = common.device_batch(cfg.embed_batch_size, num_devices)
  stream = input_pipeline.eval_stream(
    spec, split, batch_size=batch, image_size=cfg.image_size, data_dir=cfg.data_dir or None,
    crop_fraction=cfg.crop_fraction, strict=cfg.strict_data)
  return common.stream_features(apply, stream, cfg.max_examples, f'{cfg.dataset}/{split}')


def split_features(cfg: Any, embedder: Embedder, split: str, seed: int,
                   mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Centre-crop features and labels of one logical split; `mode` is the evaluation's
  input path (`evaluation_input_mode`, found once: it sizes every split)."""
  start = time.time()
  if mode == 'stream':
    x, y = labelled(cfg, split, *embedder.stream(split))
  else:
    data = load_split(cfg, split, seed)
    x, y = embedder.arrays(data.images), data.labels
  logging.info('features of %s/%s: %s in %.1f s', cfg.dataset, split, x.shape,
               time.time() - start)
  return x, y


# ------------------------------------------------------------------------------------------
# Linear heads on augmented views (the paper's protocol).
# ------------------------------------------------------------------------------------------


def _view_step(featurize: Callable, total_steps: int) -> Callable:
  """step(carry, weights, images, labels, lrs, aug_key) -> carry: one SGD step of every head
  on features of this minibatch's views (their randomness from aug_key and the step)."""

  def step(carry, weights, images, labels, lrs, aug_key):
    x = featurize(weights, images, jax.random.fold_in(aug_key, carry[2]))
    return linear_lib.head_update(carry, x, labels, lrs, total_steps)

  return step


def make_epoch_fn(featurize: Callable, batch_size: int, total_steps: int,
                  batch_sharding: NamedSharding | None = None) -> Callable:
  """epoch(carry, weights, images, labels, lrs, epoch_key, aug_key) -> carry, jitted.

  featurize(weights, uint8 batch, key) -> features [B, D] runs inside the step, so every
  epoch sees new crops. The minibatch order is `evaluators.linear`'s: a permutation drawn
  from the epoch key, the incomplete last batch dropped.
  """
  view_step = _view_step(featurize, total_steps)

  def epoch(carry, weights, images, labels, lrs, epoch_key, aug_key):

    def step(carry, idx):
      batch = images[idx]
      if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
      return view_step(carry, weights, batch, labels[idx], lrs, aug_key), None

    batches = linear_lib.epoch_batches(epoch_key, images.shape[0], batch_size)
    return jax.lax.scan(step, carry, batches)[0]

  return jax.jit(epoch)


def train_heads_on_views(images: Any, labels: Any, featurize: Callable, weights: Any,
                         num_classes: int, learning_rates: tuple[float, ...], epochs: int,
                         batch_size: int, seed: int,
                         batch_sharding: NamedSharding | None = None) -> linear_lib.Params:
  """One linear head per LR on features recomputed every step by `featurize`.

  With featurize returning its input unchanged this is `linear.train_linear_heads`: same
  zero init, minibatches and updates. Returns {'w': [H, D, C], 'b': [H, C]}.
  """
  batch_size = min(batch_size, images.shape[0])
  steps = images.shape[0] // batch_size
  dim = jax.eval_shape(featurize, weights, images[:1], jax.random.PRNGKey(0)).shape[-1]
  lrs = jnp.asarray(learning_rates, jnp.float32)
  carry = linear_lib.init_heads(dim, num_classes, len(learning_rates))
  epoch_fn = make_epoch_fn(featurize, batch_size, epochs * steps, batch_sharding)
  key = jax.random.PRNGKey(seed)
  aug_key = jax.random.fold_in(key, 1)
  for e, epoch_key in enumerate(jax.random.split(key, epochs)):
    start = time.time()
    carry = epoch_fn(carry, weights, images, labels, lrs, epoch_key, aug_key)
    jax.block_until_ready(carry)
    logging.info('linear epoch %d/%d (%d steps) in %.1f s', e + 1, epochs, steps,
                 time.time() - start)
  return carry[0]


def encoder_featurizer(model_cfg: Any, image_size: int, aug_cfg: Any) -> Callable:
  """featurize(weights, uint8 batch, key): crop + flip, then the frozen encoder."""
  encoder = networks.build_encoder(model_cfg)

  def featurize(weights, images, key):
    views = random_crop_flip(key, images, image_size, aug_cfg)
    feats, _ = encoder.apply(weights[0], weights[1], None, views)
    return jax.lax.stop_gradient(feats)

  return featurize


def flip_featurizer(model_cfg: Any, aug_cfg: Any) -> Callable:
  """featurize(weights, host crops uint8 [B, S, S, 3], key): flip, then the frozen encoder."""
  encoder = networks.build_encoder(model_cfg)

  def featurize(weights, crops, key):
    feats, _ = encoder.apply(weights[0], weights[1], None, random_flip(key, crops, aug_cfg))
    return jax.lax.stop_gradient(feats)

  return featurize


def _labelled_views(stream: Any, where: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(crops [B, S, S, 3], labels [B]) of a one-view train stream; an image without a class
  (label -1) stops it, as a resident split would leave it out but a stream cannot."""
  for batch in stream:
    if np.any(batch['labels'] < 0):
      raise ConfigError(f'{where} holds images without a class (label -1), which a streamed '
                        'linear head cannot train on; evaluate on a labelled split '
                        '(--config.train_split) or with mode=cached')
    yield batch['views'][:, 0], batch['labels']


def _fewest_across_processes(steps: int) -> int:
  """The least of every process's `steps`: hosts that ran different step counts would wait
  for each other's collectives for ever (a host whose shard holds an unreadable file has a
  step fewer per epoch); the others' streams then roll into their next epoch a step early."""
  if jax.process_count() == 1:
    return steps
  from jax.experimental import multihost_utils
  return int(np.min(multihost_utils.process_allgather(np.asarray(steps, np.int32))))


class _Stopwatch:
  """The seconds one evaluation has taken, summed over the invocations that trained it.

  Why: a stopped streamed evaluation resumes its heads from their progress file
  (`_HeadProgress`), and its record's `elapsed_sec` must count the time the earlier
  invocations spent on them, not the last invocation's alone (an ImageNet evaluation
  stopped after 70 of its 80 epochs recorded the last 10 epochs' time). Every progress file
  keeps the evaluation's elapsed time at its save; resuming one carries that time on. Time
  an earlier invocation spent after its last save is lost work and not counted, as the
  trainer's `train_sec` counts redone steps once.
  """

  def __init__(self) -> None:
    self.start, self.earlier = time.time(), 0.0

  def elapsed(self) -> float:
    """This invocation's seconds so far plus the earlier invocations' that were resumed."""
    return self.earlier + time.time() - self.start

  def resume(self, saved_sec: float) -> None:
    """Counts the earlier invocations' time kept in a resumed progress file. The largest
    kept time wins: the refit's file was saved after the sweep's and counts it already."""
    self.earlier = max(self.earlier, saved_sec)


class _HeadProgress:
  """The streamed heads' state after each epoch, kept under <workdir>/linear_eval_progress/
  so that an interrupted ImageNet evaluation (80 epochs of forward passes, and the refit's
  80: hours) goes on from its last epoch when the same command runs again. The file name
  holds a hash of everything that shapes the heads, so another setting never resumes it;
  it is removed once the evaluation that needs it has its result (the sweep's is kept
  through the refit, so an interrupted refit does not train the sweep again). Every process
  reads it; process 0 alone writes and removes it (the heads are replicated), as it alone
  writes metrics: processes renaming one shared <file>.tmp at once fail each other.
  Each file keeps a `run_id`, drawn when its heads start and written into the record
  (`heads_ids`): resumed heads already in a record are not recorded again
  (`recorded_heads`)."""

  def __init__(self, workdir: str | None, identity: dict[str, Any],
               clock: _Stopwatch | None = None):
    self.identity, self.clock = identity, clock or _Stopwatch()
    # Drawn when these heads start training and kept through resumes: the record carries
    # it (`heads_ids`), so a rerun can tell heads already recorded from heads to report.
    self.run_id = uuid.uuid4().hex[:16]
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = f"step{identity['checkpoint_step']}_{identity['split']}_{digest}.npz"
    self.path = os.path.join(progress_folder(workdir), name) if workdir else None

  def load(self, carry: linear_lib.HeadsCarry) -> linear_lib.HeadsCarry:
    """The saved carry if there is one of this setting, else `carry`."""
    if not self.path or not os.path.exists(self.path):
      if self.path:
        self._say_what_is_not_resumed()
      return carry
    leaves, treedef = jax.tree.flatten(carry)
    with np.load(self.path) as saved:
      loaded = [saved[f'leaf{i}'] for i in range(len(leaves))]
      kept_sec = float(saved['elapsed_sec']) if 'elapsed_sec' in saved.files else 0.0
      run_id = str(saved['run_id']) if 'run_id' in saved.files else self.run_id
    if [x.shape for x in loaded] != [np.shape(x) for x in leaves]:
      logging.warning('%s does not fit these heads: starting afresh', self.path)
      return carry
    logging.info('resuming the linear heads at step %d from %s', int(loaded[-1]), self.path)
    self.clock.resume(kept_sec)
    self.run_id = run_id
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in loaded])

  def save(self, carry: linear_lib.HeadsCarry) -> None:
    if not self.path or jax.process_index() != 0:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    leaves = jax.device_get(jax.tree.leaves(carry))
    with open(self.path + '.tmp', 'wb') as f:
      np.savez(f, elapsed_sec=np.float64(self.clock.elapsed()),
               identity=np.asarray(json.dumps(self.identity, sort_keys=True)),
               run_id=np.asarray(self.run_id),
               **{f'leaf{i}': x for i, x in enumerate(leaves)})
    os.replace(self.path + '.tmp', self.path)

  def done(self) -> None:
    if jax.process_index() != 0:
      return
    if self.path and os.path.exists(self.path):
      os.remove(self.path)
    if self.path:
      with contextlib.suppress(OSError):  # the folder, once no other setting's file is left
        os.rmdir(os.path.dirname(self.path))

  def _say_what_is_not_resumed(self) -> None:
    """Warns, before these heads train from their first step, about kept heads of the same
    checkpoint step and split that another setting trained. Why: a setting changed by
    mistake (an LR grid, the epochs) would otherwise start hours of training afresh beside
    the file the intended command resumes, without a word."""
    prefix = f"step{self.identity['checkpoint_step']}_{self.identity['split']}_"
    for kept in read_kept_progress(os.path.dirname(self.path)):
      name = os.path.basename(kept.path)  # an unfinished save (.tmp) resumes nothing
      if name.startswith(prefix) and name.endswith('.npz') and kept.path != self.path:
        logging.warning('linear_eval: not resuming %s, heads of another setting (%s); these '
                        'heads train from their first step, and the command of that setting '
                        'still resumes it', kept.path, _differences(kept.identity,
                                                                     self.identity))


class AlreadyRecorded(Exception):
  """Raised when resumed heads turn out to be in a record already; carries that record."""

  def __init__(self, record: dict[str, Any]):
    super().__init__(f"heads already recorded at step {record.get('step')}")
    self.record = record


def recorded_heads(workdir: str, run_id: str) -> dict[str, Any] | None:
  """The linear_eval record that reported heads of this `run_id`, if one was written.

  Why: an evaluation stopped after its record was written but before its progress files
  were removed leaves heads trained to the end; the rerun resumes them and, without this
  check, appended a second record of the same evaluation.
  """
  path = metric_writers.jsonl_path(workdir, 'linear_eval')
  for record in reversed(metric_writers.read_jsonl(path)):
    if run_id in record.get('heads_ids', ()):
      return record
  return None


def _remove_recorded_progress(workdir: str, record: dict[str, Any]) -> None:
  """Removes the progress files of a record's heads (sweep and refit), as the invocation
  that wrote the record would have had it not been stopped (process 0 only)."""
  if jax.process_index() != 0:
    return
  folder = progress_folder(workdir)
  for kept in read_kept_progress(folder):
    if kept.run_id and kept.run_id in record.get('heads_ids', ()):
      with contextlib.suppress(OSError):
        os.remove(kept.path)
  with contextlib.suppress(OSError):
    os.rmdir(folder)


def progress_folder(workdir: str) -> str:
  """Where streamed heads' progress files are kept (`_HeadProgress`)."""
  return os.path.join(workdir, 'linear_eval_progress')


@dataclasses.dataclass
class KeptProgress:
  """One file under linear_eval_progress/: the setting that trained it (None: saved before
  settings were kept in the file, or unreadable), the heads' steps and seconds so far."""
  path: str
  identity: dict[str, Any] | None
  steps: int
  elapsed_sec: float
  run_id: str | None = None


def read_kept_progress(folder: str) -> list[KeptProgress]:
  """Every progress file in `folder`, an unfinished save (.tmp) included, read without
  loading the heads' arrays (ImageNet's six heads: 49 MB a file)."""
  try:
    names = sorted(os.listdir(folder))
  except OSError:
    return []
  return [_read_kept(os.path.join(folder, name)) for name in names]


def _read_kept(path: str) -> KeptProgress:
  """What a progress file says about itself; a file another evaluation removes meanwhile,
  or one its stopped save left unfinished, reads as unknown."""
  try:
    with np.load(path) as saved:
      leaves = sum(name.startswith('leaf') for name in saved.files)
      identity = (json.loads(str(saved['identity'])) if 'identity' in saved.files else None)
      elapsed = float(saved['elapsed_sec']) if 'elapsed_sec' in saved.files else 0.0
      run_id = str(saved['run_id']) if 'run_id' in saved.files else None
      return KeptProgress(path, identity, int(saved[f'leaf{leaves - 1}']), elapsed, run_id)
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
    return KeptProgress(path, None, 0, 0.0)


def _differences(kept: dict[str, Any] | None, ours: dict[str, Any]) -> str:
  """The fields in which a kept file's setting differs from this one, in words."""
  if kept is None:
    return 'its setting is not in the file'
  diffs = []
  for key in sorted(set(kept) | set(ours)):
    there, here = kept.get(key), ours.get(key)
    if there == here:
      continue
    if max(len(repr(there)), len(repr(here))) > 40:  # the encoder's hash, the augmentation
      diffs.append(key)
    else:
      diffs.append(f'{key} {there!r} there, {here!r} here')
  return 'differs in ' + '; '.join(diffs)


def _describe(kept: KeptProgress) -> str:
  """One kept file in a line: its setting's main fields and how far its heads got."""
  if kept.identity is None:
    if kept.path.endswith('.tmp'):
      return 'a save that was stopped unfinished: nothing resumes it'
    return f'{kept.steps} steps trained' if kept.steps else 'unreadable'
  fields = ('checkpoint_step', 'weights', 'network', 'split', 'epochs', 'learning_rates')
  setting = ', '.join(f'{k} {kept.identity.get(k)!r}' for k in fields)
  return f'{setting}: {kept.steps} steps trained in {kept.elapsed_sec:.0f} s'


def say_kept_progress(workdir: str) -> None:
  """Names the heads still kept under linear_eval_progress/ once an evaluation's record is
  written (its own files are gone by then), and how to remove them.

  Why: heads of a setting that was stopped and then changed stay there for ever otherwise
  (49 MB a file for ImageNet), unseen. They are not removed: the command of their setting
  resumes them, or an evaluation running now is training them; only the user knows which
  will never run again.
  """
  if jax.process_index() != 0:
    return
  kept = read_kept_progress(progress_folder(workdir))
  if not kept:
    return
  logging.warning('linear_eval: %s holds %d file(s) of heads that this evaluation did not '
                  'train, kept so that the command of their setting resumes them (or an '
                  'evaluation running now trains them):\n%s\nRemove those no evaluation will '
                  'resume: rm %s', progress_folder(workdir), len(kept),
                  '\n'.join(f'  {k.path}: {_describe(k)}' for k in kept),
                  ' '.join(k.path for k in kept))


def _fingerprint(tree: Any) -> str:
  """A hash of a pytree's arrays (the frozen encoder: about 0.1 GB for a ResNet-50)."""
  digest = hashlib.sha1()
  for leaf in jax.device_get(jax.tree.leaves(tree)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def train_heads_on_stream(cfg: Any, pre: Pretrained, embedder: Embedder, split: str,
                          num_classes: int, learning_rates: tuple[float, ...],
                          workdir: str | None = None, clock: _Stopwatch | None = None,
                          ) -> tuple[linear_lib.Params, int, _HeadProgress]:
  """One linear head per LR on random crops + flips of a split that streams (ImageNet):
  the host takes the crop (tf.data, as the pretraining stream), the device flips and runs
  the frozen encoder, every step on new crops. Epochs are the whole batches of the split's
  readable images, as for resident splits, and the update and its schedule are
  `head_update`'s. Returns the heads, how many images they trained on and their progress.
  With a workdir, progress is kept after every epoch and an interrupted run resumes; the
  caller removes it (`_HeadProgress.done`) once the heads' result is safe. `clock`, the
  evaluation's, is kept with the progress and takes on the time a resumed one kept.
  """
  from byol_jax import checkpointing, input_pipeline  # TensorFlow only on this path
  mesh = embedder.mesh
  batch = common.device_batch(cfg.batch_size, mesh.size)
  where = f'{cfg.dataset}/{split}'
  featurize = flip_featurizer(pre.config.model, pre.config.augment)
  weights = (embedder.params, embedder.state)
  dim = jax.eval_shape(lambda w, x: featurize(w, x, jax.random.PRNGKey(0)), weights,
                       jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3),
                                            np.uint8)).shape[-1]
  spec = datasets.parse_dataset(cfg.dataset)
  progress = _HeadProgress(workdir, dict(
    checkpoint_step=pre.step, weights=pre.weights, network=cfg.network, dataset=cfg.dataset,
    data_dir=cfg.data_dir, split=split, image_size=cfg.image_size, epochs=cfg.epochs,
    batch=batch, seed=cfg.seed, learning_rates=list(learning_rates),
    num_classes=num_classes, strict=cfg.strict_data,
    # The step does not pin the encoder (random_init's BN statistics follow crop_fraction
    # and bn_calibration_examples; a run folder trained again has other weights at the same
    # steps), nor the crops (the run's augmentation) or the data (a folder that changed).
    encoder=_fingerprint(weights), augment=checkpointing.config_to_dict(pre.config.augment),
    examples=datasets.dataset_size(spec, split, cfg.data_dir or None)), clock)
  carry = progress.load(linear_lib.init_heads(dim, num_classes, len(learning_rates)))
  if workdir and (earlier := recorded_heads(workdir, progress.run_id)):
    raise AlreadyRecorded(earlier)
  done = int(carry[2])
  stream = input_pipeline.train_stream(
    spec, batch_size_per_process=batch // jax.process_count(),
    image_size=cfg.image_size, aug_cfg=pre.config.augment, data_dir=cfg.data_dir or None,
    seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
    start_step=done, strict=cfg.strict_data, split=split, num_views=1)
  # Not stream.steps_per_epoch, which counts the files scanned: an epoch of the stream is its
  # readable images' whole batches, which hosts agree on only without unreadable files.
  spe = _fewest_across_processes(stream.examples_per_epoch // (batch // jax.process_count()))
  total = cfg.epochs * spe
  step = jax.jit(_view_step(featurize, total), donate_argnums=0)
  lrs = jnp.asarray(learning_rates, jnp.float32)
  aug_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
  batches = input_pipeline.prefetch_to_device(_labelled_views(stream, where), 2,
                                              NamedSharding(mesh, P(train_step.AXIS)))
  logging.info('training %d linear head(s) on streamed crops of %s: %d epochs of %d steps '
               '(batch %d)', len(learning_rates), where, cfg.epochs, spe, batch)
  start = epoch_start = time.time()
  for t in range(done + 1, total + 1):
    carry = step(carry, weights, *next(batches), lrs, aug_key)
    if t % spe == 0:
      progress.save(carry)  # fetches the carry: the epoch's time is complete
      now = time.time()
      logging.info('linear epoch %d/%d in %.1f s (%.0f img/s), ETA %.0f s', t // spe,
                   cfg.epochs, now - epoch_start, spe * batch / (now - epoch_start),
                   (now - start) / (t - done) * (total - t))
      epoch_start = now
  return jax.device_get(carry[0]), progress.identity['examples'] - stream.skipped, progress


# ------------------------------------------------------------------------------------------
# The two protocols.
# ------------------------------------------------------------------------------------------


def _cached(cfg: Any, pre: Pretrained, embedder: Embedder) -> tuple[dict, dict]:
  """Heads on centre-crop features; returns (result, split sizes)."""
  seed, mode = pre.config.seed, evaluation_input_mode(cfg)
  pool_x, pool_y = split_features(cfg, embedder, cfg.train_split, seed, mode)
  train_rows, val_rows = hold_out(cfg, len(pool_y))
  val = (split_features(cfg, embedder, cfg.val_split, seed, mode) if cfg.val_split
         else (pool_x[val_rows], pool_y[val_rows]))
  test = split_features(cfg, embedder, cfg.test_split, seed, mode)
  classes = num_classes(cfg, pool_y, val[1], test[1])
  logging.info('training %d linear heads for %d epochs on %d examples', len(cfg.learning_rates),
               cfg.epochs, len(train_rows))
  result = linear_lib.linear_eval(pool_x[train_rows], pool_y[train_rows], *val, *test,
                                  num_classes=classes, learning_rates=tuple(cfg.learning_rates),
                                  epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                                  normalize=cfg.normalize_features, refit=cfg.refit)
  sizes = dict(train=len(train_rows), val=len(val[1]), test=len(test[1]))
  if cfg.refit:
    sizes['refit'] = len(train_rows) + len(val[1])
  return dict(result, num_classes=classes, feature_dim=int(pool_x.shape[1])), sizes


def _augmented(cfg: Any, pre: Pretrained, embedder: Embedder, workdir: str | None,
               progress: list[_HeadProgress], clock: _Stopwatch) -> tuple[dict, dict]:
  """Heads on random crop + flip views through the frozen encoder; centre crops for eval.
  A streamed train split appends its heads' progress to `progress`, for the caller to
  remove once the record is written, and keeps `clock` with it."""
  seed = pre.config.seed
  if input_mode(cfg, cfg.train_split) == 'stream':
    return _augmented_stream(cfg, pre, embedder, workdir, progress, clock)
  pool = load_split(cfg, cfg.train_split, seed, random_crops=True)
  train_rows, val_rows = hold_out(cfg, len(pool.labels))
  mode = evaluation_input_mode(cfg)
  val = (split_features(cfg, embedder, cfg.val_split, seed, mode) if cfg.val_split
         else (embedder.arrays(pool.images[val_rows]), pool.labels[val_rows]))
  test = split_features(cfg, embedder, cfg.test_split, seed, mode)
  classes = num_classes(cfg, pool.labels, val[1], test[1])
  mesh = embedder.mesh
  images, labels = train_step.replicate((pool.images[train_rows], pool.labels[train_rows]), mesh)
  featurize = encoder_featurizer(pre.config.model, cfg.image_size, pre.config.augment)
  batch = common.device_batch(cfg.batch_size, mesh.size)
  logging.info('training %d linear heads for %d epochs on augmented views of %d examples',
               len(cfg.learning_rates), cfg.epochs, len(train_rows))
  params = train_heads_on_views(images, labels, featurize, (embedder.params, embedder.state),
                                classes, tuple(cfg.learning_rates), cfg.epochs, batch, cfg.seed,
                                NamedSharding(mesh, P(train_step.AXIS)))
  result = linear_lib.report_heads(jax.device_get(params), tuple(cfg.learning_rates), val, test)
  if cfg.refit:
    # Free the sweep's device copy first: every device holds a full replica, and the refit
    # copy (train + validation) would otherwise sit beside it.
    del images, labels, params
    val_images = (load_split(cfg, cfg.val_split, seed).images if cfg.val_split
                  else pool.images[val_rows])
    images, labels = train_step.replicate(
      (np.concatenate([pool.images[train_rows], val_images]),
       np.concatenate([pool.labels[train_rows], val[1]])), mesh)
    logging.info('refitting one head at lr %g on %d train + validation examples',
                 result['best_lr'], len(labels))
    params = train_heads_on_views(images, labels, featurize, (embedder.params, embedder.state),
                                  classes, (result['best_lr'],), cfg.epochs, batch, cfg.seed,
                                  NamedSharding(mesh, P(train_step.AXIS)))
    result = linear_lib.with_refit(result, linear_lib.evaluate_heads(jax.device_get(params),
                                                                     *test))
  sizes = dict(train=len(train_rows), val=len(val[1]), test=len(test[1]))
  if cfg.refit:
    sizes['refit'] = len(train_rows) + len(val[1])
  return dict(result, num_classes=classes, feature_dim=int(test[0].shape[1])), sizes


def _refit_split(cfg: Any) -> str:
  """The logical split a streamed refit reads: train + validation as the dataset defines it
  (ImageNet's 'trainval' is all of TFDS train), as rows cannot be joined across streams."""
  if (cfg.train_split, cfg.val_split) == ('train', 'valid'):
    return 'trainval'
  raise ConfigError(f"refit with a streamed train split reads 'trainval', the union of "
                    f"train_split='train' and val_split='valid', but this evaluation has "
                    f"train_split={cfg.train_split!r}, val_split={cfg.val_split!r}; use those "
                    "splits or --config.refit=False")


def _augmented_stream(cfg: Any, pre: Pretrained, embedder: Embedder, workdir: str | None,
                      trained: list[_HeadProgress], clock: _Stopwatch) -> tuple[dict, dict]:
  """mode='augmented' when the train split does not fit in memory (ImageNet): heads train on
  streamed random crops (`train_heads_on_stream`), validation and test on streamed centre
  crops; the refit streams train + validation. The heads' progress goes into `trained`:
  `evaluate` removes it once the record is written, so that nothing trained is lost to a
  failed write or a stop before it."""
  if not cfg.val_split:
    raise ConfigError(f"{cfg.dataset}/{cfg.train_split} streams, and rows cannot be held "
                      "out of a stream: set --config.val_split (e.g. 'valid')")
  if cfg.max_examples:
    raise ConfigError(f"max_examples={cfg.max_examples} cannot shorten a streamed train "
                      "split's epochs; use mode='cached', or a smaller split")
  refit_split = _refit_split(cfg) if cfg.refit else None
  seed = pre.config.seed
  val = split_features(cfg, embedder, cfg.val_split, seed, 'stream')
  test = split_features(cfg, embedder, cfg.test_split, seed, 'stream')
  classes = num_classes(cfg, val[1], test[1])
  lrs = tuple(cfg.learning_rates)
  # The sweep's progress stays on disk until the refit's heads are trained too.
  params, trained_on, sweep = train_heads_on_stream(cfg, pre, embedder, cfg.train_split,
                                                    classes, lrs, workdir, clock)
  trained.append(sweep)
  result = linear_lib.report_heads(params, lrs, val, test)
  if refit_split:
    logging.info('refitting one head at lr %g on %s/%s', result['best_lr'], cfg.dataset,
                 refit_split)
    params, refit_on, refit = train_heads_on_stream(cfg, pre, embedder, refit_split, classes,
                                                    (result['best_lr'],), workdir, clock)
    trained.append(refit)
    result = linear_lib.with_refit(result, linear_lib.evaluate_heads(params, *test))
  sizes = dict(train=trained_on, val=len(val[1]), test=len(test[1]))
  if refit_split:
    sizes.update(refit=refit_on, refit_split=refit_split)
  return dict(result, num_classes=classes, feature_dim=int(test[0].shape[1])), sizes


def evaluate(cfg: Any, pre: Pretrained, workdir: str) -> dict[str, Any]:
  """Runs linear evaluation of `pre` as configured; appends and returns the record."""
  cfg = resolve_config(cfg, pre.config)
  clock = _Stopwatch()  # with the time of the earlier invocations whose heads it resumes
  logging.info('linear_eval (%s) of the %s encoder at step %d (%s) on %s', cfg.mode,
               cfg.network, pre.step, pre.weights, cfg.dataset)
  embedder = Embedder(cfg, pre)
  progress = []  # streamed heads' progress: kept until their record is written
  if cfg.mode == 'cached':
    result, sizes = _cached(cfg, pre, embedder)
  else:
    try:
      result, sizes = _augmented(cfg, pre, embedder, workdir, progress, clock)
    except AlreadyRecorded as e:
      for trained in progress:  # a sweep trained again before its refit was found recorded
        trained.done()
      return _already_recorded(workdir, e.record)
  record = write_record(workdir, 'linear_eval', pre.step,
                        _record(cfg, pre, result, sizes, progress, clock))
  for trained in progress:
    trained.done()
  say_kept_progress(workdir)
  head = ('of the head refit on train + validation' if record['refit']
          else "of the sweep's head")
  if 'test_map' in record:
    logging.info('linear_eval: best lr %g, val mAP %.4f, test mAP %.4f (11-point) %s',
                 record['best_lr'], record['val_map'], record['test_map'], head)
  else:
    logging.info('linear_eval: best lr %g, val top-1 %.4f, test top-1 %.4f, top-5 %.4f %s',
                 record['best_lr'], record['val_top1'], record['test_top1'], record['test_top5'],
                 head)
  return record


def _record(cfg: Any, pre: Pretrained, result: dict[str, Any], sizes: dict[str, Any],
            progress: list[_HeadProgress], clock: _Stopwatch) -> dict[str, Any]:
  """The record of one evaluation: provenance, the splits of the head that the test figures
  are of (the refit's, the sweep's under `sweep`), settings, result and the streamed heads'
  ids (`heads_ids`, which a rerun checks before recording them again)."""
  result = dict(result, refit=result.get('refit', False))
  if progress:
    result['heads_ids'] = [p.run_id for p in progress]
  splits, sweep = split_record(cfg, pre.config.seed, sizes), {}
  if result['refit']:
    splits, sweep = refit_splits(cfg, pre.config.seed, splits, sizes['refit'],
                                 sizes.get('refit_split'))
    sweep = dict(sweep=dict(sweep, batch_size=cfg.batch_size))
  return dict(provenance(cfg, pre, f'linear_{cfg.mode}'), splits=splits, **sweep,
              epochs=cfg.epochs, batch_size=cfg.batch_size,
              learning_rates=list(cfg.learning_rates), **result, elapsed_sec=clock.elapsed())


def _already_recorded(workdir: str, record: dict[str, Any]) -> dict[str, Any]:
  """Says that this evaluation's heads were recorded by an invocation stopped before it
  removed their progress, removes it, and returns that record instead of a second one."""
  _remove_recorded_progress(workdir, record)
  metric = 'test_map' if 'test_map' in record else 'test_top1'
  logging.warning('linear_eval: these heads are already recorded in %s (step %s, %s %s): an '
                  'earlier invocation wrote the record and stopped before removing their '
                  'progress, now removed; no second record is written. Rerun the command to '
                  'evaluate afresh.', metric_writers.jsonl_path(workdir, 'linear_eval'),
                  record.get('step'), metric, record.get(metric))
  say_kept_progress(workdir)
  return record


def write_record(workdir: str, name: str, step: int, record: dict[str, Any]) -> dict[str, Any]:
  """Appends one record to <workdir>/metrics/<name>.jsonl (process 0 only)."""
  writer = metric_writers.MetricWriter(workdir, name, jax.process_index() == 0)
  try:
    return writer.write(step, record)
  finally:
    writer.close()


def run(cfg: Any, workdir: str) -> int:
  """The worker entry point: evaluates the checkpoint that cfg names in workdir."""
  evaluate(cfg, load_pretrained(cfg, workdir), workdir)
  return 0


if __name__ == '__main__':
  from byol_jax import cli
  cli.worker_module_main('byol_jax.linear_eval')  # not __spec__.name: None when run by path
