"""Tests of config_compat: how configs saved before a field existed are read."""

import ml_collections
import pytest

from byol_jax import config_compat, networks


def test_setting_reads_the_field_or_its_value_from_before_it_existed():
  """A saved config without the field must read as the code behaved before it (a run from
  before model.stem_relu had the stem's ReLU); a config with it, as it says."""
  model = ml_collections.ConfigDict(dict(depth=18))
  assert config_compat.setting(model, 'model.stem_relu') is True
  model.stem_relu = False
  assert config_compat.setting(model, 'model.stem_relu') is False


def test_a_field_missing_from_the_table_fails_at_once():
  """Reading an added field that the table lacks must fail in any test that touches it,
  instead of taking a default that the resume check does not know."""
  with pytest.raises(KeyError):
    config_compat.setting(ml_collections.ConfigDict(), 'model.not_a_field')


@pytest.mark.parametrize('field, read', [
  ('model.stem_relu', lambda cfg: networks.stem_relu_of(cfg.model)),
  ('model.head_output_bias', lambda cfg: networks.head_output_bias_of(cfg.model)),
  ('model.weight_init', lambda cfg: networks._config_weight_init(cfg.model)),
])
def test_readers_of_an_old_config_take_the_tables_value(field, read, monkeypatch):
  """The code that builds an old run's network must read the table, not a default of its
  own: with the table's value changed, what it reads changes (one source of the fact)."""
  old = ml_collections.ConfigDict(dict(model=dict(depth=18)))
  assert read(old) == config_compat.ADDED_FIELD_DEFAULTS[field]
  other = {'model.weight_init': 'pytorch'}.get(field, not config_compat.ADDED_FIELD_DEFAULTS[field])
  monkeypatch.setitem(config_compat.ADDED_FIELD_DEFAULTS, field, other)
  assert read(old) == other
