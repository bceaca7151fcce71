"""Tests of where metrics leave: JSON lines and TensorBoard events (metric_writers.py)."""

import glob
import json
import os

import numpy as np

from byol_jax import metric_writers


def event_tags(logdir):
  import tensorflow as tf
  tags = set()
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


def test_train_and_eval_writers_opened_together_keep_all_tensorboard_events(tmp_path):
  """The trainer opens its train and eval writers in the same second; both must keep their
  events (tensorboardX names event files by host and second: a shared name loses one)."""
  workdir = str(tmp_path)
  train = metric_writers.MetricWriter(workdir, 'train')
  evals = metric_writers.MetricWriter(workdir, 'eval')
  train.write(1, {'loss': 1.5})
  evals.write(1, {'knn_top1': 0.5, 'network': 'online'})
  evals.write_image(0, 'augmentation_preview', np.zeros((8, 8, 3), np.uint8))
  train.close()
  evals.close()
  assert {'train/loss', 'eval/knn_top1', 'augmentation_preview'} <= event_tags(
    os.path.join(workdir, 'tensorboard'))
  with open(os.path.join(workdir, 'metrics', 'eval.jsonl')) as f:
    assert json.loads(f.readline()) == {'step': 1, 'knn_top1': 0.5, 'network': 'online'}


def test_disabled_writer_writes_nothing(tmp_path):
  """Processes other than 0 get a disabled writer: no files, but the record is returned."""
  writer = metric_writers.MetricWriter(str(tmp_path), 'train', enabled=False)
  assert writer.write(3, {'loss': np.float32(2.0)}) == {'step': 3, 'loss': 2.0}
  assert not os.listdir(tmp_path)
