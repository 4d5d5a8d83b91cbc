"""Torch-free reader and writer for PyTorch ``torch.save`` zip checkpoints.

Why: the converters must read the reference ``.pt`` / ``.pth`` weights (and tests must write small ones) on
machines without torch, and must never execute code hidden in a pickle. The reader unpickles ``data.pkl``
with an allow-list that only knows how to rebuild tensors and plain containers; every tensor comes back as
a :class:`LazyTensor` whose bytes stay in the (memory-mapped) zip until asked for, so converting a 4 GB
checkpoint needs memory for about one tensor at a time.

Layout of the format (torch >= 1.6)::

  <archive>/data.pkl            pickle (protocol 2) of the object; tensors refer to storages by key
  <archive>/data/<key>          raw little-endian storage bytes, stored uncompressed, 64-byte aligned
  <archive>/byteorder           "little" (absent in old files: little)
  <archive>/version             "3\\n" (plus .format_version / .storage_alignment / .data/serialization_id)
"""

from __future__ import annotations

import collections
import io
import logging
import mmap
import os
import pathlib
import pickle
import secrets
import struct
import sys
import threading
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from v2w_jax.atomic_file import atomic_write
from v2w_jax.user_errors import UserError

__all__ = [
    "LazyTensor",
    "TorchCheckpoint",
    "TorchCheckpointError",
    "UnsafeCheckpointError",
    "load",
    "save",
]

_log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Storage class name (as pickled under module "torch") -> numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
}
# numpy dtype -> storage class name, for the writer.
_DTYPE_STORAGES: dict[np.dtype, str] = {v: k for k, v in _STORAGE_DTYPES.items()}

# torch dtype objects pickle as GLOBAL torch.<name>; allowed so metadata holding a dtype still loads.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}

# Keys under which training checkpoints commonly nest the state dict.
_WRAPPER_KEYS = ("model", "state_dict", "ema")

# Legacy (pre-1.6) torch.save files start with a pickled magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class TorchCheckpointError(UserError, ValueError):
  """A checkpoint file is malformed or uses a feature this reader does not support."""


class UnsafeCheckpointError(TorchCheckpointError):
  """The checkpoint's pickle refers to a global that is not on the allow-list."""


# --------------------------------------------------------------------------------------------------------
# Reading.


