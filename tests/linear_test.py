"""Tests of the linear-evaluation sweep: it learns, it selects on validation only, and a
vmapped head equals the same head trained alone."""

import jax
import numpy as np
import optax
import pytest

from byol_jax.evaluators import linear


def _separable(seed, n, dim=20, num_classes=4, margin=6.0):
  """Gaussian blobs around orthogonal class means: linearly separable with a wide margin."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, n)
  x = rng.normal(size=(n, dim)) + margin * np.eye(dim)[y]
  return x.astype(np.float32), y


def test_split_validation_is_deterministic_and_disjoint():
  """Breaks if the validation hold-out overlaps training or changes between runs."""
  tr, va = linear.split_validation(100, 0.2, seed=3)
  tr2, va2 = linear.split_validation(100, 0.2, seed=3)
  assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)
  np.testing.assert_array_equal(va, va2)
  np.testing.assert_array_equal(tr, tr2)
  assert np.all(np.diff(va) > 0) and np.all(np.diff(tr) > 0)
  assert len(linear.split_validation(100, 7, seed=0)[1]) == 7
  assert not np.array_equal(va, linear.split_validation(100, 0.2, seed=4)[1])
  with pytest.raises(ValueError):
    linear.split_validation(10, 10, seed=0)


def test_separable_features_reach_99_percent():
  """Breaks if the optimiser, schedule or minibatching fails to fit a separable problem."""
  train_x, train_y = _separable(0, 2000)
  val_x, val_y = _separable(1, 300)
  test_x, test_y = _separable(2, 1000)
  out = linear.linear_eval(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=4,
                           learning_rates=(0.01, 0.1, 1.0), epochs=10, batch_size=128)
  assert out["test_top1"] >= 0.99 and out["test_top5"] == 1.0
  assert out["best_lr"] in (0.01, 0.1, 1.0) and len(out["per_lr"]) == 3


def test_normalize_flag_standardises_with_train_statistics():
  """Breaks if the optional standardisation is wrong enough to hurt a shifted, scaled task."""
  train_x, train_y = _separable(0, 1000)
  test_x, test_y = _separable(2, 400)
  shift = lambda x: x * 50.0 + 300.0
  out = linear.linear_eval(shift(train_x), train_y, shift(test_x[:200]), test_y[:200],
                           shift(test_x), test_y, num_classes=4, learning_rates=(0.1,),
                           epochs=5, batch_size=100, normalize=True)
  assert out["test_top1"] >= 0.99


def test_sweep_selects_by_validation_not_test(monkeypatch):
  """Breaks if the LR is chosen on test accuracy or the reported test score is another head's."""
  train_x, train_y = _separable(0, 64)
  val_x, val_y = _separable(1, 30)
  test_x, test_y = _separable(2, 40)
  planted = {30: {"top1": np.array([0.5, 0.9, 0.7]), "top5": np.array([0.8, 0.95, 0.9])},
             40: {"top1": np.array([0.95, 0.6, 0.8]), "top5": np.array([1.0, 0.7, 0.9])}}
  monkeypatch.setattr(linear, "evaluate_heads", lambda params, x, y: planted[len(x)])
  out = linear.linear_eval(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=4,
                           learning_rates=(0.01, 0.1, 1.0), epochs=1, batch_size=32)
  assert out["best_lr"] == 0.1 and out["best_index"] == 1
  assert out["val_top1"] == 0.9 and out["test_top1"] == 0.6 and out["test_top5"] == 0.7
  assert [r["test_top1"] for r in out["per_lr"]] == [0.95, 0.6, 0.8]


def test_planted_grid_where_test_and_validation_disagree():
  """Breaks if the sweep, trained for real (nothing patched), picks the LR that is best on
  test instead of the one best on validation.

  The grid is planted: LR 0 leaves its head at zero, which predicts class 0 for every input
  (ties go to the lower class); LR 1 learns the blobs. Validation is drawn like training, so
  LR 1 wins there; the test set is class-1 blobs labelled 0, so LR 0 wins there.
  """
  train_x, train_y = _separable(0, 400)
  val_x, val_y = _separable(1, 200)
  blobs, blob_class = _separable(2, 400)
  test_x = blobs[blob_class == 1]
  test_y = np.zeros(len(test_x), np.int64)
  out = linear.linear_eval(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=4,
                           learning_rates=(0.0, 1.0), epochs=3, batch_size=50)
  by_lr = {row["lr"]: row for row in out["per_lr"]}
  assert by_lr[0.0]["test_top1"] == 1.0 and by_lr[1.0]["test_top1"] == 0.0  # as planted
  assert by_lr[1.0]["val_top1"] > by_lr[0.0]["val_top1"]
  assert out["best_lr"] == 1.0 and out["test_top1"] == 0.0


