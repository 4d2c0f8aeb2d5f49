"""UserError is one line from every command-line tool; any other error (a bug) keeps its
traceback (resnet_jax.errors); a failed write is told from a bug by the OS's words."""

import errno

import pytest

from resnet_jax import evaluate, export, predict
from resnet_jax.convert import cli as convert_cli
from resnet_jax.errors import UserError, os_error_reason


def _fail(error):
  def fail(*args, **kwargs):
    raise error
  return fail


# (the tool's main, the function on its path to replace, arguments that reach it)
TOOLS = {
    'evaluate': (evaluate.main, evaluate, 'evaluate', ['--checkpoint', 'x']),
    'predict': (predict.main, predict, 'load_pretrained', ['--pretrained', 'resnet18', 'a.png']),
    'export': (export.main, export, 'export', None),
    'convert': (convert_cli.main, convert_cli, '_convert', None),  # args in tmp_path
}


@pytest.mark.parametrize('tool', sorted(TOOLS))
def test_user_error_is_one_line_and_a_bug_keeps_its_traceback(tool, monkeypatch, capsys,
                                                               tmp_path):
  main, module, name, args = TOOLS[tool]
  if tool == 'convert':
    weights = tmp_path / 'w.pt'
    weights.write_bytes(b'')
    args = ['--input', str(weights), '--arch', 'resnet18', '--output', str(tmp_path / 'o')]
  if tool == 'export':
    args = ['--checkpoint', str(tmp_path), '--output', str(tmp_path / 'out')]
  if tool == 'predict':
    import resnet_jax.pretrained
    module = resnet_jax.pretrained
  monkeypatch.setattr(module, name, _fail(UserError('do this instead')))
  with pytest.raises(SystemExit) as exit_info:
    main(args)
  assert exit_info.value.code != 0
  assert 'do this instead' in capsys.readouterr().err + str(exit_info.value.code)
  monkeypatch.setattr(module, name, _fail(ValueError('a bug')))
  with pytest.raises(ValueError, match='a bug'):  # not caught: python prints the traceback
    main(args)


def _raised_from(error, cause):
  try:
    try:
      raise cause
    except Exception:  # pylint: disable=broad-except
      raise error  # pylint: disable=raise-missing-from  (chained as __context__)
  except Exception as e:  # pylint: disable=broad-except
    return e


@pytest.mark.parametrize('error, reason', [
    (_raised_from(RuntimeError('enforce fail at inline_container.cc'),
                  OSError(errno.ENOSPC, 'No space left on device')),
     'OSError: No space left on device'),
    (PermissionError(errno.EACCES, 'Permission denied'), 'PermissionError: Permission denied'),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database: Failed to write 8 '
                "bytes to file 12: No space left on device [os_error_code='28']"),
     'OSError: No space left on device'),
    (type('ResourceExhaustedError', (Exception,), {})('/tmp/x/saved_model.pb.tmp1; No space '
                                                      'left on device'),
     'ResourceExhaustedError: No space left on device'),
    (ValueError('shapes (3,) and (4,) do not match'), None),  # a bug: no reason, its traceback
])
def test_os_error_reason_finds_the_operating_systems_words(error, reason):
  assert os_error_reason(error) == reason
