"""Weighted k-nearest-neighbour evaluation of frozen features (InstDisc style).

Why kNN: it needs no training, has no learning rate to tune and is cheap enough to run
every few epochs, so it is the standard progress signal for self-supervised learning on
small datasets. The protocol (Wu et al., 2018, used by many BYOL/SimSiam reproductions):

- features are L2-normalised, similarity is the cosine;
- each test example takes its k most similar training examples (k = 200);
- neighbour i votes for its class with weight exp(sim_i / temperature) (temperature 0.1);
- the class scores are the summed votes; top-1/top-5 come from ranking them.

The test set is processed in fixed-size chunks by one jitted function (the last chunk is
zero-padded), so the function compiles once and memory is bounded by chunk_size x N_train
similarities, e.g. 1024 x 50,000 floats (200 MB) for CIFAR-sized evaluation.

`KnnEval` is a run's kNN evaluation (the trainer's and the eval worker's): which images form
the two sets, how they are decoded or streamed, and their features under an encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from byol_jax import data as data_lib
from byol_jax import datasets
from byol_jax.evaluators import common


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x||; all-zero rows (e.g. chunk padding) stay zero instead of becoming NaN."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _chunk_scores(train_features: jax.Array, train_labels: jax.Array, test_chunk: jax.Array,
                  k: int, num_classes: int, temperature: float) -> jax.Array:
  """Class scores [chunk, num_classes] for one chunk of test features.

  train_features must already be L2-normalised. The matmul runs at full float32 precision
  so that accelerators with TF32 defaults pick the same neighbours as the CPU.
  """
  sims = jnp.matmul(_l2_normalize(test_chunk), train_features.T,
                    precision=jax.lax.Precision.HIGHEST)
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  rows = jnp.arange(test_chunk.shape[0])[:, None]
  scores = jnp.zeros((test_chunk.shape[0], num_classes), jnp.float32)
  # Scatter-add rather than a [chunk, k, C] one-hot: memory stays O(chunk x C) for C = 1000.
  return scores.at[rows, train_labels[top_idx]].add(weights)


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, num_classes: int, k: int = 200,
                 temperature: float = 0.1, chunk_size: int = 1024) -> np.ndarray:
  """Returns weighted-kNN class scores, float32 [N_test, num_classes]; argmax predicts.

  k is clipped to the training-set size. Ties in similarity go to the lower training
  index (jax.lax.top_k's rule).
  """
  train_labels = np.asarray(train_labels)
  num_train, num_test = train_labels.shape[0], np.shape(test_features)[0]
  if num_train == 0:
    raise ValueError("kNN needs at least one training example")
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"train labels must lie in [0, {num_classes})")
  k = min(k, num_train)
  train = _l2_normalize(jnp.asarray(train_features, jnp.float32))
  labels = jnp.asarray(train_labels, jnp.int32)
  test = np.asarray(test_features, np.float32)
  chunk = max(1, min(chunk_size, num_test))
  padded = np.zeros((-(-num_test // chunk) * chunk, test.shape[1]), np.float32)
  padded[:num_test] = test
  scores = [np.asarray(_chunk_scores(train, labels, padded[i:i + chunk], k, num_classes,
                                     temperature))
            for i in range(0, padded.shape[0], chunk)]
  return np.concatenate(scores or [np.zeros((0, num_classes), np.float32)])[:num_test]


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, topk: int) -> float:
  """Fraction of rows whose label is among the `topk` highest scores (ties: lower class).

  topk is clipped to the number of classes, so top-5 on a 3-class task is top-3 (= 1.0).
  """
  topk = min(topk, scores.shape[1])
  # Stable sort on -scores ranks tied classes by index, matching jax.lax.top_k.
  top = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, num_classes: int,
                 k: int = 200, temperature: float = 0.1,
                 chunk_size: int = 1024) -> dict[str, float]:
  """Weighted-kNN top-1 and top-5 accuracy of test features against train features."""
  scores = knn_classify(train_features, train_labels, test_features, num_classes, k=k,
                        temperature=temperature, chunk_size=chunk_size)
  return {"top1": topk_accuracy(scores, test_labels, 1),
          "top5": topk_accuracy(scores, test_labels, 5)}


# ------------------------------------------------------------------------------------------
# The kNN evaluation of a run: its two sets, their features and the score.
# ------------------------------------------------------------------------------------------


class KnnEval:
  """kNN top-1/top-5 of an encoder on the dataset's test split, features of the pretraining
  split's labelled images (label -1, an image without a class, is left out of both sets).

  Splits that fit in memory are decoded once and kept (resident data). A run whose data
  streams (ImageNet) streams both splits through tf.data at each evaluation instead (host
  centre crops): decoding 1.28M training images into
  memory would not fit.

  `unavailable` says why there is no kNN ('' while there is): a dataset without class
  labels (VOC, or STL-10's 'unlabelled' split alone), or a folder without test/. Callers
  skip the evaluation and say so;
  a streamed run finds out at its first evaluation. Either way `knn.train_examples` takes
  the first N labelled images.
  """

  def __init__(self, cfg: Any, mesh, train: data_lib.Split | None,
               streamed: bool | None = None):
    self.cfg, self.mesh = cfg, mesh
    self.split = data_lib.pretrain_split(cfg)
    if streamed is None:
      streamed = train is None and data_lib.choose_mode(cfg)[0] == 'stream'
    self.streamed = streamed
    self.train = self.test = None
    self.train_labels = self.test_labels = None  # known after the first features() if streamed
    self.unavailable = datasets.missing_split(datasets.parse_dataset(cfg.dataset), 'test')
    if self.unavailable:
      self.num_classes = 0
    elif streamed:
      self.num_classes = data_lib.num_classes_of(cfg)
      logging.info('kNN evaluation reads %s (%s and test splits) through tf.data at each '
                   'evaluation, as this run\'s training data streams', cfg.dataset, self.split)
    else:
      # Eval views crop eval_crop_fraction of the stored side: store the kNN sets at
      # image_size / eval_crop_fraction (as linear_eval.decode_size), so the crop is not
      # upsampled from fewer than image_size pixels. The pretraining copy is reused only
      # when it already has that size (eval_crop_fraction 1).
      decode_cfg = _knn_decode_config(cfg)
      if train is None or decode_cfg is not cfg:
        train = data_lib.load_split(decode_cfg, self.split)
      self.train = _labelled(train, cfg.knn.train_examples)
      self.test = _labelled(data_lib.load_split(decode_cfg, 'test'))
      self.train_labels, self.test_labels = self.train.labels, self.test.labels
      self._check_labelled()
      self.num_classes = (max(int(self.train.labels.max()), int(self.test.labels.max())) + 1
                          if not self.unavailable else 0)
    # Streamed crops come from the host already cropped: the device crop is the identity.
    self.crop_fraction = 1.0 if streamed else cfg.eval_crop_fraction
    self.embed = common.make_embed_fn(cfg.model, cfg.image_size, self.crop_fraction, mesh,
                                      cfg.augment)

  def _check_labelled(self) -> None:
    """Sets `unavailable` when either kNN set has no labelled image."""
    empty = [f'{self.cfg.dataset}[{split}]' for split, labels in
             ((self.split, self.train_labels), ('test', self.test_labels)) if not len(labels)]
    if empty:
      self.unavailable = (f'{" and ".join(empty)} {"have" if len(empty) > 1 else "has"} no '
                          'labelled images (label -1 throughout), which kNN needs')

  def _batch_size(self) -> int:
    return common.device_batch(self.cfg.knn.batch_size, self.mesh.size)

  def _stream(self, split: str, batch_size: int = 0):
    from byol_jax import input_pipeline  # TensorFlow only on this path
    cfg = self.cfg
    return input_pipeline.eval_stream(
      datasets.parse_dataset(cfg.dataset), split, batch_size=batch_size or self._batch_size(),
      image_size=cfg.image_size, data_dir=cfg.data_dir or None,
      crop_fraction=cfg.eval_crop_fraction, strict=cfg.strict_data)

  def features(self, params, state) -> tuple[np.ndarray, np.ndarray]:
    """Eval-view embeddings of the labelled train and test images."""
    if self.streamed:
      apply = lambda images: self.embed(params, state, images)
      train, self.train_labels = common.stream_features(
        apply, self._stream(self.split), self.cfg.knn.train_examples,
        f'kNN features of {self.cfg.dataset}/{self.split}', labelled_only=True)
      test, self.test_labels = common.stream_features(
        apply, self._stream('test'), 0, f'kNN features of {self.cfg.dataset}/test',
        labelled_only=True)
      self._check_labelled()
      return train, test
    train, test = [common.embed_arrays(self.embed, params, state, s.images,
                                       self.cfg.knn.batch_size, self.mesh.size)
                   for s in (self.train, self.test)]
    return train, test

  def calibration_batches(self, seed: int) -> Callable[[], Any]:
    """A factory of image batches from the kNN training split for BN recalibration (embed
    them with `self.crop_fraction`)."""
    if self.streamed:
      return self._streamed_calibration_batches
    return lambda: common.calibration_batches(self.train.images, self.cfg.knn.batch_size,
                                              self.mesh.size, common.BN_CALIBRATION_EXAMPLES,
                                              seed)

  def _streamed_calibration_batches(self) -> Iterator[np.ndarray]:
    """Full batches only, so no larger than the split (sized when first needed: a folder
    scan of ImageNet is not for every evaluation)."""
    size = datasets.dataset_size(datasets.parse_dataset(self.cfg.dataset), self.split,
                                 self.cfg.data_dir or None)
    batch = min(self._batch_size(), common.device_batch(size, self.mesh.size))
    return common.spread_batches(self._stream(self.split, batch), batch,
                                 common.BN_CALIBRATION_EXAMPLES, self.mesh.size)

  def score(self, train_features: np.ndarray, test_features: np.ndarray) -> dict[str, float]:
    """knn_top1/top5 ({} when `unavailable`)."""
    if self.unavailable:
      return {}
    result = knn_accuracy(train_features, self.train_labels, test_features,
                                  self.test_labels, self.num_classes, k=self.cfg.knn.k,
                                  temperature=self.cfg.knn.temperature)
    return {'knn_top1': result['top1'], 'knn_top5': result['top5']}

  def settings(self) -> dict[str, Any]:
    """What a kNN figure depends on besides the encoder, for its record (the trainer's and
    the eval worker's alike): k as used (at most the reference set's size), the temperature
    and the two sets' sizes. Why: the eval worker takes its kNN settings from its own
    --config, so its figure for the trainer's final checkpoint can differ from the
    trainer's (a reference set of the first 200 images against all of them); records that
    carry the settings show why. Known once `features` has run (a streamed run's sizes)."""
    return dict(knn_k=min(self.cfg.knn.k, len(self.train_labels)),
                knn_temperature=self.cfg.knn.temperature,
                train_examples=len(self.train_labels), test_examples=len(self.test_labels))

  def __call__(self, params, state) -> dict[str, float]:
    return self.score(*self.features(params, state))


def _knn_decode_config(cfg: Any) -> Any:
  """cfg itself, or a copy whose image_size is the kNN sets' stored side
  round(image_size / eval_crop_fraction) when that differs."""
  size = data_lib.eval_decode_size(cfg.image_size, cfg.eval_crop_fraction)
  if size == cfg.image_size or datasets.parse_dataset(cfg.dataset).kind == 'demo':
    return cfg
  out = cfg.copy_and_resolve_references()
  out.image_size = size
  return out


def _labelled(split: data_lib.Split, limit: int = 0) -> data_lib.Split:
  """The split's images that have a class (label >= 0), the first `limit` (0: all)."""
  end = limit or None
  if np.all(split.labels >= 0):  # slices: no copy of the images
    return data_lib.Split(split.images[:end], split.labels[:end])
  keep = np.flatnonzero(split.labels >= 0)[:end]
  return data_lib.Split(split.images[keep], split.labels[keep])
