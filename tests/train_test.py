"""Tests of the host training loop's own judgements (train.py); resume, checkpoints and
faults are in checkpointing_test.py."""

import jax.numpy as jnp
from conftest import tiny_config

from byol_jax import losses, train


def _metrics(std: float) -> dict:
  return dict(proj_std=std, proj_rank=1.0 if std < 1e-3 else 40.0)


def test_collapse_warning_needs_two_logged_steps_and_comes_once(caplog):
  """One odd batch is not a collapse; a warning on every log line would bury the rest."""
  watch = train._CollapseWatch(projection_dim=256)
  with caplog.at_level('WARNING'):
    for std in (0.06, 1e-5, 0.06, 1e-5):  # never twice in a row
      watch.update(_metrics(std))
    assert 'collapsing' not in caplog.text
    for std in (1e-5, 1e-5, 1e-5, 0.06, 1e-5, 1e-5):
      watch.update(_metrics(std))
  assert caplog.text.count('the projections are collapsing') == 1


def test_a_collapsing_run_warns(tmp_path, caplog, monkeypatch):
  """The loop hands its logged signals to the watch: with the step's collapse signals made
  those of a collapsed batch (a real collapse takes far longer than a test), the log says
  so once, with the causes, and training carries on to its end."""
  def collapsed(projections, axis_name=None):
    return dict(proj_std=jnp.float32(0.0) * jnp.sum(projections), proj_rank=jnp.float32(1.0))

  monkeypatch.setattr(losses, 'collapse_signals', collapsed)
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(tiny_config(steps=6), str(tmp_path))
  assert result['train']['proj_std'] == 0.0 and result['train']['step'] == 6
  assert caplog.text.count('the projections are collapsing') == 1, caplog.text[-3000:]
  assert 'Adam or a much too high learning rate' in caplog.text
