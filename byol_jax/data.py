"""Where data enters training: device-resident arrays or a host stream, chosen once.

Data that fits in accelerator memory is decoded once and kept on the devices (uint8),
and the step samples and augments it there; anything larger streams through tf.data
(`input_pipeline`), which is imported only on that path so the resident path runs
without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from byol_jax import config_compat, datasets, demo_data


def pretrain_split(cfg: Any) -> str:
  """The split BYOL trains on (`pretrain_split`, 'trainval' by default: every training
  image; the 'valid' hold-out inside it only matters for choosing the linear-evaluation LR,
  which never sees pretraining)."""
  return config_compat.setting(cfg, 'pretrain_split')


@dataclasses.dataclass
class Split:
  """Decoded images (uint8 [N, S, S, 3]) and int32 labels of one split, in host memory."""
  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass
class TrainData:
  """What the host loop needs to know about its training data."""
  mode: str  # 'device' | 'stream'
  num_examples: int
  num_classes: int
  train: Split | None  # resident mode: the training split
  stream: Iterator[dict[str, np.ndarray]] | None = None  # stream mode: host batches


def eval_decode_size(image_size: int, crop_fraction: float) -> int:
  """Stored side of images that evaluation centre-crops: its crop of crop_fraction then
  holds image_size pixels and needs no upsampling (224 px, 0.875 -> 256)."""
  return int(round(image_size / crop_fraction))


def device_memory_bytes() -> int:
  """Memory of one local accelerator; a generous host-RAM stand-in on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return int(stats.get('bytes_limit', 8 * 2**30))


def load_split(cfg: Any, split: str, random_crops: bool = False) -> Split:
  """Decodes a whole split into host memory (demo, image folder or small TFDS dataset);
  `random_crops` (the training split) warns when centre squares lose much of the images."""
  spec = datasets.parse_dataset(cfg.dataset)
  if spec.kind == 'demo':
    split = 'train' if split in ('train', 'trainval') else split
    count = cfg.demo.train_examples if split == 'train' else cfg.demo.test_examples
    images, labels = demo_data.make_demo_dataset(split, count or 5000, cfg.image_size, cfg.seed)
    return Split(images, labels.astype(np.int32))
  images, labels, info = datasets.load_arrays(
    spec, split, data_dir=cfg.data_dir or None, image_size=cfg.image_size,
    strict=cfg.strict_data, seed=cfg.seed)
  warning = datasets.centre_square_warning(info, f'{cfg.dataset}/{split}',
                                           ', as --config.input_mode=stream does')
  if random_crops and warning:
    logging.warning('%s', warning)
  return Split(images, labels.astype(np.int32))


def num_classes_of(cfg: Any) -> int:
  """Outputs of the online probe: the dataset's classes, at least one (a dataset without a
  label feature keeps a one-class probe that every image, label -1, leaves out)."""
  spec = datasets.parse_dataset(cfg.dataset)
  if spec.kind == 'demo':
    return demo_data.NUM_CLASSES
  return max(1, int(datasets.num_classes(spec, cfg.data_dir or None)))


def _train_size(cfg: Any, spec: datasets.DatasetSpec) -> int:
  if spec.kind == 'demo':
    return cfg.demo.train_examples or 5000
  return int(datasets.dataset_size(spec, pretrain_split(cfg), cfg.data_dir or None))


def choose_mode(cfg: Any) -> tuple[str, str]:
  """'device' or 'stream' for this config, with the reason (logged by the caller)."""
  spec = datasets.parse_dataset(cfg.dataset)
  if spec.kind == 'demo':
    return 'device', 'the demo data is generated in memory'
  return datasets.choose_input_mode(_train_size(cfg, spec), cfg.image_size,
                                    device_memory_bytes(), cfg.input_mode)


def make_train_data(cfg: Any, start_step: int = 0) -> TrainData:
  """Loads or opens the training data in the mode `choose_mode` picks."""
  mode, reason = choose_mode(cfg)
  logging.info('input mode: %s (%s)', mode, reason)
  num_classes = num_classes_of(cfg)
  if mode == 'device':
    train = load_split(cfg, pretrain_split(cfg), random_crops=True)
    if len(train.labels) < cfg.batch_size:
      raise datasets.DataError(
        f'{cfg.dataset} has {len(train.labels)} training images, fewer than one batch of '
        f'{cfg.batch_size}: lower --config.batch_size or add images')
    return TrainData('device', len(train.labels), num_classes, train)
  from byol_jax import input_pipeline  # TensorFlow only on this path
  spec = datasets.parse_dataset(cfg.dataset)
  per_process = cfg.batch_size // jax.process_count()
  stream = input_pipeline.train_stream(
    spec, batch_size_per_process=per_process, image_size=cfg.image_size, aug_cfg=cfg.augment,
    data_dir=cfg.data_dir or None, seed=cfg.seed, process_index=jax.process_index(),
    process_count=jax.process_count(), start_step=start_step, strict=cfg.strict_data,
    split=pretrain_split(cfg), shuffle_buffer=cfg.shuffle_buffer)
  return TrainData('stream', _train_size(cfg, spec), num_classes, None, stream)
