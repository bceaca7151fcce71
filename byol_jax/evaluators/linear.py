"""Linear evaluation of frozen features with a learning-rate sweep chosen on validation.

The paper's protocol (see ../shared/reference/byol_facts.md): a linear classifier on frozen encoder
features, SGD with Nesterov momentum 0.9, no weight decay, cosine LR decay to zero over a
fixed number of epochs, the LR picked on a validation split held out from the training
set, and the result reported on the test set at that LR only. Picking the LR on the test
set would inflate the number; this module never looks at test accuracy to choose.

Why a vmapped sweep: a linear head is tiny next to the features it reads, so training all
candidate LRs at once (one head per LR, sharing every minibatch) costs about as much as
training one, and the whole run is a single compiled XLA program (scan over epochs and
steps). Heads are zero-initialised, so two heads differ only by their LR and a head trained
in the sweep equals the same head trained alone.

The trainer works on feature arrays (e.g. cached features of centre crops). The paper
also augments (random crop + flip) during linear training; that needs the encoder in the
loop, so it lives in `linear_eval` (mode='augmented'), which reuses this module's head
update, batch order and report (`init_heads`, `head_update`, `epoch_batches`,
`report_heads`). Features are used raw, as in the paper; `normalize=True`
optionally standardises them with training-split statistics.

Multi-label datasets (VOC2007) pass targets [N, C] of 1 / 0 / -1 instead of class indices:
the heads then train a sigmoid per class (`_head_loss`) and are chosen and reported by
11-point mAP (`average_precision_11pt`), the metric SimCLR and BYOL report for VOC2007.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
MOMENTUM = 0.9
Params = dict[str, jax.Array]


def split_validation(num_examples: int, val_size: float | int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic random (train_idx, val_idx), both sorted, for LR selection.

  val_size is a fraction if it is a float in (0, 1), else a count (ImageNet's is 10,009).
  """
  if isinstance(val_size, float) and 0.0 < val_size < 1.0:
    num_val = int(np.floor(val_size * num_examples + 0.5))
  else:
    num_val = int(val_size)
  if not 0 < num_val < num_examples:
    raise ValueError(f"need 0 < validation size < {num_examples}, got {num_val}")
  perm = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def _head_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Loss of one head on one minibatch; the labels' rank says which.

  Labels [B] (one class per image): mean softmax cross-entropy. Labels [B, C] (multi-label,
  VOC2007): a sigmoid per class, 1 positive, 0 negative and -1 ignored (a class present only
  through objects marked difficult, as VOC's protocol scores it). The binary losses are
  summed over classes and averaged over images, so one LR grid serves both: at zero logits
  an image's logit gradient has norm sqrt(C)/2 (2.2 for VOC's 20 classes) against
  sqrt(1 - 1/C) < 1 for the softmax, well inside the grid's 300x span. (A mean over classes
  would shrink it 20-fold, below the grid.)
  """
  logits = x @ params["w"] + params["b"]
  if y.ndim == 1:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  losses = optax.sigmoid_binary_cross_entropy(logits, (y > 0).astype(logits.dtype))
  return jnp.sum(jnp.where(y >= 0, losses, 0.0)) / y.shape[0]


def _sweep_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Sum of per-head losses: heads share no weights, so each gets its own gradient."""
  return jnp.sum(jax.vmap(_head_loss, in_axes=(0, None, None))(params, x, y))


def _cosine(step: jax.Array, total_steps: int) -> jax.Array:
  """Cosine decay factor from 1 at step 0 towards 0 at total_steps."""
  return 0.5 * (1.0 + jnp.cos(jnp.pi * step / total_steps))


HeadsCarry = tuple[Params, optax.OptState, jax.Array]


def _momentum() -> optax.GradientTransformation:
  """Nesterov momentum without the LR: the per-head LR x cosine is applied in `head_update`.

  Together that is exactly optax.sgd(lr_h * cosine, momentum=0.9, nesterov=True) for every
  head h, while one compiled program serves all LRs.
  """
  return optax.trace(decay=MOMENTUM, nesterov=True)


