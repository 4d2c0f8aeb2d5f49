"""Replacing a tool's output safely: the one rule convert, export and the pretrained cache
follow when they write to a path a user named.

- `check_output` refuses the current directory or a folder holding it, a path that is or
  holds an input, and an existing output unless `overwrite` is set and the output is
  recognisably what the tool writes (its `Kind.is_ours`). Anything else is never touched.
- `write_atomically` writes the new output into a hidden folder beside it
  (`.NAME.XXXXXXXX.partial`), moves the old output into that folder, moves the new one in,
  and only then deletes the folder with the old output. A failure before the swap leaves
  the old output as it was; a failure during the swap puts it back.
- A writer killed on the way (SIGKILL, a power cut) leaves that folder behind. The writer
  holds an `flock` on a file in it, which the kernel releases when the writer dies, and
  names its output in that file. The next check of the same output removes such folders
  whose writer is gone, after putting back an old output the swap had moved aside without
  completing. A folder that is not laid out as this module lays it out, or whose writer
  still runs, is left alone.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Sequence

from resnet_jax.errors import UserError, os_error_reason

try:
  import fcntl
except ImportError:  # Windows: no flock, so a killed writer's folder is not recognised
  fcntl = None

PARTIAL_SUFFIX = '.partial'
WRITER_FILE = '.writer'  # flock'ed while the writer lives; names the output
REPLACED = 'replaced'  # the old output while the swap runs
DISCARDED = 'discarded'  # the old output once the new one is in place


@dataclasses.dataclass(frozen=True)
class Kind:
  """What a tool writes at an output path.

  tool: the command, for messages ('convert').
  description: what `is_ours` accepts, for the refusal message.
  is_ours: whether an existing output is one this tool wrote and may replace.
  companions: suffixes of files written beside the output and replaced with it
    (export's '.json' contract).
  """
  tool: str
  description: str
  is_ours: Callable[[Path], bool]
  companions: Sequence[str] = ()

  def names(self, output: Path) -> List[str]:
    """The output's own name and its companions', the output first."""
    return [output.name] + [output.name + suffix for suffix in self.companions]


def check_output(output: Path, kind: Kind, inputs: Iterable[Path] = (),
                 overwrite: bool = False) -> None:
  """One UserError unless `output` may be written (see the module docstring). Removes
  what a killed writer of `output` left beside it first."""
  output = Path(output)
  paths = [output.parent / name for name in kind.names(output)]
  for path in paths:
    _refuse_cwd_and_inputs(path, output, inputs)
  if output.parent.is_dir():
    remove_leftovers(output, kind)
  present = [str(path) for path in paths if os.path.lexists(path)]
  if not present:
    return
  if not overwrite:
    what = '' if present == [str(output)] else f' ({" and ".join(present)})'
    raise UserError(f'--output {output} already exists{what}; remove it or pass --overwrite.')
  if not kind.is_ours(output):
    raise UserError(f'--output {output} exists and is not something {kind.tool} writes '
                    f'({kind.description}); refusing to replace it. Choose another '
                    f'--output, or move it away yourself.')


def _refuse_cwd_and_inputs(path: Path, output: Path, inputs: Iterable[Path]) -> None:
  cwd = Path.cwd().resolve()
  for out in {Path(os.path.abspath(path)), path.resolve()}:
    if out == cwd or out in cwd.parents:
      raise UserError(f'--output {output} is the current directory or contains it; '
                      f'name a new directory or file, e.g. --output {output / "converted"}.')
    for source in inputs:
      source = Path(source).resolve()
      if out == source or out in source.parents:
        raise UserError(f'--output {output} is or contains the input {source}; '
                        f'choose an output elsewhere.')


def write_atomically(output: Path, write: Callable[[Path], None], kind: Kind,
                     overwrite: bool = False) -> None:
  """Calls write(tmp_output) in a hidden folder beside `output` (it writes the output and
  its companions there), then swaps the result into place as the module docstring says.
  A write that fails for the operating system (a full disk) is one UserError."""
  check_output(output, kind, overwrite=overwrite)
  output = Path(os.path.abspath(output))
  output.parent.mkdir(parents=True, exist_ok=True)
  with _partial_folder(output) as folder:
    try:
      write(folder / output.name)
    except Exception as e:  # pylint: disable=broad-except  (a full disk, whoever wrote)
      reason = os_error_reason(e)
      if reason is None:
        raise  # a bug keeps its traceback
      raise UserError(f'Writing --output {output} failed ({reason}); nothing there changed. '
                      'Free disk space or make its folder writable, then run the command '
                      'again.') from None
    check_output(output, kind, overwrite=overwrite)  # still the output checked before
    _swap(folder, output, kind.names(output))


def replace_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
  """Writes one file so that a reader, a kill or a full disk leaves the old file or the new
  one, never an empty or partial one: `write` fills a temporary file beside it, which is
  synced, then renamed over `path`."""
  temporary = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  # 0o666 (less the umask) as open() would give, not mkstemp's owner-only 0o600.
  handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(handle, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise


@contextlib.contextmanager
def _partial_folder(output: Path):
  """A new hidden folder beside `output`, flock'ed through its writer file; removed on exit."""
  folder = Path(tempfile.mkdtemp(prefix=f'.{output.name}.', suffix=PARTIAL_SUFFIX,
                                 dir=output.parent))
  fd = os.open(folder / WRITER_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    if fcntl is not None:
      fcntl.flock(fd, fcntl.LOCK_EX)
    # Written after the lock is held: a reader that finds it names a locked folder.
    os.write(fd, json.dumps({'output': output.name, 'pid': os.getpid(),
                             'host': socket.gethostname()}).encode())
    yield folder
  finally:
    if not _holds_an_old_output(folder):  # else it could not be put back: the next
      _remove_folder(folder)                 # check of the output retries
    os.close(fd)


def _holds_an_old_output(folder: Path) -> bool:
  replaced = folder / REPLACED
  return replaced.is_dir() and bool(os.listdir(replaced))


def _swap(folder: Path, output: Path, names: Sequence[str]) -> None:
  """Moves the old output (all `names`) into folder/replaced/, the new one from `folder`
  into place, then renames replaced/ to discarded/: from then on the swap is complete."""
  replaced = folder / REPLACED
  replaced.mkdir()
  moved_in = []
  try:
    for name in names:
      if os.path.lexists(output.parent / name):
        os.rename(output.parent / name, replaced / name)
    for name in names:
      os.rename(folder / name, output.parent / name)
      moved_in.append(name)
  except OSError:
    for name in moved_in:  # new parts with no old one to put back in their place
      if not os.path.lexists(replaced / name):
        os.rename(output.parent / name, folder / name)
    _put_back(folder, output.parent)
    raise
  os.rename(replaced, folder / DISCARDED)


def _put_back(folder: Path, parent: Path) -> None:
  """Undoes an incomplete swap: each old part in folder/replaced/ goes back to its place,
  and what the swap had moved there goes back into `folder`."""
  replaced = folder / REPLACED
  for name in sorted(os.listdir(replaced)):
    if os.path.lexists(parent / name):
      if os.path.lexists(folder / name):  # then not the swap's new part: someone else's
        raise FileExistsError(f'{parent / name} appeared after {folder} was left')
      os.rename(parent / name, folder / name)
    os.rename(replaced / name, parent / name)


def _remove_folder(folder: Path, settle_s: float = 5.0) -> None:
  """Deletes `folder`, its writer file last, so that a folder interrupted while being
  removed is still recognised (and removed) later. What reappears meanwhile (a failed
  save's last background writes, orbax's, landing late) is removed again for up to
  `settle_s`; after that the writer file stays, so that the next check removes the rest."""
  deadline = time.monotonic() + settle_s
  while True:
    try:
      entries = [entry for entry in os.listdir(folder) if entry != WRITER_FILE]
    except FileNotFoundError:
      return
    if not entries:
      break
    if time.monotonic() > deadline:
      return
    for entry in entries:
      path = folder / entry
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          path.unlink()
    time.sleep(0.05)  # then look again: a late write may have made a new entry
  with contextlib.suppress(OSError):
    (folder / WRITER_FILE).unlink()
    folder.rmdir()


# ------------------------------------------------------------ a killed writer's leftovers


def remove_leftovers(output: Path, kind: Kind) -> List[Path]:
  """Removes the folders a killed writer of `output` left beside it, putting back an old
  output whose swap it had begun; returns them. Best effort: a folder that cannot be
  removed is left for the next time."""
  if fcntl is None:
    return []
  output = Path(output)
  allowed = {WRITER_FILE, REPLACED, DISCARDED, *kind.names(output)}
  prefix = f'.{output.name}.'
  removed = []
  for entry in os.listdir(output.parent):
    middle = entry[len(prefix):-len(PARTIAL_SUFFIX)]
    if (entry.startswith(prefix) and entry.endswith(PARTIAL_SUFFIX) and middle
        and '.' not in middle):
      folder = output.parent / entry
      with contextlib.suppress(OSError):
        if _remove_if_dead(folder, output, allowed):
          removed.append(folder)
  return removed


def _remove_if_dead(folder: Path, output: Path, allowed: set) -> bool:
  """Removes `folder` if it is a partial folder of `output` whose writer is gone."""
  if folder.is_symlink() or not folder.is_dir() or not set(os.listdir(folder)) <= allowed:
    return False
  fd = os.open(folder / WRITER_FILE, os.O_RDONLY | os.O_NOFOLLOW)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return False  # its writer is still running
    try:
      ours = json.loads(os.pread(fd, 10_000, 0))['output'] == output.name
    except (ValueError, KeyError, TypeError):
      return False
    if not ours or not (folder / WRITER_FILE).exists():  # another remover was first
      return False
    if (folder / REPLACED).is_dir():
      _put_back(folder, output.parent)
    _remove_folder(folder)
    return True
  finally:
    os.close(fd)