class _ZipSource:
  """Owns the open zip (and its mmap) and hands out the raw bytes of storage entries."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._file = open(path, "rb")
    try:
      self.zip = zipfile.ZipFile(self._file)
    except zipfile.BadZipFile as e:
      self._file.close()
      raise TorchCheckpointError(f"{path}: truncated or corrupt zip archive ({e}); copy or download it again") from e
    try:
      self._mmap: mmap.mmap | None = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # e.g. a filesystem without mmap support: read entries instead.
      self._mmap = None
    self._lock = threading.Lock()
    self._offsets: dict[str, int] = {}

  def entry(self, name: str) -> zipfile.ZipInfo:
    try:
      return self.zip.getinfo(name)
    except KeyError:
      raise TorchCheckpointError(f"{self.path}: missing zip entry {name!r}") from None

  def read_small(self, name: str) -> bytes:
    with self._lock:
      return self.zip.read(name)

  def _data_offset(self, info: zipfile.ZipInfo) -> int:
    """Byte offset of an entry's data in the file (the local header's extra field may differ)."""
    off = self._offsets.get(info.filename)
    if off is None:
      assert self._mmap is not None
      header = self._mmap[info.header_offset:info.header_offset + 30]
      if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise TorchCheckpointError(f"{self.path}: bad local header for zip entry {info.filename!r}")
      name_len, extra_len = struct.unpack("<HH", header[26:30])
      off = info.header_offset + 30 + name_len + extra_len
      if off + info.file_size > len(self._mmap):
        raise TorchCheckpointError(f"{self.path}: zip entry {info.filename!r} runs past the end of the file")
      self._offsets[info.filename] = off
    return off

  def array(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
    """1-D array of ``count`` elements from the start of an entry: an mmap view when possible."""
    info = self.entry(name)
    nbytes = count * dtype.itemsize
    if info.file_size < nbytes:
      raise TorchCheckpointError(
          f"{self.path}: storage {name!r} holds {info.file_size} bytes, expected {nbytes} "
          f"({count} x {dtype})")
    if count == 0:
      return np.empty((0,), dtype)
    if self._mmap is not None and info.compress_type == zipfile.ZIP_STORED:
      return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._data_offset(info))
    with self._lock, self.zip.open(info) as f:  # Compressed entry or no mmap: read (copies).
      data = f.read(nbytes)
    return np.frombuffer(data, dtype=dtype, count=count)


class _StorageType:
  """Stand-in for a ``torch.*Storage`` class named in the pickle."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = dtype

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Storage:
  """A storage entry of the archive: ``numel`` elements of ``dtype`` in ``data/<key>``."""

  def __init__(self, source: _ZipSource, entry: str, dtype: np.dtype, numel: int):
    self.source = source
    self.entry = entry
    self.dtype = dtype
    self.numel = numel

  def array(self) -> np.ndarray:
    return self.source.array(self.entry, self.dtype, self.numel)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Element strides of a C-contiguous tensor, computed the way torch does (size-0 dims count as 1)."""
  strides = []
  acc = 1
  for s in reversed(shape):
    strides.append(acc)
    acc *= max(s, 1)
  return tuple(reversed(strides))


class LazyTensor:
  """A tensor of a checkpoint whose data is read only when converted to numpy.

  ``np.asarray(t)`` / ``t.numpy()`` return a read-only view into the memory-mapped file when the tensor is
  contiguous (zero copy; pages are loaded on access and can be evicted), otherwise a fresh copy.
  """

  def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
    self._storage = storage
    self._offset = offset
    self.shape = shape
    self.stride = stride

  @property
  def dtype(self) -> np.dtype:
    return self._storage.dtype

  @property
  def numel(self) -> int:
    """Number of elements (a property, unlike torch's method)."""
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def size(self) -> int:
    """Number of elements, as numpy's ``ndarray.size``."""
    return self.numel

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize

  def is_contiguous(self) -> bool:
    return all(n == 1 or st == c for n, st, c in zip(self.shape, self.stride, _contiguous_strides(self.shape)))

  def numpy(self, copy: bool = False) -> np.ndarray:
    """Materialises the tensor (a read-only view when contiguous and ``copy`` is False)."""
    if self.numel == 0:
      return np.zeros(self.shape, self.dtype)
    last = self._offset + sum((n - 1) * st for n, st in zip(self.shape, self.stride))
    if self._offset < 0 or any(st < 0 for st in self.stride) or last >= self._storage.numel:
      raise TorchCheckpointError(
          f"{self._storage.source.path}: tensor (offset {self._offset}, shape {self.shape}, stride "
          f"{self.stride}) lies outside its storage {self._storage.entry!r} of {self._storage.numel} elements")
    base = self._storage.array()
    if self.is_contiguous():
      arr = base[self._offset:self._offset + self.numel].reshape(self.shape)
      return arr.copy() if copy else arr
    item = self.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[self._offset:], shape=self.shape, strides=[st * item for st in self.stride], writeable=False)
    return view.copy()

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    arr = self.numpy(copy=bool(copy))
    if dtype is not None and np.dtype(dtype) != arr.dtype:
      arr = arr.astype(dtype)
    return arr

  def __repr__(self) -> str:
    return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, entry={self._storage.entry!r})"


def _make_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> LazyTensor:
  if not isinstance(storage, _Storage):
    raise TorchCheckpointError(f"tensor rebuilt from {type(storage).__name__}, expected a storage reference")
  try:
    shape = tuple(int(s) for s in size)
    strides = tuple(int(s) for s in stride)
    offset = int(storage_offset)
  except (TypeError, ValueError) as e:
    raise TorchCheckpointError(f"malformed tensor record (size={size!r}, stride={stride!r})") from e
  if len(shape) != len(strides) or any(s < 0 for s in shape):
    raise TorchCheckpointError(f"malformed tensor record (size={shape}, stride={strides})")
  return LazyTensor(storage, offset, shape, strides)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata  # Autograd / python attributes do not matter for weights.
  return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


