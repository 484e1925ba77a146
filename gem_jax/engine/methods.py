"""GEM and its training-free siblings as one table: what each does to the last blocks.

Every method here changes only the last ``blocks`` blocks of CLIP's image tower, in
the same way: a second path starts from the tokens entering the first modified
block; in each modified block it adds (or, without ``residual``, becomes) the output
projection of ``attention(q, k, v)``, where q, k, v are the block's own projections
of ``ln_1`` of the *original* path's tokens, then optionally runs the block's MLP.
The original blocks keep running beside it. With one modified block this is exactly
"replace the last block". The tower loop that runs a :class:`Method` is
:func:`gem_jax.engine.tower.run_paths`.

The built-in methods (official defaults; ``s = head_dim ** -0.5``; residual / MLP on
the path; pos-embed resampling at other sizes):

- ``clip``: no block changed; bicubic_aa.
- ``gem``: last 6; GEM's normalised q-q, k-k, v-v ensemble (paper eqs. 5-7); yes / no;
  bicubic_aa.
- ``maskclip``: last 1; ``v``, each token its own value; yes / yes; bicubic.
- ``clipsurgery``: last 6; ``softmax(v vᵀ s) v``, then the original path's class token;
  yes / no; bilinear.
- ``sclip``: last 1; ``(softmax(q qᵀ s) + softmax(k kᵀ s)) v``; yes / yes; bicubic_scale.
- ``clearclip``: last 1; ``softmax(q qᵀ s) v``; no / no; bicubic_scale.
- ``naclip``: last 1; ``softmax(k kᵀ s + Ω) v``, Ω Gaussian over grid distances
  (σ = 5); no / no; bicubic_scale.

A method defined elsewhere joins them with :func:`register_method` (or through the
``gem_jax.methods`` entry-point group) and then works everywhere a name is taken.
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
import warnings
from typing import Any, Literal

from gem_jax.engine import gem as gem_maths
from gem_jax.engine.attention import Attention, GEMAttention, SelfSelf, ValueOnly, describe
from gem_jax.models.layers import POSEMB_METHODS

#: The entry-point group a package names its methods in (each entry: a :class:`Method`,
#: or a callable returning one).
ENTRY_POINT_GROUP = "gem_jax.methods"
#: Options that belong to the method rather than to its attention.
METHOD_OPTIONS = ("layers", "residual", "mlp")


class OptionError(ValueError):
    """An option the method does not have, or a value it does not take."""


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method does to the last ``blocks`` blocks of the image tower (see the module doc).

    Attributes:
      name: the method's name.
      attention: the per-head mixing of values (``None`` with ``blocks == 0``);
        :mod:`gem_jax.engine.attention` has the built-in kinds.
      blocks: how many last blocks carry the second path (0: the plain tower).
      residual: add the attention output to the path's tokens (else it replaces them).
      mlp: then apply the block's MLP (with its residual) on the path.
      class_token: ``"original"`` puts the original path's class token on the path's
        output (CLIP Surgery); ``"own"`` keeps the path's.
      posemb: how the positional embedding is resampled at other sizes
        (:data:`gem_jax.models.layers.POSEMB_METHODS`).
      options: the names a user may set (:meth:`configure`): ``"layers"`` (the number
        of blocks), ``"residual"``, ``"mlp"`` and fields of the attention.
      summary: one line for tables and help texts.
    """

    name: str
    attention: Attention | None
    blocks: int = 1
    residual: bool = True
    mlp: bool = True
    class_token: Literal["own", "original"] = "own"
    posemb: str = "bicubic_aa"
    options: tuple[str, ...] = ()
    summary: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not self.name.replace("-", "_").isidentifier():
            raise ValueError(f"a method name must be a word (letters, digits, _ or -), got {self.name!r}")
        if not isinstance(self.blocks, int) or isinstance(self.blocks, bool) or self.blocks < 0:
            raise ValueError(f"{self.name}: layers must be an int >= 0, got {self.blocks!r}")
        if (self.blocks == 0) != (self.attention is None):
            raise ValueError(f"{self.name}: an attention is needed exactly when blocks > 0")
        if self.class_token not in ("own", "original"):
            raise ValueError(f"{self.name}: class_token must be 'own' or 'original', got {self.class_token!r}")
        if self.posemb not in POSEMB_METHODS:
            raise ValueError(f"{self.name}: posemb must be one of {POSEMB_METHODS}, got {self.posemb!r}")
        object.__setattr__(self, "options", tuple(self.options))
        own = set(METHOD_OPTIONS) | set(_attention_fields(self.attention))
        unknown = [o for o in self.options if o not in own]
        if unknown:
            raise ValueError(f"{self.name}: options {unknown} are neither {', '.join(METHOD_OPTIONS)} nor fields of "
                             f"its attention")

    def configure(self, **values) -> "Method":
        """A copy with options set by name; ``None`` means "not given" (the method's own value).

        ``layers`` sets ``blocks``; ``residual`` and ``mlp`` the method's switches; any other
        name a field of the attention. Raises :class:`OptionError` for an option the method
        does not have (naming the ones it has) or a value it does not take.
        """
        given = {k: v for k, v in values.items() if v is not None}
        foreign = [k for k in given if k not in self.options]
        if foreign:
            has = f"its options are {', '.join(self.options)}" if self.options else "it has no options"
            which = ", ".join(foreign)
            raise OptionError(f"method {self.name} has no option {which} ({has})")
        if not given:
            return self
        changes: dict[str, Any] = {}
        if "layers" in given:
            layers = given.pop("layers")
            if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
                raise OptionError(f"layers must be a positive int, got {layers!r}")
            changes["blocks"] = layers
        for name in ("residual", "mlp"):
            if name in given:
                changes[name] = bool(given.pop(name))
        try:
            if given:
                changes["attention"] = dataclasses.replace(self.attention, **given)
            return dataclasses.replace(self, **changes)
        except (TypeError, ValueError) as e:
            raise OptionError(str(e)) from None

    def describe(self) -> dict:
        """What the method computes, as JSON values: the one description result files,
        export metadata, batch manifests and evaluation fingerprints record."""
        out: dict[str, Any] = {"name": self.name, "layers": self.blocks}
        if self.blocks:
            out.update(residual=self.residual, mlp=self.mlp, class_token=self.class_token)
            out["attention"] = describe(self.attention)
        out["posemb"] = self.posemb
        return out

    def option_values(self) -> dict:
        """The current value of every option the method has (what a user can change)."""
        out = {}
        for name in self.options:
            if name == "layers":
                out[name] = self.blocks
            elif name in ("residual", "mlp"):
                out[name] = getattr(self, name)
            else:
                value = getattr(self.attention, name)
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _attention_fields(attention) -> tuple[str, ...]:
    if attention is not None and dataclasses.is_dataclass(attention):
        return tuple(f.name for f in dataclasses.fields(attention))
    return ()


