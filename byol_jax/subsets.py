"""Class-balanced label subsets for semi-supervised evaluation (the paper's 1% and 10%).

Why a module for this: semi-supervised numbers are only comparable when everyone knows
which labelled examples were used, so a subset is chosen deterministically from a seed and
written to JSON next to the results.

Choice of examples: for every class, the eligible indices (those not in `exclude`, e.g. a
validation hold-out) are shuffled once with a generator that depends on the seed only.
A subset of fraction f takes the first max(1, round(f * n_c)) of them, with n_c the number
of eligible examples of class c. Because the shuffle does not depend on f, the 1% subset
is a prefix of, and hence contained in, the 10% subset drawn with the same seed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def _class_permutations(labels: np.ndarray, seed: int,
                        exclude: np.ndarray | None) -> list[np.ndarray]:
  """Per class (in increasing label order), a seeded shuffle of its eligible indices."""
  eligible = np.ones(labels.shape[0], bool)
  if exclude is not None:
    eligible[np.asarray(exclude, np.int64)] = False
  rng = np.random.default_rng(seed)
  perms = []
  for c in np.unique(labels):
    members = np.flatnonzero((labels == c) & eligible)
    if members.size == 0:
      raise ValueError(f"class {c} has no examples left after `exclude`")
    perms.append(rng.permutation(members))
  return perms


def balanced_subset(labels: np.ndarray, fraction: float, seed: int,
                    exclude: np.ndarray | None = None) -> np.ndarray:
  """Sorted indices of a class-balanced subset holding `fraction` of each class's labels.

  Each class contributes max(1, round(fraction * n_c)) examples (round half up), where n_c
  counts its examples outside `exclude`. Subsets with the same seed and `exclude` are
  nested: a smaller fraction gives a subset of a larger one.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  chosen = [p[:max(1, int(np.floor(fraction * p.size + 0.5)))]
            for p in _class_permutations(labels, seed, exclude)]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def save_subset(path: str | os.PathLike, indices: np.ndarray, meta: dict[str, Any]) -> None:
  """Writes indices plus metadata (must include 'seed' and 'fraction') as JSON."""
  missing = {"seed", "fraction"} - set(meta)
  if missing:
    raise ValueError(f"meta lacks {sorted(missing)}; the subset could not be re-derived")
  record = {**meta, "subset_size": len(indices),
            "indices": [int(i) for i in np.asarray(indices).ravel()]}
  with open(path, "w") as f:
    json.dump(record, f)


def load_subset(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
  """Reads a file written by `save_subset`; returns (int64 indices, metadata)."""
  with open(path) as f:
    record = json.load(f)
  indices = np.asarray(record.pop("indices"), np.int64)
  return indices, record