class _TensorClass:
  """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` as named by ``_rebuild_from_type_v2``."""


def _rebuild_from_type_v2(func, new_type, args, state):
  del state  # Python attributes of a tensor subclass; irrelevant for weights.
  if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter, _rebuild_parameter_with_state):
    raise TorchCheckpointError(f"_rebuild_from_type_v2 with unexpected function {func!r}")
  if new_type is not _TensorClass:
    raise TorchCheckpointError(f"_rebuild_from_type_v2 with unexpected type {new_type!r}")
  return func(*args)


def _torch_device(*args):
  return ":".join(str(a) for a in args)


def _torch_size(dims=()):
  return tuple(int(d) for d in dims)


class _Layout:
  """Stand-in for ``torch.strided`` (only dense layouts are supported)."""


def _get_layout(name):
  if name != "torch.strided":
    raise TorchCheckpointError(f"unsupported tensor layout {name!r} (only dense tensors are supported)")
  return _Layout


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "dict"): dict,
      ("builtins", "list"): list,
      ("builtins", "tuple"): tuple,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch", "Tensor"): _TensorClass,
      ("torch._tensor", "Tensor"): _TensorClass,
      ("torch.nn.parameter", "Parameter"): _TensorClass,
      ("torch", "device"): _torch_device,
      ("torch", "Size"): _torch_size,
      ("torch", "strided"): _Layout,
      ("torch.serialization", "_get_layout"): _get_layout,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
  untyped = _StorageType("UntypedStorage", np.dtype(np.uint8))
  allowed[("torch", "UntypedStorage")] = untyped
  allowed[("torch.storage", "UntypedStorage")] = untyped
  for name, dtype in _TORCH_DTYPES.items():
    allowed[("torch", name)] = dtype
  return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only allow-listed globals and maps storages to zip entries."""

  def __init__(self, data: bytes, source: _ZipSource, prefix: str):
    super().__init__(io.BytesIO(data))
    self._source = source
    self._prefix = prefix
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"{self._source.path}: refusing to load, the pickle references the disallowed global "
          f"{module}.{name} (only tensors and plain containers are allowed)") from None

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise TorchCheckpointError(f"{self._source.path}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise TorchCheckpointError(f"{self._source.path}: persistent id with storage type {storage_type!r}")
    key = str(key)
    if "/" in key or key in (".", ".."):
      raise TorchCheckpointError(f"{self._source.path}: bad storage key {key!r}")
    storage = self._storages.get(key)
    if storage is None:
      # For UntypedStorage the dtype is uint8 and numel a byte count, as in torch.
      storage = _Storage(self._source, f"{self._prefix}data/{key}", storage_type.dtype, int(numel))
      self._storages[key] = storage
    elif storage.dtype != storage_type.dtype:
      raise TorchCheckpointError(
          f"{self._source.path}: storage {key!r} used with two dtypes ({storage.dtype}, {storage_type.dtype})")
    return storage


class TorchCheckpoint(Mapping[str, LazyTensor]):
  """Read-only mapping ``name -> LazyTensor`` of one checkpoint (keeps the file open while referenced)."""

  def __init__(self, path: pathlib.Path, tensors: dict[str, LazyTensor], unwrapped_from: str | None):
    self.path = path
    self._tensors = tensors
    self.unwrapped_from = unwrapped_from  # Key of the wrapper dict the tensors came from, if any.

  def __getitem__(self, key: str) -> LazyTensor:
    return self._tensors[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  def __repr__(self) -> str:
    return f"TorchCheckpoint({str(self.path)!r}, {len(self)} tensors)"


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Unpickler for sniffing the legacy magic number; it resolves no globals at all."""

  def find_class(self, module: str, name: str) -> Any:
    raise UnsafeCheckpointError(f"global {module}.{name} in a legacy header")


