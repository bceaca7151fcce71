"""The extension paths README's "Extending byol-jax" describes, each tried end to end."""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config


class TinyConvNet(hk.Module):
  """A backbone of the kind a user adds: two convolutions and a global mean pool."""

  def __init__(self, channels: int, name: str = 'encoder'):
    super().__init__(name=name)
    self.channels = channels

  @classmethod
  def from_config(cls, model_cfg, **overrides):
    del overrides  # axis_name, bn_groups, bn_decay: no BatchNorm here
    return cls(model_cfg.channels)

  @staticmethod
  def feature_dim(model_cfg) -> int:
    return model_cfg.channels

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    del is_training
    x = jax.nn.relu(hk.Conv2D(8, 3, stride=2, name='conv_0')(x))
    x = jax.nn.relu(hk.Conv2D(self.channels, 3, stride=2, name='conv_1')(x))
    return jnp.mean(x, axis=(1, 2))


def test_a_registered_backbone_trains_embeds_and_exports(tmp_path, monkeypatch):
  """A new architecture is one entry in networks.ENCODERS and one config value
  (model.arch): training, the features API and the npz export all build it. Before,
  every place that built the encoder called ResNet itself (training, evaluators,
  fine-tuning), and features and export read the ResNet depth table for the size."""
  from byol_jax import export, features, networks, train
  monkeypatch.setitem(networks.ENCODERS, 'tiny_convnet', TinyConvNet)
  cfg = tiny_config(steps=2, eval_at_init=False, **{'model.arch': 'tiny_convnet'})
  cfg.model.channels = 12
  train.train_and_evaluate(cfg, str(tmp_path))
  encoder = features.Encoder.from_workdir(str(tmp_path))
  feats = encoder.embed(np.zeros((3, 20, 20, 3), np.uint8))
  assert feats.shape == (3, 12) and encoder.feature_dim == 12
  assert any(k == 'encoder/conv_1' for k in encoder._params), list(encoder._params)
  path = export.export(str(tmp_path), 'npz')
  assert export.read_sidecar(path)['model']['arch'] == 'tiny_convnet'
  assert features.Encoder.from_export(path).embed(np.zeros((2, 16, 16, 3), np.uint8)).shape == (
    2, 12)
  with pytest.raises(ValueError, match="--format=torch writes torchvision ResNets"):
    monkeypatch.setattr(export, '_require_torch', lambda: None)
    export.export(str(tmp_path), 'torch')


def test_a_backbone_built_under_another_name_fails_before_training(monkeypatch):
  """A backbone whose module was not named 'encoder' (hk.Module's default, the class name)
  trained, and then kNN, linear evaluation, features and the export found none of its
  parameters: a Haiku traceback after the whole run. Now building it says so at once."""
  from byol_jax import networks

  class Unnamed(TinyConvNet):
    def __init__(self, channels: int):
      super().__init__(channels, name=None)

  monkeypatch.setitem(networks.ENCODERS, 'unnamed', Unnamed)
  cfg = tiny_config(**{'model.arch': 'unnamed'})
  cfg.model.channels = 4
  net = networks.build_network(cfg.model, num_classes=10)
  with pytest.raises(networks.UnknownEncoder, match="named 'unnamed'; build it as 'encoder'"):
    net.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)), is_training=True)

def test_an_unknown_arch_is_one_line_naming_the_valid_ones():
  from byol_jax import networks, train
  with pytest.raises(train.ConfigError, match=r"^model.arch='convnet'; valid: resnet \("):
    train.validate(tiny_config(**{'model.arch': 'convnet'}), 1)
  with pytest.raises(ValueError, match=r"^model.arch='convnet'; valid: resnet \(networks"):
    networks.build_network(tiny_config(**{'model.arch': 'convnet'}).model, 10)