def init_heads(dim: int, num_classes: int, num_heads: int) -> HeadsCarry:
  """Zero-initialised heads {'w': [H, D, C], 'b': [H, C]}, their momentum and step 0.

  Zero init makes two heads differ only by their LR, so a head of the sweep equals the same
  head trained alone.
  """
  params = {"w": jnp.zeros((num_heads, dim, num_classes), jnp.float32),
            "b": jnp.zeros((num_heads, num_classes), jnp.float32)}
  return params, _momentum().init(params), jnp.zeros((), jnp.int32)


def head_update(carry: HeadsCarry, x: jax.Array, y: jax.Array, lrs: jax.Array,
                total_steps: int) -> HeadsCarry:
  """One SGD step of every head on features x [B, D] with labels y [B] or [B, C]
  (multi-label, see `_head_loss`).

  The single implementation of the linear protocol's update (Nesterov momentum 0.9, no
  weight decay, LR_h x cosine decay over total_steps): the cached sweep (`train_linear_heads`)
  and the augmented-view trainer (`linear_eval.train_heads_on_views`) both step through it,
  so the two protocols cannot drift apart.
  """
  params, opt_state, t = carry
  grads = jax.grad(_sweep_loss)(params, x, y)
  updates, opt_state = _momentum().update(grads, opt_state)
  scale = -lrs * _cosine(t, total_steps)
  params = jax.tree.map(lambda p, u: p + scale.reshape((-1,) + (1,) * (u.ndim - 1)) * u,
                        params, updates)
  return params, opt_state, t + 1


def epoch_batches(epoch_key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """Row indices [steps, batch_size] of one epoch: a permutation drawn from epoch_key, the
  incomplete last minibatch dropped. Shared by both trainers, so they see the same batches."""
  steps = num_examples // batch_size
  perm = jax.random.permutation(epoch_key, num_examples)[:steps * batch_size]
  return perm.reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _train(x: jax.Array, y: jax.Array, lrs: jax.Array, key: jax.Array, num_classes: int,
           epochs: int, batch_size: int) -> Params:
  """The whole sweep as one program: scan over epochs, then over minibatches."""
  steps_per_epoch = x.shape[0] // batch_size
  total = epochs * steps_per_epoch

  def step(carry, idx):
    return head_update(carry, x[idx], y[idx], lrs, total), None

  def epoch(carry, epoch_key):
    return jax.lax.scan(step, carry, epoch_batches(epoch_key, x.shape[0], batch_size))[0], None

  init = init_heads(x.shape[1], num_classes, lrs.shape[0])
  return jax.lax.scan(epoch, init, jax.random.split(key, epochs))[0][0]


def check_labels(y: np.ndarray, num_classes: int) -> None:
  """Class indices [N] in [0, num_classes), or multi-label rows [N, num_classes] of 1 / 0 /
  -1 (ignored)."""
  if y.ndim == 1 and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"train labels must lie in [0, {num_classes})")
  if y.ndim == 2 and (y.shape[1] != num_classes or not np.isin(y, (-1, 0, 1)).all()):
    raise ValueError(f"multi-label rows must have {num_classes} entries of 1, 0 or -1")
  if y.ndim not in (1, 2):
    raise ValueError(f"labels must be [N] or [N, classes], got shape {y.shape}")


def train_linear_heads(train_x: np.ndarray, train_y: np.ndarray, num_classes: int,
                       learning_rates: tuple[float, ...] = DEFAULT_LEARNING_RATES,
                       epochs: int = 80, batch_size: int = 1024, seed: int = 0) -> Params:
  """Trains one zero-initialised linear head per LR; returns {'w': [H,D,C], 'b': [H,C]}.

  train_y holds class indices [N], or multi-label rows [N, C] (see `_head_loss`).

  Every epoch reshuffles the training set (driven by `seed`) and drops the incomplete last
  minibatch; batch_size is clipped to the training-set size. All heads see the same
  minibatches, so the batch order does not depend on how many LRs are swept.
  """
  train_y = np.asarray(train_y)
  if epochs < 1 or not learning_rates or train_y.size == 0:
    raise ValueError("need epochs >= 1, at least one LR and a non-empty training set")
  check_labels(train_y, num_classes)
  x = jnp.asarray(train_x, jnp.float32)
  batch_size = min(batch_size, x.shape[0])
  lrs = jnp.asarray(learning_rates, jnp.float32)
  return _train(x, jnp.asarray(train_y, jnp.int32), lrs, jax.random.PRNGKey(seed),
                num_classes, epochs, batch_size)