_GEM_OPTIONS = ("layers", "mlp", "iterations", "temperature", "projections", "normalize")
_ONE_BLOCK_OPTIONS = ("residual", "mlp")

_BUILTIN = (
    Method("gem", GEMAttention(), blocks=6, residual=True, mlp=False, options=_GEM_OPTIONS,
           summary="GEM: normalised q-q, k-k, v-v self-self attention ensemble, adaptive temperature"),
    Method("clip", None, blocks=0, summary="plain CLIP patch tokens"),
    Method("maskclip", ValueOnly(), blocks=1, residual=True, mlp=True, posemb="bicubic",
           options=_ONE_BLOCK_OPTIONS, summary="MaskCLIP: each token its own value in the last block"),
    Method("clipsurgery", SelfSelf(("v",)), blocks=6, residual=True, mlp=False, class_token="original",
           posemb="bilinear", options=("layers",), summary="CLIP Surgery: a v-v path beside the last blocks"),
    Method("sclip", SelfSelf(("q", "k")), blocks=1, residual=True, mlp=True, posemb="bicubic_scale",
           options=_ONE_BLOCK_OPTIONS, summary="SCLIP: q-q plus k-k attention in the last block"),
    Method("clearclip", SelfSelf(("q",)), blocks=1, residual=False, mlp=False, posemb="bicubic_scale",
           options=_ONE_BLOCK_OPTIONS, summary="ClearCLIP: q-q attention, no residual, no MLP"),
    Method("naclip", SelfSelf(("k",), sigma=5.0), blocks=1, residual=False, mlp=False, posemb="bicubic_scale",
           options=(*_ONE_BLOCK_OPTIONS, "sigma"),
           summary="NACLIP: k-k attention with a Gaussian neighbourhood, no residual, no MLP"),
)