@pytest.mark.slow
def test_a_registered_loss_is_a_config_value_and_trains(tmp_path, monkeypatch):
  """A new objective is one function in losses.LOSSES, chosen by --config.loss. Before,
  the names byol and infonce were written out in train.validate, in make_step_fns' check
  and in the step's if/else, so a new loss meant three edits and a bad name listed only
  those two."""
  from byol_jax import losses, train
  calls = []

  def cosine(pred1, pred2, target1, target2, temperature, axis_name=None):
    del temperature, axis_name
    calls.append(pred1.shape)
    cos = lambda p, t: jnp.sum(losses.l2_normalize(p) * losses.l2_normalize(t), -1)
    return -jnp.mean(cos(pred1, target2) + cos(pred2, target1))

  monkeypatch.setitem(losses.LOSSES, 'cosine', cosine)
  with pytest.raises(train.ConfigError, match=r"^loss='nce'; valid: byol, infonce, cosine "):
    train.validate(tiny_config(loss='nce'), 1)
  train.train_and_evaluate(tiny_config(steps=2, eval_at_init=False, loss='cosine'),
                           str(tmp_path))
  assert calls  # traced into the step
  with open(tmp_path / 'metrics' / 'train.jsonl') as f:
    assert -2.0 <= json.loads(f.readlines()[-1])['loss'] <= 2.0  # within the cosine's range


def test_an_arch_named_by_its_import_path_needs_no_registration():
  """A class registered by a user's config file exists only in that process: the export
  CLI on such a run said 'no usable checkpoint ... unreadable (unknown model.arch)'. Named
  'module:Class', every tool imports it; a path that does not import is one line."""
  from byol_jax import export, networks, train
  cfg = tiny_config(**{'model.arch': 'extend_test:TinyConvNet'})
  cfg.model.channels = 12
  assert networks.encoder_class(cfg.model) is TinyConvNet
  train.validate(cfg, 1)
  assert export.sidecar(cfg, 'npz', 'online', 0)['feature_dim'] == 12
  cfg.model.arch = 'no_such_module:Net'
  with pytest.raises(train.ConfigError, match=r"^model.arch='no_such_module:Net': cannot "
                     r"import it \(No module named 'no_such_module'\); put no_such_module.py"):
    train.validate(cfg, 1)


def test_an_import_path_that_is_found_but_fails_is_not_called_missing(tmp_path, monkeypatch):
  """A module on the path whose own import fails (a dependency it imports is missing) was
  told 'put my_encoder.py on PYTHONPATH', where it already was; a module without the class
  likewise. Each now says what failed."""
  from byol_jax import train
  (tmp_path / 'my_encoder_dep.py').write_text('import no_such_dependency_xyz\n')
  (tmp_path / 'my_encoder_noclass.py').write_text('OTHER = 1\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = tiny_config(**{'model.arch': 'my_encoder_dep:Net'})
  with pytest.raises(train.ConfigError, match='no_such_dependency_xyz') as e:
    train.validate(cfg, 1)
  assert 'PYTHONPATH' not in str(e.value), e.value
  cfg.model.arch = 'my_encoder_noclass:Net'
  with pytest.raises(train.ConfigError, match=r"my_encoder_noclass has no 'Net'") as e:
    train.validate(cfg, 1)
  assert 'PYTHONPATH' not in str(e.value), e.value


def test_a_run_whose_encoder_is_not_registered_here_says_so_not_unreadable(tmp_path,
                                                                            monkeypatch):
  """A run of an encoder registered by its own config file, read by a process that did not
  register it (linear_eval, the eval worker, features): every checkpoint was skipped as
  'unreadable' and the CLI said 'no usable checkpoint'. The arch's own error comes through."""
  from byol_jax import checkpointing, features, networks, train
  monkeypatch.setitem(networks.ENCODERS, 'tiny_convnet', TinyConvNet)
  cfg = tiny_config(steps=2, eval_at_init=False, **{'model.arch': 'tiny_convnet'})
  cfg.model.channels = 12
  train.train_and_evaluate(cfg, str(tmp_path))
  monkeypatch.delitem(networks.ENCODERS, 'tiny_convnet')
  with pytest.raises(Exception, match=r"^model.arch='tiny_convnet'; valid: ") as e:
    checkpointing.load_state(str(tmp_path), 2)
  assert not isinstance(e.value, checkpointing.CheckpointError)
  with pytest.raises(Exception, match=r"^model.arch='tiny_convnet'"):
    features.Encoder.from_workdir(str(tmp_path))