def test_reported_test_accuracy_is_the_chosen_heads():
  """Breaks if the summary's test accuracy is not the validation-chosen head's own."""
  train_x, train_y = _separable(0, 500, margin=1.0)
  val_x, val_y = _separable(1, 200, margin=1.0)
  test_x, test_y = _separable(2, 200, margin=1.0)
  out = linear.linear_eval(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=4,
                           learning_rates=(1e-4, 0.03, 3.0), epochs=3, batch_size=50)
  best = out["per_lr"][out["best_index"]]
  assert out["val_top1"] == max(r["val_top1"] for r in out["per_lr"]) == best["val_top1"]
  assert out["test_top1"] == best["test_top1"] and out["best_lr"] == best["lr"]


def test_vmapped_head_equals_head_trained_alone():
  """Breaks if heads interact (shared momentum, summed grads leaking) or LRs are misrouted."""
  x, y = _separable(0, 300, margin=1.0)
  sweep = linear.train_linear_heads(x, y, 4, (0.05, 0.5, 2.0), epochs=3, batch_size=32, seed=7)
  alone = linear.train_linear_heads(x, y, 4, (0.5,), epochs=3, batch_size=32, seed=7)
  for name in ("w", "b"):
    np.testing.assert_allclose(sweep[name][1], alone[name][0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(sweep["w"][0], sweep["w"][1])


def test_matches_optax_sgd_nesterov_cosine():
  """Breaks if the update is not SGD + Nesterov 0.9 + cosine decay from the base LR to 0."""
  x, y = _separable(0, 64, margin=1.0)
  lr, epochs, batch = 0.3, 2, 16
  got = linear.train_linear_heads(x, y, 4, (lr,), epochs=epochs, batch_size=batch, seed=5)
  total = epochs * (64 // batch)
  opt = optax.sgd(optax.cosine_decay_schedule(lr, total), momentum=0.9, nesterov=True)
  params = {"w": np.zeros((20, 4), np.float32), "b": np.zeros(4, np.float32)}
  state = opt.init(params)
  keys = jax.random.split(jax.random.PRNGKey(5), epochs)
  for key in keys:  # Same batch order as the trainer: a fresh permutation per epoch.
    perm = np.asarray(jax.random.permutation(key, 64)).reshape(-1, batch)
    for idx in perm:
      grads = jax.grad(linear._head_loss)(params, x[idx], y[idx])
      updates, state = opt.update(grads, state)
      params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(got["w"][0], params["w"], rtol=1e-4, atol=1e-6)


def test_deterministic_by_seed():
  """Breaks if training depends on anything but the seed (e.g. global RNG state)."""
  x, y = _separable(0, 200, margin=1.0)
  run = lambda seed: linear.train_linear_heads(x, y, 4, (0.1, 1.0), 2, 32, seed)["w"]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))


def test_evaluate_heads_counts_top1_top5_with_padding():
  """Breaks if padded evaluation rows count as hits or top-5 is not clipped to C."""
  w = np.stack([np.eye(3, dtype=np.float32), -np.eye(3, dtype=np.float32)])
  params = {"w": w, "b": np.zeros((2, 3), np.float32)}
  x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
  y = np.array([0, 1, 2, 0, 2])
  got = linear.evaluate_heads(params, x, y, chunk_size=2)
  np.testing.assert_allclose(got["top1"], [0.8, 0.0])
  np.testing.assert_allclose(got["top5"], [1.0, 1.0])


# ------------------------------------------------------------------------------------------
# Multi-label heads (VOC2007): masked sigmoid loss and 11-point mAP.
# ------------------------------------------------------------------------------------------


def _ap_11pt_reference(scores, labels):
  """VOC2007's 11-point AP from its definition, cutoff by cutoff, in float64."""
  kept = [(float(s), int(t)) for s, t in zip(scores, labels, strict=True) if t >= 0]
  ranked = [t for _, t in sorted(kept, key=lambda p: -p[0])]
  npos = sum(ranked)
  points = []  # (recall, precision) after each of the top-k
  for k in range(1, len(ranked) + 1):
    tp = sum(ranked[:k])
    points.append((tp / npos, tp / k))
  return sum(max([p for r, p in points if r >= level - 1e-12], default=0.0)
             for level in [i / 10 for i in range(11)]) / 11


def test_average_precision_by_hand_and_against_the_definition():
  """Breaks if AP interpolates differently from VOC2007 (11 recall levels, best precision at
  or beyond each), ranks ascending, or lets ignored (difficult) images into the ranking."""
  # Ranked hits 1, 0, 1, 0, 0 (two positives): precision 1 up to recall 0.5, 2/3 at recall 1.
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
  assert linear.average_precision_11pt(scores, np.array([1, 0, 1, 0, 0])) == pytest.approx(
    (6 * 1.0 + 5 * 2 / 3) / 11)
  # An ignored image ranked first changes nothing; the same image as a negative would.
  with_ignored = linear.average_precision_11pt(np.r_[1.0, scores], np.array([-1, 1, 0, 1, 0, 0]))
  assert with_ignored == pytest.approx((6 + 5 * 2 / 3) / 11)
  assert linear.average_precision_11pt(np.r_[1.0, scores], np.array([0, 1, 0, 1, 0, 0])) < 0.8
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(5, 60))
    labels = rng.choice([-1, 0, 1], size=n, p=[0.1, 0.6, 0.3])
    labels[0] = 1
    s = rng.normal(size=n) + labels
    assert linear.average_precision_11pt(s, labels) == pytest.approx(_ap_11pt_reference(s, labels))