@jax.jit
def _logits(params: Params, x: jax.Array) -> jax.Array:
  """Every head's logits [H, N, C]."""
  logits = jnp.einsum("nd,hdc->hnc", x, params["w"], precision=jax.lax.Precision.HIGHEST)
  return logits + params["b"][:, None, :]


@jax.jit
def _correct(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-head counts of top-1 and top-5 hits (top-5 clipped to the number of classes)."""
  logits = _logits(params, x)
  _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
  hits = top == y[None, :, None]
  return jnp.sum(hits[..., 0], axis=1), jnp.sum(jnp.any(hits, axis=-1), axis=1)


def evaluate_heads(params: Params, x: np.ndarray, y: np.ndarray,
                   chunk_size: int = 4096) -> dict[str, np.ndarray]:
  """Top-1 and top-5 accuracy of every head, float arrays [H]; chunked to bound memory.
  For multi-label rows y [N, C]: {'map': [H]}, see `mean_average_precision`.

  Ties between logits go to the lower class index (jax.lax.top_k's rule).
  """
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  if x.shape[0] == 0:
    raise ValueError("cannot evaluate on an empty set")
  if y.ndim == 2:
    scores = [np.asarray(_logits(params, x[i:i + chunk_size]))
              for i in range(0, len(x), chunk_size)]
    scores = np.concatenate(scores, axis=1)
    return {"map": np.array([mean_average_precision(s, y) for s in scores])}
  chunk = min(chunk_size, x.shape[0])
  pad = -x.shape[0] % chunk
  # Padded rows get label -1, which no head can predict, so they never count as hits.
  x = np.concatenate([x, np.zeros((pad, x.shape[1]), np.float32)])
  y = np.concatenate([y, np.full((pad,), -1, np.int32)])
  counts = [_correct(params, x[i:i + chunk], y[i:i + chunk]) for i in range(0, len(x), chunk)]
  top1, top5 = (np.sum([np.asarray(c[j]) for c in counts], axis=0) for j in (0, 1))
  n = x.shape[0] - pad
  return {"top1": top1 / n, "top5": top5 / n}


def average_precision_11pt(scores: np.ndarray, labels: np.ndarray) -> float:
  """VOC2007's 11-point interpolated average precision of one class.

  The mean over recall levels r = 0, 0.1, ..., 1 of the best precision at recall >= r
  (0 where no cutoff reaches r), ranking by descending score (ties: the earlier example).
  labels: 1 positive, 0 negative, -1 ignored (left out of the ranking). SimCLR and BYOL
  report this metric for VOC2007 transfer. The levels are exact tenths: a recall of exactly
  0.3 reaches level 0.3, where the Python ports' np.arange(0, 1.1, 0.1) (0.30000000000000004)
  can miss it by rounding.
  """
  keep = labels >= 0
  scores, positive = scores[keep], labels[keep] > 0
  if not positive.any():
    raise ValueError("average precision needs at least one positive example")
  hits = positive[np.argsort(-scores, kind="stable")]
  true_pos = np.cumsum(hits)
  precision = true_pos / np.arange(1, len(hits) + 1)
  recall = true_pos / positive.sum()
  levels = np.linspace(0.0, 1.0, 11)
  return float(np.mean([precision[recall >= r - 1e-12].max(initial=0.0) for r in levels]))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean of `average_precision_11pt` over the classes [N, C] that have a positive."""
  aps = [average_precision_11pt(scores[:, c], labels[:, c]) for c in range(labels.shape[1])
         if (labels[:, c] > 0).any()]
  if not aps:
    raise ValueError("mean average precision needs a class with a positive example")
  return float(np.mean(aps))


def _standardizer(train_x: np.ndarray):
  """Per-dimension standardisation fitted on the training split only."""
  mean = np.mean(train_x, axis=0, dtype=np.float64)
  std = np.std(train_x, axis=0, dtype=np.float64) + 1e-6
  return lambda x: ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)


def select_by_validation(val_scores: np.ndarray) -> int:
  """Index of the head with the best validation score; ties go to the smaller index."""
  return int(np.argmax(np.asarray(val_scores)))


def linear_eval(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                val_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
                learning_rates: tuple[float, ...] = DEFAULT_LEARNING_RATES, epochs: int = 80,
                batch_size: int = 1024, seed: int = 0,
                normalize: bool = False, refit: bool = False) -> dict[str, Any]:
  """Sweeps LRs, picks one by validation top-1 (mAP for multi-label rows), reports test
  accuracy (mAP) at that LR: of the sweep's head, or with `refit` of one head retrained at
  that LR on train + validation (see `with_refit`).

  Returns `report_heads`'s summary.
  """
  if normalize:
    transform = _standardizer(train_x)
    train_x, val_x, test_x = transform(train_x), transform(val_x), transform(test_x)
  params = train_linear_heads(train_x, train_y, num_classes, learning_rates, epochs,
                              batch_size, seed)
  result = report_heads(params, learning_rates, (val_x, val_y), (test_x, test_y))
  if not refit:
    return result
  full = train_linear_heads(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]),
                            num_classes, (result["best_lr"],), epochs, batch_size, seed)
  return with_refit(result, evaluate_heads(full, test_x, test_y))