def _check_not_legacy(path: pathlib.Path) -> None:
  """Raises a clear error for pre-1.6 torch files (a pickle stream or a tar), else a generic one."""
  with open(path, "rb") as f:
    head = f.read(512)
    f.seek(0)
    try:
      legacy = _NoGlobalsUnpickler(f).load() == _LEGACY_MAGIC
    except Exception:  # pylint: disable=broad-except
      legacy = False
  if legacy or head[257:262] == b"ustar":
    raise TorchCheckpointError(
        f"{path}: legacy torch format not supported, re-save with torch>=1.6 (torch.save default zip format)")
  raise TorchCheckpointError(f"{path}: not a torch.save zip checkpoint")


def _check_not_truncated(path: pathlib.Path) -> None:
  """Raises for a file that starts like a zip archive but has no end-of-archive record.

  ``torch.save`` writes the zip directory last, so a partial copy or an interrupted download keeps the
  zip signature at the front and loses the end: say so, instead of "not a checkpoint".
  """
  size = path.stat().st_size
  if size == 0:
    raise TorchCheckpointError(f"{path}: the file is empty (0 bytes): an interrupted copy or download? "
                               "Copy or download it again")
  with open(path, "rb") as f:
    head = f.read(4)
  if head == b"PK\x03\x04":
    raise TorchCheckpointError(
        f"{path}: truncated or corrupt checkpoint: it starts as a torch.save zip archive but its end (the zip "
        f"directory) is missing ({size} bytes); copy or download it again")