def test_multilabel_loss_is_masked_sigmoid_cross_entropy():
  """Breaks if ignored (-1) entries contribute, or the loss is not the per-class binary
  cross-entropy summed over classes and averaged over images (float64 reference)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  params = {"w": rng.normal(size=(5, 3)).astype(np.float32),
            "b": rng.normal(size=3).astype(np.float32)}
  y = rng.choice([-1, 0, 1], size=(6, 3))
  z = x.astype(np.float64) @ params["w"] + params["b"]
  bce = np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * (y > 0)
  expected = np.sum(bce * (y >= 0)) / 6
  assert float(linear._head_loss(params, x, y)) == pytest.approx(expected, rel=1e-5)


def test_multilabel_sweep_learns_and_selects_by_validation_map():
  """Breaks if multi-label heads stop learning (separable classes reach mAP near 1), or the
  summary reports top-k columns or another row than the best validation mAP."""
  rng = np.random.default_rng(2)

  def data(n):
    y = (rng.random((n, 4)) < 0.3).astype(np.int32)
    y[rng.random((n, 4)) < 0.05] = -1
    x = rng.normal(size=(n, 12)) + 4.0 * np.pad(y > 0, ((0, 0), (0, 8)))
    return x.astype(np.float32), y

  (tx, ty), (vx, vy), (sx, sy) = data(400), data(100), data(100)
  out = linear.linear_eval(tx, ty, vx, vy, sx, sy, 4, (1e-4, 0.1, 1.0), epochs=10,
                           batch_size=64)
  assert set(out) == {"best_lr", "best_index", "val_map", "test_map", "per_lr"}
  assert out["best_index"] == int(np.argmax([r["val_map"] for r in out["per_lr"]]))
  assert out["test_map"] == out["per_lr"][out["best_index"]]["test_map"] > 0.95
  assert out["per_lr"][0]["test_map"] < out["test_map"]  # LR 1e-4 barely moves the heads


def test_multilabel_rows_are_checked():
  """Breaks if rows of the wrong width or with values other than 1 / 0 / -1 train silently."""
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="entries of 1, 0 or -1"):
    linear.train_linear_heads(x, np.full((4, 2), 2), 2, (0.1,), epochs=1, batch_size=2)
  with pytest.raises(ValueError, match="3 entries"):
    linear.train_linear_heads(x, np.zeros((4, 2), np.int32), 3, (0.1,), epochs=1, batch_size=2)
