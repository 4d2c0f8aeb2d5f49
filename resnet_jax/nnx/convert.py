"""Variables between the linen layout ({'params', 'batch_stats'}) and NNX models.

The mapping is by name: linen's `layer1/0/conv1/kernel` is NNX's `layer1[0].conv1.kernel`
(digit names become list indices), `params` leaves are `nnx.Param`s and `batch_stats`
leaves `nnx.BatchStat`s. So converted PyTorch weights and training checkpoints (also
with `scan_blocks=True`'s layout) load into NNX models, and NNX weights go back.
"""

from typing import Any, Mapping, Union

import jax.numpy as jnp
from flax import nnx, traverse_util

from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.models import zoo
from resnet_jax.models.scan import unscan_variables
from resnet_jax.nnx.models import ResNet

COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def to_linen(model: ResNet) -> dict:
  """{'params', 'batch_stats'} of `model.spec`, the linen model (unrolled layout)."""
  return {collection: _linen_tree(nnx.state(model, kind))
          for collection, kind in COLLECTIONS.items()}


def from_linen(variables: Mapping[str, Any], model: Union[str, models.ResNet],
               **overrides) -> ResNet:
  """The NNX model of `model` holding linen `variables`, in eval mode.

  `model` is a zoo name (with `create_model`'s overrides, e.g. num_classes=10) or a
  linen `ResNet`. Scanned variables (`scan_blocks=True`) are unrolled first. Raises a
  UserError listing missing, unexpected and mis-shaped variables when they do not fit.
  """
  spec = zoo.create_model(model, **overrides) if isinstance(model, str) else model.clone(
      **overrides)
  spec = spec.clone(scan_blocks=False)
  abstract = nnx.eval_shape(lambda: ResNet(spec, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = {path: variable for path, variable in nnx.to_flat_state(state)}
  collections, strays = _collections(variables)
  given = _flat_nnx_paths(unscan_variables(collections))
  _check_fits(given, expected, strays)
  values = {path: jnp.asarray(given[path], expected[path].dtype) for path in expected}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
  return nnx.merge(graphdef, state)


def _linen_tree(state: nnx.State) -> dict:
  """A pure dict with linen's string names ('0', not 0)."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  return traverse_util.unflatten_dict(
      {tuple(str(key) for key in path): value for path, value in flat.items()})


def _collections(variables: Any):
  """({collection: tree} of the collections NNX models hold, [the names of anything else]):
  other entries, or a collection that is not a mapping, do not fit any model."""
  if not isinstance(variables, Mapping):
    return {}, [f'{type(variables).__name__} (not a mapping of collections)']
  fitting = {c: tree for c, tree in variables.items()
             if c in COLLECTIONS and isinstance(tree, Mapping)}
  return fitting, [str(c) for c in variables if c not in fitting]


def _flat_nnx_paths(variables: Mapping[str, Any]) -> dict:
  """{(collection-free NNX path): array} over the collections NNX models hold."""
  flat = {}
  for collection in COLLECTIONS:
    for path, value in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
      flat[tuple(int(key) if key.isdigit() else key for key in path)] = value
  return flat


def _check_fits(given: dict, expected: dict, strays=()):
  name = lambda path: '/'.join(map(str, path))
  missing = [name(p) for p in expected if p not in given]
  unexpected = list(strays) + [name(p) for p in given if p not in expected]
  misshaped = [f'{name(p)} {tuple(jnp.shape(given[p]))} (expected {tuple(v.shape)})'
               for p, v in expected.items() if p in given and jnp.shape(given[p]) != v.shape]
  problems = [f'{label}: {", ".join(items[:8])}{" ..." if len(items) > 8 else ""}'
              for label, items in (('missing', missing), ('unexpected', unexpected),
                                   ('wrong shape', misshaped)) if items]
  if problems:
    raise UserError('The variables do not fit this model (is it the model, num_classes and '
                    'in_channels they were made for?); ' + '; '.join(problems) + '.')
