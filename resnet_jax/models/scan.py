"""Map variables between the unrolled layout and the `scan_blocks=True` layout.

Unrolled, stage `layerK` holds blocks '0', '1', ..., 'n-1'. Scanned, it holds '0' and
'rest', whose leaves stack blocks '1'..'n-1' along a new leading axis. `scan_tree` and
`unscan_tree` map any tree that holds variables (a train state: parameters, statistics,
the optimizer's per-parameter state, a weight EMA), for resuming in the other layout.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Variables = Mapping[str, Any]


def _is_stage(name: str, tree: Any) -> bool:
  return name.startswith('layer') and isinstance(tree, Mapping) and '0' in tree


def _map_stages(variables: Variables, fn) -> dict:
  """Applies fn to every stage dict in every collection ('params', 'batch_stats', ...)."""
  return {
      collection: {name: fn(sub) if _is_stage(name, sub) else sub for name, sub in tree.items()}
      for collection, tree in variables.items()
  }


def _stack_stage(stage: Mapping[str, Any]) -> dict:
  rest = [stage[str(i)] for i in range(1, len(stage))]
  if 'rest' in stage or not rest:
    return dict(stage)
  return {'0': stage['0'], 'rest': jax.tree.map(lambda *xs: jnp.stack(xs), *rest)}


def _unstack_stage(stage: Mapping[str, Any]) -> dict:
  if 'rest' not in stage:
    return dict(stage)
  length = len(jax.tree.leaves(stage['rest'])[0])
  blocks = {str(i + 1): jax.tree.map(lambda x, i=i: x[i], stage['rest']) for i in range(length)}
  return {'0': stage['0'], **blocks}


def scan_variables(variables: Variables) -> dict:
  """Unrolled variables -> variables of the same model built with `scan_blocks=True`."""
  return _map_stages(variables, _stack_stage)


def unscan_variables(variables: Variables) -> dict:
  """Variables of a `scan_blocks=True` model -> the unrolled (torchvision-named) layout."""
  return _map_stages(variables, _unstack_stage)


def is_scanned(params: Mapping[str, Any]) -> bool:
  """Whether a model's parameters (or a checkpoint's tree of them) are in the scanned
  layout: some stage holds 'rest'."""
  return any(_is_stage(name, sub) and 'rest' in sub for name, sub in params.items())


def _has_stages(node: Any) -> bool:
  return isinstance(node, Mapping) and any(_is_stage(k, v) for k, v in node.items())


def _map_stage_holders(tree: Any, fn) -> Any:
  """Applies fn to each stage of every mapping in `tree` that holds stages, wherever it
  sits (optimizer states nest parameter-shaped trees in tuples)."""
  def visit(node):
    if not _has_stages(node):
      return node
    return {name: fn(sub) if _is_stage(name, sub) else sub for name, sub in node.items()}
  return jax.tree.map(visit, tree, is_leaf=_has_stages)


def holds_scanned(tree: Any) -> bool:
  """Whether any variable-shaped subtree of `tree`, wherever it sits (a train state, a
  checkpoint's metadata tree, {'ema': variables}), is in the scanned layout."""
  return any(is_scanned(node) for node in jax.tree.leaves(tree, is_leaf=_has_stages)
             if _has_stages(node))


def scan_tree(tree: Any) -> Any:
  """`scan_variables` for any tree of variable-shaped subtrees (a whole train state)."""
  return _map_stage_holders(tree, _stack_stage)


def unscan_tree(tree: Any) -> Any:
  """`unscan_variables` for any tree of variable-shaped subtrees (a whole train state)."""
  return _map_stage_holders(tree, _unstack_stage)