_registry: dict[str, Method] = {m.name: m for m in _BUILTIN}
_lock = threading.Lock()
_entry_points_loaded = False


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Makes ``method`` available by its name everywhere a method is chosen: ``GEM(method=...)``,
    ``gem-jax segment --method``, batch, export, bench (FLOPs from its attention), the memory
    estimate and the demo. A name already taken is refused unless ``replace``; the built-in
    methods cannot be replaced. Returns ``method``."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a gem_jax.Method, got {type(method).__name__}")
    with _lock:
        if method.name in _registry and _registry[method.name] is not method:
            if method.name in {m.name for m in _BUILTIN}:
                raise ValueError(f"method {method.name!r} is built in and cannot be replaced")
            if not replace:
                raise ValueError(f"a method called {method.name!r} is registered already (replace=True to "
                                 "replace it)")
        _registry[method.name] = method
    return method


def _load_entry_points() -> None:
    """Registers the methods other packages declare in the ``gem_jax.methods`` group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            method = obj() if callable(obj) and not isinstance(obj, Method) else obj
            if method.name != ep.name:
                raise ValueError(f"the entry point is called {ep.name!r} but its method {method.name!r}")
            register_method(method)
        except Exception as e:  # a broken plug-in must not take the built-in methods down with it
            warnings.warn(f"gem-jax: method entry point {ep.name!r} ({ep.value}) could not be loaded: "
                          f"{type(e).__name__}: {e}", stacklevel=2)


def method_names() -> tuple[str, ...]:
    """Every method's name: the built-in ones first, then registered ones."""
    _load_entry_points()
    return tuple(_registry)


def builtin_names() -> tuple[str, ...]:
    """The names of the methods gem-jax ships."""
    return tuple(m.name for m in _BUILTIN)


def get_method(name: str, **options) -> Method:
    """The method called ``name`` with its official defaults, changed where ``options`` say
    (:meth:`Method.configure`; ``None`` values are ignored).

    Raises:
      ValueError: an unknown name; :class:`OptionError` for an option the method does not
        have or a value it does not take.
    """
    if isinstance(name, Method):
        return name.configure(**options)
    names = method_names()
    if name not in _registry:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose one of {', '.join(names)}")
    return _registry[name].configure(**options)


@dataclasses.dataclass(frozen=True)
class GEMOptions:
    """GEM's settings in one value (defaults are the paper's and the reference's): a short
    way to write ``get_method("gem", ...)``. :func:`as_method` turns it into the method.

    Attributes:
      layers: number of last ViT blocks with the parallel path (the reference's
        ``gem_depth`` is ``layers + 1``).
      iterations, temperature, projections, normalize: :class:`~gem_jax.engine.attention.GEMAttention`'s.
      mlp: also apply each block's MLP on the GEM path (Table 6's "with MLP" variant).
    """

    layers: int = 6
    iterations: int = 1
    temperature: float | None = None
    projections: tuple[str, ...] = gem_maths.PROJECTIONS
    normalize: bool = True
    mlp: bool = False

    def __post_init__(self):
        object.__setattr__(self, "projections", tuple(self.projections))
        method = self.method()  # validates
        object.__setattr__(self, "projections", method.attention.projections)

    def method(self) -> Method:
        """The GEM :class:`Method` with these settings."""
        if not isinstance(self.layers, int) or isinstance(self.layers, bool) or self.layers < 1:
            raise ValueError(f"layers must be a positive int, got {self.layers!r}")
        attention = GEMAttention(self.iterations, self.temperature, self.projections, self.normalize)
        return dataclasses.replace(_registry["gem"], attention=attention, blocks=self.layers, mlp=bool(self.mlp))


def as_method(spec: "Method | GEMOptions | str | None") -> Method:
    """A :class:`Method` from a method, a registered name, GEM options (the GEM method with
    them) or ``None`` (plain CLIP)."""
    if spec is None:
        return _registry["clip"]
    if isinstance(spec, GEMOptions):
        return spec.method()
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, str):
        return get_method(spec)
    raise TypeError(f"expected a Method, a method name, GEMOptions or None, got {type(spec).__name__}")
