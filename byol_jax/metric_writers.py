"""Where metrics leave: JSON lines under `metrics/` and TensorBoard events under `tensorboard/`.

JSONL needs nothing to read (plots, CI checks, notebooks); TensorBoard is for people.
Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from absl import logging


def _plain(value: Any) -> Any:
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the information as text
  return value


def jsonl_path(workdir: str, name: str) -> str:
  """Where a writer called `name` keeps its records: metrics/<name>.jsonl."""
  return os.path.join(workdir, 'metrics', f'{name}.jsonl')


class MetricWriter:
  """Appends `{"step": s, **scalars}` to metrics/<name>.jsonl and mirrors to TensorBoard."""

  def __init__(self, workdir: str, name: str, enabled: bool = True):
    self.enabled = enabled
    self.path = jsonl_path(workdir, name)
    self.prefix = name
    self._tb = None
    if enabled:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._tb = _tensorboard(os.path.join(workdir, 'tensorboard'), name)

  def write(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
    """Writes one record and returns it as plain Python values."""
    record = {'step': int(step), **{k: _plain(v) for k, v in scalars.items()}}
    if not self.enabled:
      return record
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, int | float):
          self._tb.add_scalar(f'{self.prefix}/{key}', value, int(step))
    return record

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """A uint8 [H, W, 3] image, e.g. the augmentation preview."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, image, int(step), dataformats='HWC')

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _tensorboard(logdir: str, name: str):
  """One event file per writer: tensorboardX names files by host and second, so two writers
  opened in the same second on one directory would otherwise share (and clobber) a file."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    logging.warning('tensorboardX is not installed: no TensorBoard events are written')
    return None
  return SummaryWriter(logdir, filename_suffix=f'.{name}')


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics file (missing file: none)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
