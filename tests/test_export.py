"""resnet_jax.export: the artifact, loaded in a fresh process with jax (or TensorFlow) only,
gives resnet_jax's logits on the same uint8 pixels."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from resnet_jax import export, load_model
from resnet_jax.data.normalization import normalize

BATCH_SIZES = (1, 7)

JAX_LOADER = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    artifact, inputs, outputs = sys.argv[1:]
    exported = jax.export.deserialize(open(artifact, 'rb').read())
    pixels = np.load(inputs)
    np.savez(outputs, **{str(n): np.asarray(exported.call(pixels[:n])) for n in (1, 7)})
    assert 'resnet_jax' not in sys.modules and 'flax' not in sys.modules, 'not jax alone'
''')

TF_LOADER = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow as tf
    artifact, inputs, outputs = sys.argv[1:]
    serve = tf.saved_model.load(artifact).signatures['serving_default']
    pixels = np.load(inputs)
    np.savez(outputs, **{str(n): serve(pixels=tf.constant(pixels[:n]))['logits'].numpy()
                         for n in (1, 7)})
    # TensorFlow itself imports jax when it is installed; resnet_jax and flax it does not.
    assert not {'resnet_jax', 'flax'} & set(sys.modules), 'not tensorflow alone'
''')


def _pixels(contract):
  _, height, width, channels = contract['input']['shape']
  return np.random.default_rng(0).integers(0, 256, (7, height, width, channels), np.uint8)


def _expected(workdir, pixels):
  model, variables = load_model(workdir)
  logits = model.apply(variables, normalize(pixels, 'digits'), train=False)
  return np.asarray(logits, np.float32)


def _run_loader(loader, artifact, pixels, tmp_path):
  np.save(tmp_path / 'pixels.npy', pixels)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}
  env.pop('PYTHONPATH', None)  # the loader must not need resnet_jax
  result = subprocess.run(
      [sys.executable, '-c', loader, str(artifact), str(tmp_path / 'pixels.npy'),
       str(tmp_path / 'logits.npz')], capture_output=True, text=True, env=env,
      cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(tmp_path / 'logits.npz')


@pytest.mark.slow
def test_jax_export_runs_with_jax_alone(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  artifact = tmp_path / 'digits.jaxexport'
  assert export.main(['--checkpoint', workdir, '--output', str(artifact)]) == 0
  contract = json.loads((tmp_path / 'digits.jaxexport.json').read_text())
  assert contract['input'] == {'name': 'pixels', 'dtype': 'uint8', 'layout': 'NHWC',
                               'range': [0, 255], 'shape': [None, 8, 8, 1]}
  assert contract['normalization']['name'] == 'digits'
  assert contract['num_classes'] == 10
  pixels = _pixels(contract)
  got = _run_loader(JAX_LOADER, artifact, pixels, tmp_path)
  expected = _expected(workdir, pixels)
  for n in BATCH_SIZES:
    np.testing.assert_allclose(got[str(n)], expected[:n], rtol=1e-4, atol=1e-4)
  assert sorted(os.listdir(tmp_path)) == ['digits.jaxexport', 'digits.jaxexport.json',
                                          'logits.npz', 'pixels.npy']


@pytest.mark.slow
def test_saved_model_runs_with_tensorflow_alone(trained_workdir, tmp_path):
  pytest.importorskip('tensorflow')
  workdir, _ = trained_workdir
  artifact = tmp_path / 'digits_savedmodel'
  assert export.main(['--checkpoint', workdir, '--output', str(artifact),
                      '--format', 'saved_model']) == 0
  contract = json.loads((artifact / export.SAVED_MODEL_CONTRACT).read_text())
  pixels = _pixels(contract)
  got = _run_loader(TF_LOADER, artifact, pixels, tmp_path)
  expected = _expected(workdir, pixels)
  for n in BATCH_SIZES:
    np.testing.assert_allclose(got[str(n)], expected[:n], rtol=1e-4, atol=1e-4)
  assert export.KINDS['saved_model'].is_ours(artifact)  # so --overwrite may replace it
  (artifact / 'notes.txt').write_text('mine')
  assert not export.KINDS['saved_model'].is_ours(artifact)


def test_fixed_batch_and_bfloat16(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  artifact = tmp_path / 'fixed.jaxexport'
  assert export.main(['--checkpoint', workdir, '--output', str(artifact), '--batch', '7',
                      '--dtype', 'bfloat16']) == 0
  exported = jax.export.deserialize(artifact.read_bytes())
  assert exported.in_avals[0].shape == (7, 8, 8, 1)
  pixels = _pixels(json.loads((tmp_path / 'fixed.jaxexport.json').read_text()))
  got = np.asarray(exported.call(pixels))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _expected(workdir, pixels), rtol=0.1, atol=0.1)


@pytest.mark.parametrize('problem', ['missing', 'exists', 'unwritable', 'bad_batch'])
def test_bad_input_is_one_message_and_writes_nothing(trained_workdir, tmp_path, capsys,
                                                     problem):
  workdir, _ = trained_workdir
  output = tmp_path / 'out' / 'model.jaxexport'
  args = ['--checkpoint', workdir, '--output', str(output)]
  if problem == 'missing':
    args[1] = str(tmp_path / 'nope')
  elif problem == 'exists':
    output.parent.mkdir()
    output.write_bytes(b'keep me')
  elif problem == 'unwritable':  # its folder cannot be made: a file is in the way
    output.parent.write_text('a file')
    output = output.parent
  else:
    args += ['--batch', '0']
  with pytest.raises(SystemExit) as exit_info:
    export.main(args)
  assert exit_info.value.code != 0
  error = capsys.readouterr().err
  assert error.count('error:') == 1 and 'Traceback' not in error
  if problem == 'exists':
    assert output.read_bytes() == b'keep me' and '--overwrite' in error
    assert os.listdir(output.parent) == ['model.jaxexport']
  elif problem == 'unwritable':
    assert output.read_text() == 'a file'
  else:
    assert not output.parent.exists()


def _refused(args, capsys, why):
  with pytest.raises(SystemExit) as exit_info:
    export.main([str(a) for a in args])
  error = capsys.readouterr().err
  assert exit_info.value.code == 2 and error.count('error:') == 1, error
  assert why in error and 'Traceback' not in error, error


def _files(directory):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob('*'))


def test_overwrite_replaces_only_what_export_wrote(trained_workdir, tmp_path, capsys,
                                                   monkeypatch):
  workdir, _ = trained_workdir
  album = tmp_path / 'album'
  (album / 'photos').mkdir(parents=True)
  (album / 'photos' / 'cat.jpg').write_bytes(b'cat')
  (album / 'notes.jaxexport').write_bytes(b'mine')
  (album / 'notes.jaxexport.json').write_text('{"mine": true}')
  before = _files(album)
  source = ['--checkpoint', workdir, '--overwrite']
  saved_model = source + ['--format', 'saved_model']
  _refused(saved_model + ['--output', album], capsys, 'is not something export writes')
  _refused(source + ['--output', album / 'notes.jaxexport'], capsys, 'is not something')
  _refused(saved_model + ['--output', workdir], capsys, 'contains the input')
  _refused(saved_model + ['--output', os.path.dirname(workdir)], capsys, 'contains the input')
  monkeypatch.chdir(album / 'photos')
  for output in ['.', '..', str(album)]:
    _refused(saved_model + ['--output', output], capsys, 'current directory')
    _refused(source + ['--output', output], capsys, 'current directory')
  assert _files(album) == before

  # What export wrote is replaced; an artifact that no longer matches its contract is not.
  artifact = tmp_path / 'digits.jaxexport'
  assert export.main(['--checkpoint', workdir, '--output', str(artifact)]) == 0
  assert export.main(source + ['--output', str(artifact), '--batch', '7']) == 0
  assert jax.export.deserialize(artifact.read_bytes()).in_avals[0].shape == (7, 8, 8, 1)
  artifact.write_bytes(artifact.read_bytes() + b'edited')
  _refused(source + ['--output', artifact], capsys, 'is not something export writes')
  assert sorted(os.listdir(tmp_path)) == ['album', 'digits.jaxexport', 'digits.jaxexport.json']


@pytest.mark.parametrize('platforms', ['foo', '', 'cpu,foo', 'cpu,cpu', ','])
def test_platforms_are_checked(trained_workdir, tmp_path, capsys, platforms):
  workdir, _ = trained_workdir
  _refused(['--checkpoint', workdir, '--output', tmp_path / 'm.jaxexport', '--platforms',
            platforms], capsys, 'cpu, cuda, rocm, tpu')
  assert os.listdir(tmp_path) == []


KILLED_EXPORT = textwrap.dedent('''
    import os, pathlib, signal, sys
    from resnet_jax import export
    def die(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGKILL)
    pathlib.Path.write_bytes = die  # killed while writing the artifact
    export.main(['--checkpoint', sys.argv[1], '--output', sys.argv[2]])
''')


@pytest.mark.cli
def test_what_a_killed_export_left_is_removed_by_the_next(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  artifact = tmp_path / 'digits.jaxexport'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.path.dirname(os.path.dirname(export.__file__))}
  killed = subprocess.run([sys.executable, '-c', KILLED_EXPORT, workdir, str(artifact)],
                          env=env, timeout=300, capture_output=True, text=True)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert [p.name.startswith('.digits.jaxexport.') for p in tmp_path.iterdir()] == [True]
  assert export.main(['--checkpoint', workdir, '--output', str(artifact)]) == 0
  assert sorted(os.listdir(tmp_path)) == ['digits.jaxexport', 'digits.jaxexport.json']


def test_saved_model_without_tensorflow_says_what_to_install(trained_workdir, tmp_path,
                                                             monkeypatch, capsys):
  workdir, _ = trained_workdir
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # import tensorflow -> ImportError
  with pytest.raises(SystemExit):
    export.main(['--checkpoint', workdir, '--output', str(tmp_path / 'sm'),
                 '--format', 'saved_model'])
  assert "pip install 'resnet_jax[train]'" in capsys.readouterr().err
  assert not (tmp_path / 'sm').exists()