def _find_pickle(source: _ZipSource) -> str:
  names = [n for n in source.zip.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(names) != 1:
    raise TorchCheckpointError(
        f"{source.path}: expected exactly one '<archive>/data.pkl' entry, found {names or 'none'}")
  return names[0][:-len("data.pkl")]


def _is_tensor_dict(obj: Any) -> bool:
  return isinstance(obj, dict) and all(isinstance(v, LazyTensor) for v in obj.values())


def load(path: PathLike, *, key: str | None = None) -> TorchCheckpoint:
  """Reads the tensors of a ``torch.save`` zip checkpoint without torch and without running pickled code.

  Args:
    path: the ``.pt`` / ``.pth`` file.
    key: take the state dict from this top-level key (e.g. ``"model"``). By default the top level must be a
      dict of tensors, or a dict holding exactly one dict of tensors under ``model`` / ``state_dict`` /
      ``ema`` which is then unwrapped (logged, and recorded in ``.unwrapped_from``).

  Returns:
    A mapping ``name -> LazyTensor`` in file order.

  Raises:
    UnsafeCheckpointError: the pickle references anything but tensors and plain containers.
    TorchCheckpointError: the file is not a (supported) torch checkpoint or is not a dict of tensors.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if not zipfile.is_zipfile(path):
    _check_not_truncated(path)
    _check_not_legacy(path)
  source = _ZipSource(path)
  prefix = _find_pickle(source)
  try:
    byteorder = source.read_small(f"{prefix}byteorder").decode("ascii", "replace")
  except KeyError:
    byteorder = "little"  # Files written before the byteorder record existed.
  if byteorder != "little":
    raise TorchCheckpointError(f"{path}: byteorder {byteorder!r} not supported (only little-endian)")
  unpickler = _RestrictedUnpickler(source.read_small(f"{prefix}data.pkl"), source, prefix)
  try:
    obj = unpickler.load()
  except TorchCheckpointError:
    raise
  except Exception as e:  # Malformed pickle: report which file.
    raise TorchCheckpointError(f"{path}: cannot unpickle data.pkl ({type(e).__name__}: {e})") from e

  unwrapped = None
  if not isinstance(obj, dict):
    raise TorchCheckpointError(f"{path}: top level is a {type(obj).__name__}, expected a dict of tensors")
  if key is not None:
    if key not in obj:
      raise TorchCheckpointError(f"{path}: no top-level key {key!r} (keys: {sorted(map(str, obj))[:20]})")
    obj, unwrapped = obj[key], key
  elif not _is_tensor_dict(obj):
    candidates = [k for k in _WRAPPER_KEYS if _is_tensor_dict(obj.get(k))]
    if len(candidates) == 1:
      unwrapped = candidates[0]
      _log.info("%s: using the state dict nested under top-level key %r", path, unwrapped)
      obj = obj[unwrapped]
    elif len(candidates) > 1:
      raise TorchCheckpointError(
          f"{path}: several nested state dicts {candidates}; pass key= to choose one")
  if not _is_tensor_dict(obj):
    where = f"[{unwrapped!r}]" if unwrapped is not None else "top level"
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, LazyTensor)]
    raise TorchCheckpointError(
        f"{path}: {where} is not a dict of tensors; non-tensor entries: {', '.join(bad[:10])}"
        + (" ..." if len(bad) > 10 else ""))
  bad_keys = [k for k in obj if not isinstance(k, str)]
  if bad_keys:
    raise TorchCheckpointError(f"{path}: non-string keys {bad_keys[:10]}")
  return TorchCheckpoint(path, dict(obj), unwrapped)


# --------------------------------------------------------------------------------------------------------
# Writing.


class _Global:
  """A reference to ``module.name`` written into the pickle as a GLOBAL opcode (never imported here)."""

  def __init__(self, module: str, name: str):
    self.module = module
    self.name = name

  def __call__(self, *args: Any) -> Any:  # Pickle requires reduce functions to be callable.
    raise TypeError(f"{self.module}.{self.name} is only a pickle reference")


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {name: _Global("torch", name) for name in _STORAGE_DTYPES}


class _StorageRef:
  """A storage to be written as ``data/<key>``; pickled through ``persistent_id``."""

  def __init__(self, key: str, storage_name: str, numel: int):
    self.key = key
    self.storage_name = storage_name
    self.numel = numel


class _TensorRef:
  """A tensor record; reduces to ``_rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())``."""

  def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
    self.storage = storage
    self.shape = shape

  def __reduce__(self):
    return (_REBUILD_TENSOR_V2,
            (self.storage, 0, self.shape, _contiguous_strides(self.shape), False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pure-Python pickler (protocol 2) that writes ``_Global`` objects as GLOBAL opcodes.

  The C pickler insists on importing every global it writes (torch is not available here), so the
  pure-Python one is used: ``reducer_override`` routes ``_Global`` objects to ``save_global`` below.
  """

  def persistent_id(self, obj: Any) -> Any:
    if isinstance(obj, _StorageRef):
      return ("storage", _STORAGE_GLOBALS[obj.storage_name], obj.key, "cpu", obj.numel)
    return None

  def reducer_override(self, obj: Any) -> Any:
    if isinstance(obj, _Global):
      return f"{obj.module}.{obj.name}"
    return NotImplemented

  def save_global(self, obj: Any, name: str | None = None) -> None:
    if not isinstance(obj, _Global):
      super().save_global(obj, name)
      return
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)


def _archive_name(path: pathlib.Path) -> str:
  stem = path.name.split(".")[0]
  name = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem)
  return name or "archive"