def with_refit(result: dict[str, Any], refit_test: dict[str, np.ndarray]) -> dict[str, Any]:
  """The sweep's summary reporting the test scores of the head retrained at its chosen LR
  on train + validation.

  Why: validation only chooses the LR; the protocol then uses every labelled image, as
  SimCLR's transfer evaluation (which BYOL's follows) retrains on train + validation and the
  release trains ImageNet's head on TRAIN_AND_VALID. For DTD or Flowers, whose validation
  split is as large as train, the sweep's heads saw half the labels. `per_lr` keeps the
  sweep's own test columns; `refit` says which head the top-level test_* describe.
  """
  return dict(result, refit=True, **{f"test_{k}": float(v[0]) for k, v in refit_test.items()})


def report_heads(params: Params, learning_rates: tuple[float, ...],
                 val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
  """Validation picks the head, test reports that head only: the summary of every sweep.

  Returns best_lr, best_index, val_top1, test_top1, test_top5 and per_lr (a list of
  {lr, val_top1, val_top5, test_top1, test_top5}; the test columns are for inspection only
  and take no part in the choice). Multi-label rows give val_map and test_map instead of
  the top-k columns. Values are Python floats, ready for JSON.
  """
  val_acc = evaluate_heads(params, *val)
  test_acc = evaluate_heads(params, *test)
  per_lr = [{"lr": float(lr), **{f"val_{k}": float(v[i]) for k, v in val_acc.items()},
             **{f"test_{k}": float(v[i]) for k, v in test_acc.items()}}
            for i, lr in enumerate(learning_rates)]
  return summarize_sweep(per_lr, "map" if "map" in val_acc else "top1")


def summarize_sweep(per_lr: list[dict[str, Any]], metric: str = "top1") -> dict[str, Any]:
  """The sweep's summary from its per-LR rows ({lr, val_top1, test_top1, test_top5, ...}).

  The one place where any LR sweep here (linear heads, fine-tuning) chooses: the row with
  the best validation `metric` (top1, or map for multi-label; ties: the earlier row), whose
  own test numbers are reported.
  """
  best = select_by_validation([row[f"val_{metric}"] for row in per_lr])
  reported = {k: v for k, v in per_lr[best].items() if k.startswith(("val_", "test_"))}
  return {"best_lr": float(per_lr[best]["lr"]), "best_index": best, **reported,
          "per_lr": per_lr}
