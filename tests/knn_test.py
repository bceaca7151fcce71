"""Tests of the weighted kNN evaluator against a float64 NumPy brute-force reference, and of
a run's kNN sets (KnnEval): which images, decoded or streamed, at which size."""

import os

import numpy as np
import pytest
from conftest import tiny_config

from byol_jax import data, train_step
from byol_jax.evaluators import knn


def _reference_scores(train_f, train_y, test_f, num_classes, k, temperature):
  """Brute force in float64: cosine sims, stable top-k, exp(sim/T) votes summed per class."""
  unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-6)
  sims = unit(test_f.astype(np.float64)) @ unit(train_f.astype(np.float64)).T
  k = min(k, len(train_y))
  idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  scores = np.zeros((len(test_f), num_classes))
  for i in range(len(test_f)):
    np.add.at(scores[i], train_y[idx[i]], np.exp(sims[i, idx[i]] / temperature))
  return scores


def _random_problem(seed, num_train=600, num_test=300, dim=32, num_classes=10):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_train, dim)).astype(np.float32),
          rng.integers(0, num_classes, num_train),
          rng.normal(size=(num_test, dim)).astype(np.float32),
          rng.integers(0, num_classes, num_test))


def test_matches_float64_reference():
  """Breaks on a wrong normalisation, weighting, temperature or neighbour count."""
  tr_f, tr_y, te_f, _ = _random_problem(0)
  got = knn.knn_classify(tr_f, tr_y, te_f, 10, k=50, temperature=0.1, chunk_size=128)
  want = _reference_scores(tr_f, tr_y, te_f, 10, 50, 0.1)
  np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3)


def test_accuracy_matches_reference_top1_top5():
  """Breaks if top-1/top-5 are computed from the wrong ranking or labels."""
  tr_f, tr_y, te_f, te_y = _random_problem(1)
  want = _reference_scores(tr_f, tr_y, te_f, 10, 200, 0.1)
  ranked = np.argsort(-want, axis=1, kind="stable")[:, :5]
  ref_top5 = np.mean(np.any(ranked == te_y[:, None], axis=1))
  got = knn.knn_accuracy(tr_f, tr_y, te_f, te_y, 10)
  assert got["top1"] == np.mean(want.argmax(1) == te_y)
  assert got["top5"] == ref_top5


def test_separable_clusters_are_perfect():
  """Breaks if neighbours vote for the wrong classes: tight clusters must give top-1 = 1."""
  rng = np.random.default_rng(2)
  centres = np.eye(16)[:8] * 10.0
  tr_y, te_y = np.repeat(np.arange(8), 30), np.repeat(np.arange(8), 10)
  tr_f = centres[tr_y] + rng.normal(scale=0.5, size=(240, 16))
  te_f = centres[te_y] + rng.normal(scale=0.5, size=(80, 16))
  assert knn.knn_accuracy(tr_f, tr_y, te_f, te_y, 8, k=20) == {"top1": 1.0, "top5": 1.0}


def test_k_is_clipped_to_train_size():
  """Breaks if k > N_train crashes top_k instead of using every training example."""
  tr_f, tr_y, te_f, _ = _random_problem(3, num_train=40, num_test=7)
  got = knn.knn_classify(tr_f, tr_y, te_f, 10, k=200)
  np.testing.assert_allclose(got, _reference_scores(tr_f, tr_y, te_f, 10, 40, 0.1), rtol=2e-4)


def test_last_chunk_padding_does_not_change_results():
  """Breaks if padded rows leak into real rows or the tail of the test set is dropped."""
  tr_f, tr_y, te_f, _ = _random_problem(4, num_test=101)
  one_chunk = knn.knn_classify(tr_f, tr_y, te_f, 10, chunk_size=1024)
  ragged = knn.knn_classify(tr_f, tr_y, te_f, 10, chunk_size=32)
  assert ragged.shape == (101, 10)
  np.testing.assert_allclose(ragged, one_chunk, rtol=1e-6)


def test_top5_clipped_for_few_classes():
  """Breaks if top-5 on a 3-class task indexes past the class axis instead of being 1.0."""
  tr_f, tr_y, te_f, te_y = _random_problem(5, num_classes=3)
  assert knn.knn_accuracy(tr_f, tr_y, te_f, te_y, 3)["top5"] == 1.0


def test_chunks_share_one_compilation():
  """Breaks if a ragged last chunk triggers a recompile (one per distinct chunk shape)."""
  tr_f, tr_y, te_f, _ = _random_problem(6, num_test=70, dim=24)
  before = knn._chunk_scores._cache_size()
  knn.knn_classify(tr_f, tr_y, te_f, 10, k=30, chunk_size=16)  # 5 chunks, last one ragged.
  assert knn._chunk_scores._cache_size() == before + 1


