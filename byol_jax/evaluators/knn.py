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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


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