def _describe(value: Any) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of a value without materialising it when it is lazy."""
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape is None or dtype is None:
    arr = np.asarray(value)
    return arr.shape, arr.dtype
  return tuple(int(s) for s in shape), np.dtype(dtype)


class _AlignedZipWriter:
  """Writes STORED zip entries whose data start on a 64-byte boundary (like torch)."""

  ALIGN = 64
  _DATE = (1980, 1, 1, 0, 0, 0)

  def __init__(self, fileobj: Any):
    self._f = fileobj
    self.zip = zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

  def write(self, name: str, chunks: Any, nbytes: int) -> None:
    info = zipfile.ZipInfo(name, date_time=self._DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    info.external_attr = 0o644 << 16
    zip64 = nbytes > zipfile.ZIP64_LIMIT // 2  # Forced so the local header size is predictable.
    start = self._f.tell() + 30 + len(name.encode("utf-8")) + (20 if zip64 else 0)
    pad = -start % self.ALIGN
    if 0 < pad < 4:  # An extra field needs at least its 4-byte header.
      pad += self.ALIGN
    if pad:
      info.extra = struct.pack("<HH", 0x4246, pad - 4) + b"Z" * (pad - 4)  # 'FB' padding, as torch.
    with self.zip.open(info, "w", force_zip64=zip64) as w:
      if self._f.tell() % self.ALIGN:
        raise AssertionError(f"zip entry {name} not aligned (at {self._f.tell()})")
      for chunk in chunks:
        w.write(chunk)

  def write_bytes(self, name: str, data: bytes) -> None:
    self.write(name, [data], len(data))

  def __enter__(self) -> _AlignedZipWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.zip.close()


def _array_chunks(arr: np.ndarray, chunk_bytes: int = 64 << 20) -> Iterator[memoryview]:
  flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
  for start in range(0, flat.size, chunk_bytes):
    yield memoryview(flat[start:start + chunk_bytes])


def save(path: PathLike, mapping: Mapping[str, Any]) -> None:
  """Writes ``mapping`` (name -> array) as a zip checkpoint that ``torch.load(weights_only=True)`` reads.

  Values may be numpy / jax arrays or lazy objects (e.g. :class:`LazyTensor`) exposing ``shape`` and
  ``dtype``: tensors are materialised and written one at a time. Supported dtypes: float64/32/16,
  bfloat16 (ml_dtypes), int64/32/16/8, uint8, bool, complex64/128. The top level is a plain dict, as
  ``torch.save(state_dict)`` writes; the file is replaced atomically and gets ordinary permissions
  (0666 minus the umask).
  """
  path = pathlib.Path(path)
  archive = _archive_name(path)
  records: list[tuple[str, Any, tuple[int, ...], np.dtype]] = []
  top: dict[str, _TensorRef] = {}
  for i, (name, value) in enumerate(mapping.items()):
    if not isinstance(name, str):
      raise TypeError(f"{path}: checkpoint keys must be str, got {name!r}")
    shape, dtype = _describe(value)
    storage_name = _DTYPE_STORAGES.get(dtype if dtype.isnative else dtype.newbyteorder("="))
    if storage_name is None:
      raise TypeError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    numel = int(np.prod(shape, dtype=np.int64))
    top[name] = _TensorRef(_StorageRef(str(i), storage_name, numel), shape)
    records.append((name, value, shape, np.dtype(_STORAGE_DTYPES[storage_name])))

  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(top)

  with atomic_write(path) as f, _AlignedZipWriter(f) as zw:
    zw.write_bytes(f"{archive}/data.pkl", buf.getvalue())
    zw.write_bytes(f"{archive}/.format_version", b"1")
    zw.write_bytes(f"{archive}/.storage_alignment", str(_AlignedZipWriter.ALIGN).encode())
    zw.write_bytes(f"{archive}/byteorder", sys.byteorder.encode())
    for i, (name, value, shape, dtype) in enumerate(records):
      arr = np.asarray(value)
      if arr.shape != shape:
        raise ValueError(f"{path}: tensor {name!r} materialised with shape {arr.shape}, announced {shape}")
      if arr.dtype != dtype:
        if arr.dtype.newbyteorder("=") != dtype:
          raise ValueError(f"{path}: tensor {name!r} materialised as {arr.dtype}, announced {dtype}")
        arr = arr.astype(dtype)  # Non-native byte order -> native.
      zw.write(f"{archive}/data/{i}", _array_chunks(arr), arr.nbytes)
      del arr
    zw.write_bytes(f"{archive}/version", b"3\n")
    zw.write_bytes(f"{archive}/.data/serialization_id", secrets.token_hex(20).encode())