def test_knn_of_a_streamed_run_streams_both_splits_and_scores_as_resident(png_folder,
                                                                           monkeypatch):
  """A run whose data streams (ImageNet) used to decode its whole training split into memory
  for kNN (1.28M images: out of memory at start-up). Its kNN must read both splits batch by
  batch, never load_split, and score as the resident path does on the same images; the
  first knn.train_examples are kept, and BN recalibration gets full streamed batches."""
  from byol_jax.evaluators import common
  cfg = tiny_config(dataset=png_folder, eval_crop_fraction=1.0)  # 16 px images at 16 px
  mesh = train_step.make_mesh()
  state = common.initial_state(cfg)
  bn, _ = common.ensure_bn_statistics(
    cfg.model, state.online_params, state.online_state,
    knn.KnnEval(cfg, mesh, None, streamed=False).calibration_batches(0), cfg.image_size,
    1.0, mesh, cfg.augment)
  resident = knn.KnnEval(cfg, mesh, None, streamed=False)
  want = resident(state.online_params, bn)

  def no_decoding(*args, **kwargs):
    raise AssertionError('a streamed kNN decoded a whole split')
  monkeypatch.setattr(data, 'load_split', no_decoding)
  streamed = knn.KnnEval(cfg, mesh, None, streamed=True)
  assert streamed(state.online_params, bn) == want
  assert sorted(streamed.train_labels) == sorted(resident.train_labels)
  assert len(streamed.test_labels) == 6 and streamed.num_classes == 3
  batches = list(streamed.calibration_batches(0)())
  assert batches and all(b.shape[1:] == (16, 16, 3) for b in batches)

  cfg.knn.train_examples = 5
  streamed = knn.KnnEval(cfg, mesh, None, streamed=True)
  train_features, _ = streamed.features(state.online_params, bn)
  assert len(train_features) == len(streamed.train_labels) == 5
  cfg.input_mode = 'stream'  # the eval worker's default: the run's own input mode decides
  assert knn.KnnEval(cfg, mesh, None).streamed


def test_resident_knn_sets_hold_the_eval_crop_at_full_resolution(tmp_path):
  """With eval_crop_fraction < 1 the resident kNN sets are decoded at image_size /
  eval_crop_fraction (as linear_eval's), so the centre crop holds image_size pixels; they
  were decoded at image_size and the crop (28 of 32 px here, 196 of 224 for an r50 run on
  a folder) upsampled. With eval_crop_fraction 1 the training copy is reused, not decoded
  twice. Breaks if either goes back."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c in range(2):
      os.makedirs(tmp_path / split / f'c{c}')
      for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(
          tmp_path / split / f'c{c}' / f'{i}.png')
  mesh = train_step.make_mesh()
  cfg = tiny_config(dataset=f'folder:{tmp_path}', image_size=32, eval_crop_fraction=0.875)
  training_copy = data.load_split(cfg, 'trainval')
  sets = knn.KnnEval(cfg, mesh, training_copy)
  assert sets.train.images.shape[1:3] == sets.test.images.shape[1:3] == (37, 37)
  assert sets.crop_fraction * 37 >= cfg.image_size
  cfg = tiny_config(dataset=f'folder:{tmp_path}', image_size=32, eval_crop_fraction=1.0)
  sets = knn.KnnEval(cfg, mesh, training_copy)
  assert np.shares_memory(sets.train.images, training_copy.images)


@pytest.mark.slow
def test_a_folder_without_test_images_pretrains_without_knn(tmp_path, caplog):
  """A folder of training images alone (no test/) is a common pretraining set: the trainer
  must train and checkpoint with kNN off, said once, where it stopped at its first
  evaluation with '.../test is missing' after writing the workdir."""
  from PIL import Image

  from byol_jax import checkpointing, train
  rng = np.random.default_rng(0)
  for c in range(2):
    os.makedirs(tmp_path / 'data' / 'train' / f'c{c}')
    for i in range(8):
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
        tmp_path / 'data' / 'train' / f'c{c}' / f'{i}.png')
  cfg = tiny_config(dataset=f'folder:{tmp_path / "data"}', eval_crop_fraction=1.0, steps=2,
                    batch_size=8, eval_every_steps=1)
  for streamed in (False, True):
    sets = knn.KnnEval(cfg, train_step.make_mesh(), None, streamed=streamed)
    assert sets.unavailable == f'{tmp_path / "data"}/test is missing: add test/<class_name>/ ' \
                               'folders like train/', streamed
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert result['eval'] == {} and checkpointing.scan(str(tmp_path / 'run')).finalised == [2]
  assert caplog.text.count('kNN evaluation is off') == 1, caplog.text[-2000:]
