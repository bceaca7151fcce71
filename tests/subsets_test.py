"""Tests of class-balanced semi-supervised label subsets and their JSON record."""

import numpy as np
import pytest

from byol_jax import subsets


@pytest.fixture
def labels():
  """An unbalanced 10-class label set: class c has 100 + 20c examples, shuffled."""
  counts = 100 + 20 * np.arange(10)
  return np.random.default_rng(0).permutation(np.repeat(np.arange(10), counts))


def test_balanced_per_class_counts(labels):
  """Breaks if a class gets a share other than round(fraction * its count), minimum one."""
  idx = subsets.balanced_subset(labels, 0.1, seed=0)
  got = np.bincount(labels[idx], minlength=10)
  np.testing.assert_array_equal(got, np.floor(0.1 * (100 + 20 * np.arange(10)) + 0.5))
  tiny = subsets.balanced_subset(labels, 0.001, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[tiny], minlength=10), np.ones(10))


def test_one_and_ten_percent_sizes():
  """Breaks if the 1% / 10% subsets of a balanced 50k set are not 50 / 500 per class."""
  labels = np.repeat(np.arange(10), 5000)
  assert len(subsets.balanced_subset(labels, 0.01, seed=0)) == 500
  assert len(subsets.balanced_subset(labels, 0.10, seed=0)) == 5000


def test_deterministic_sorted_unique(labels):
  """Breaks if the subset depends on anything but the seed, or is unsorted / repeats."""
  a = subsets.balanced_subset(labels, 0.05, seed=4)
  np.testing.assert_array_equal(a, subsets.balanced_subset(labels, 0.05, seed=4))
  assert np.all(np.diff(a) > 0)
  assert not np.array_equal(a, subsets.balanced_subset(labels, 0.05, seed=5))


def test_disjoint_from_validation(labels):
  """Breaks if labelled examples leak from the validation hold-out into the subset."""
  val = np.random.default_rng(1).choice(len(labels), 300, replace=False)
  idx = subsets.balanced_subset(labels, 0.2, seed=0, exclude=val)
  assert not set(idx) & set(val)
  eligible = np.bincount(np.delete(labels, val), minlength=10)
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10),
                                np.floor(0.2 * eligible + 0.5))


def test_small_fraction_nested_in_large(labels):
  """Breaks if the per-class shuffle depends on the fraction (1% must lie inside 10%)."""
  val = np.arange(0, len(labels), 7)
  one = subsets.balanced_subset(labels, 0.01, seed=3, exclude=val)
  ten = subsets.balanced_subset(labels, 0.10, seed=3, exclude=val)
  assert set(one) <= set(ten) and len(one) < len(ten)


def test_rejects_bad_inputs(labels):
  """Breaks if impossible requests return silently wrong subsets instead of raising."""
  with pytest.raises(ValueError):
    subsets.balanced_subset(labels, 0.0, seed=0)
  with pytest.raises(ValueError):
    subsets.balanced_subset(labels, 1.5, seed=0)
  with pytest.raises(ValueError):  # Class 0 entirely excluded.
    subsets.balanced_subset(labels, 0.1, seed=0, exclude=np.flatnonzero(labels == 0))


def test_save_load_round_trip(labels, tmp_path):
  """Breaks if the recorded subset cannot be reloaded exactly with its seed and fraction."""
  idx = subsets.balanced_subset(labels, 0.01, seed=2)
  path = tmp_path / "subset.json"
  subsets.save_subset(path, idx, {"seed": 2, "fraction": 0.01, "dataset": "demo"})
  loaded, meta = subsets.load_subset(path)
  np.testing.assert_array_equal(loaded, idx)
  assert loaded.dtype == np.int64
  assert meta == {"seed": 2, "fraction": 0.01, "dataset": "demo", "subset_size": len(idx)}
  with pytest.raises(ValueError):
    subsets.save_subset(path, idx, {"seed": 2})
