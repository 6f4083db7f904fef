"""CMA-ES (pycma) as a test-time search: a random stream of its own, and a state
that goes into a checkpoint and comes back without running code.

FOA searches its prompts with pycma's ``CMAEvolutionStrategy``, one generation per
test batch. Two things pycma does not give a TTA method: (1) it draws from NumPy's
*global* RandomState, so anything else that uses NumPy's RNG would change the search
(and the search the user's draws); (2) its state is a Python object graph, whose
pickle would run any code a tampered checkpoint names. :class:`CMASearch` swaps its
own random state in and out around every call, and pickles to bytes that load only
through an allow-list of what a CMA-ES state holds.
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import numpy as np

__all__ = ["CMASearch"]


class _GlobalRandomState(pickle.Pickler):
    """Pickles CMA-ES with NumPy's global RandomState (whose ``randn`` pycma samples
    with) as a reference, not a copy, so a restored object draws from it again."""

    def persistent_id(self, obj: Any) -> str | None:
        return "numpy.random.global" if obj is np.random.mtrand._rand else None


def _restricted_getattr(obj: Any, name: str) -> Any:
    """The one ``getattr`` a CMA-ES pickle makes: the bound sampler of NumPy's
    RandomState (``randn``). Anything else could reach ``os`` from a function's
    globals, so it is refused."""
    if isinstance(obj, np.random.RandomState) and name in ("randn", "rand", "standard_normal", "random_sample"):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"FOA state: getattr({type(obj).__name__}, {name!r}) is not allowed")


_ALLOWED_GLOBALS: set[tuple[str, str]] | None = None
#: Builtin types a CMA-ES state may hold (they build plain values, nothing more).
_PLAIN_BUILTINS = ("range", "slice", "complex", "set", "frozenset", "bytearray", "bytes", "float", "int", "bool",
                   "list", "dict", "tuple", "str")


def _allowed_globals() -> set[tuple[str, str]]:
    """The globals a CMA-ES pickle of this pycma/NumPy version names, read from the
    pickle of a small search run here once: only they may be loaded from a state."""
    global _ALLOWED_GLOBALS
    if _ALLOWED_GLOBALS is None:
        import cma

        seen: set[tuple[str, str]] = set()

        class Recorder(_Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                seen.add((module, name))
                return pickle.Unpickler.find_class(self, module, name)

        outside = np.random.get_state()
        try:
            # a small and a large search: pycma picks some parts by dimension
            for dim in (4, 600):
                es = cma.CMAEvolutionStrategy(np.zeros(dim), 1.0, {"seed": 1, "maxiter": -1, "verbose": -1,
                                                                   "popsize": 6})
                for _ in range(2):
                    xs = es.ask()
                    es.tell(xs, [float(x @ x) for x in xs])
                buf = io.BytesIO()
                _GlobalRandomState(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(
                    (es, np.random.get_state(), np.zeros(4)))
                Recorder(io.BytesIO(buf.getvalue())).load()
        finally:
            np.random.set_state(outside)
        _ALLOWED_GLOBALS = seen | {("builtins", name) for name in _PLAIN_BUILTINS}
    return _ALLOWED_GLOBALS


class _Unpickler(pickle.Unpickler):
    """Unpickles a CMA-ES state: NumPy's global RandomState by reference, and no
    global beyond those a CMA-ES pickle names (pycma's classes, NumPy's array and
    random-state constructors), ``getattr`` only for the RandomState's sampler. A
    checkpoint is data: a pickle naming ``os.system`` or reaching for a function's
    globals is refused, as ``torch.load(weights_only=True)`` refuses it."""

    def persistent_load(self, pid: Any) -> Any:
        if pid == "numpy.random.global":
            return np.random.mtrand._rand
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _restricted_getattr
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return super().find_class(module, name)
        # pycma picks some strategy classes by dimension (e.g. TPA step-size
        # adaptation above a few hundred dimensions), so the classes of the modules
        # the small run named are allowed too; never their functions (pycma has
        # file-copying ones): a class can only be built from other allowed objects.
        if module.startswith("cma.") and module in {m for m, _ in allowed} and "." not in name:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        raise pickle.UnpicklingError(
            f"FOA state: {module}.{name} is not part of a CMA-ES state; refusing to load it "
            "(the checkpoint was not written by tta's FOA, or by another pycma version)")


class CMASearch:
    """pycma's ``CMAEvolutionStrategy`` with a random stream of its own.

    pycma draws from NumPy's *global* RandomState (seeded by its ``seed`` option,
    and read by a few other calls besides its sampler). Each call here swaps in this
    object's state and back out, so the search is the official one (a global state
    seeded 2020 that only CMA-ES reads) whatever else uses NumPy's RNG, and the
    user's RNG is left as it was."""

    def __init__(self, dim: int, popsize: int | None, sigma0: float, seed: int) -> None:
        import cma

        opts = {"seed": seed, "maxiter": -1, "verbose": -1}
        if popsize is not None:
            opts["popsize"] = popsize
        self.rng: Any = None
        self.es = self._call(lambda: cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, opts))
        self.told = False

    def __deepcopy__(self, memo: dict) -> "CMASearch":
        # pycma samples with a bound method of NumPy's global RandomState, whose
        # state this class swaps in and out: a copy must draw from the global one
        # too, not from a copy of it
        memo[id(np.random.mtrand._rand)] = np.random.mtrand._rand
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def _call(self, fn):
        outside = np.random.get_state()
        try:
            if self.rng is not None:
                np.random.set_state(self.rng)
            result = fn()
            self.rng = np.random.get_state()  # committed only when fn returned
            return result
        finally:
            np.random.set_state(outside)

    def ask(self) -> tuple[list[np.ndarray], Any]:
        """The next population and the random state after drawing it (committed by
        :meth:`tell`, so a step that fails in between asks the same again)."""
        before = self.rng
        solutions = self._call(self.es.ask)
        after, self.rng = self.rng, before
        return solutions, after

    def tell(self, solutions: list[np.ndarray], fitness: list[float], rng_after_ask: Any) -> None:
        self.rng = rng_after_ask
        self._call(lambda: self.es.tell(solutions, fitness))
        self.told = True

    def to_bytes(self, best: np.ndarray) -> bytes:
        buf = io.BytesIO()
        _GlobalRandomState(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((self.es, self.rng, best))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple["CMASearch", np.ndarray]:
        new = cls.__new__(cls)
        new.es, new.rng, best = _Unpickler(io.BytesIO(data)).load()
        new.told = True
        return new, best
