"""The one unpickler that reads pickled PyTorch files: a file can name only the Python objects listed here.

A pickle rebuilds objects by naming "globals" (module + name) that the unpickler imports and then calls, so an
unrestricted unpickler runs whatever a file names (``builtins.exec``, ``os.system``). Here ``find_class``
answers only the names in :func:`allowed_globals`, each mapped to the object it stands for; any other name
raises :class:`RefusedGlobal` before anything is imported, built or called. This module is itself the
``pickle_module`` that ``torch_io`` hands to ``torch.load``: its ``Unpickler``, ``load`` and ``loads`` are the
only ones torch then uses, for the zip format's ``data.pkl`` and for every pickle of the legacy format (its
magic-number / protocol / sys-info header, the body and the storage keys) alike.

What the allow-list holds, and why (everything DINOv2 hub, timm, Hugging Face, NeCo and Lightning files hold):

- torch's tensor machinery: ``torch.Tensor``, ``Parameter``, the ``torch._utils._rebuild_*`` helpers that
  ``torch.save`` pickles tensors and parameters with, ``torch.Size``, ``torch.device``, the dtypes. Storage
  types (``torch.FloatStorage``...) never reach this check: torch's own ``find_class`` wrapper
  (``torch/serialization.py``) turns every name with "Storage" in it into its inert ``StorageType`` first.
- Plain containers that pickle names: ``collections.OrderedDict`` (every state dict), ``set``, ``frozenset``,
  ``bytearray``, ``bytes``, and ``_codecs.encode`` as protocols 0-2 use it for bytes (latin-1 only).
- Stand-ins, never imported: the hyper-parameter containers of Lightning (``AttributeDict``), argparse
  (``Namespace``, in DINO's and timm's training checkpoints) and sacred (``ReadOnlyDict`` / ``ReadOnlyList``,
  in NeCo's own Lightning checkpoints) are rebuilt as plain dicts and lists; NumPy scalars, dtypes and arrays
  (under NumPy 1's and 2's module names) as :class:`NumpyValue`, which keeps nothing. Real NumPy objects are
  not built: NumPy makes them from the file's raw bytes and a dtype the file describes, and with an object
  dtype those bytes become pointers (``np.ndarray((1,), object, buffer=...)`` crashes the interpreter).
  neco_jax reads none of these values.

Anything else (a pickled module, ``functools.partial``, ``pathlib`` paths, omegaconf configs, an enum) is
refused: neco_jax reads tensors only, and an object it does not know cannot be built without running its
class's code. The functions on the list are handed out wrapped, fresh for each name a pickle reads: a pickle
can BUILD on whatever it names (setting ``__defaults__``, say), and that must not change torch's function for
the files read after it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import pickle
import types


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that is not on the allow-list; ``name`` is its ``module.name``."""

    def __init__(self, name: str):
        super().__init__(f"the pickle names {name}, which is not on the allow-list")
        self.name = name


class _Attributes(dict):
    """Stand-in for a dict-like hyper-parameter container (Lightning's AttributeDict, argparse's Namespace,
    sacred's ReadOnlyDict): a plain dict; attributes the pickle restores (a Namespace's) become its items."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


class NumpyValue:
    """Stand-in for a NumPy scalar, dtype or array: built from anything, keeps nothing (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Items(list):
    """Stand-in for sacred's ReadOnlyList: a plain list; attributes the pickle restores are dropped."""

    def __setstate__(self, state):
        pass


def _latin1_bytes(text, encoding):
    """``_codecs.encode`` as Python's pickler uses it for bytes at protocols 0-2 (``encode(s, "latin1")``)."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


@functools.cache
def allowed_globals() -> dict[str, object]:
    """``"module.name"`` -> the object that name stands for, for every global a weight file may name."""
    import torch  # only pickled PyTorch files come here, and reading them needs torch anyway

    allowed: dict[str, object] = {f"torch.{name}": v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
    allowed |= {
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": torch._utils._rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.bytes": bytes,
        "_codecs.encode": _latin1_bytes,
        "numpy.dtype": NumpyValue,
        "numpy.ndarray": NumpyValue,
        "pytorch_lightning.utilities.parsing.AttributeDict": _Attributes,
        "lightning_fabric.utilities.data.AttributeDict": _Attributes,
        "lightning.fabric.utilities.data.AttributeDict": _Attributes,
        "argparse.Namespace": _Attributes,
        "sacred.config.custom_containers.ReadOnlyDict": _Attributes,
        "sacred.config.custom_containers.ReadOnlyList": _Items,
    }
    for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # NumPy 1 and NumPy 2
        allowed |= {f"{numpy_core}._reconstruct": NumpyValue, f"{numpy_core}.scalar": NumpyValue}
    return allowed


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global that a protocol 0-2 pickle may spell the Python 2 way (``__builtin__.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class Unpickler(pickle.Unpickler):
    """pickle's Unpickler, building only the globals of :func:`allowed_globals` (nothing is imported)."""

    def find_class(self, module, name):
        module, name = _python3_name(module, name)
        try:
            found = allowed_globals()[f"{module}.{name}"]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None
        return functools.partial(found) if isinstance(found, types.FunctionType) else found


def load(file, **kwargs):
    """``pickle.load`` through :class:`Unpickler` (what torch calls for the legacy format's header)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs):
    """``pickle.loads`` through :class:`Unpickler`."""
    return load(io.BytesIO(data), **kwargs)
