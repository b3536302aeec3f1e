"""Expert weights packed once into the CPU micro-kernels' layout (optionally int8), for ``moe_experts``.

``moe_experts`` on plain weight tensors reads them as they are (the Hugging Face / nn.Linear layout), which at the
16-64 rows per expert of a many-expert prefill costs the GEMMs a repacking of every weight panel per call. Packed
weights are laid out once in the order the micro-kernel streams them, and int8 ones read a quarter of float32's
bytes at decode, where reading the weights is the whole cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from netmerge_fast import _checks, reference
from netmerge_fast._backends import cpu_isa, direct_entry, native_status, resolve

__all__ = ["QUANTIZATIONS", "PackCache", "PackedExperts", "pack_experts"]

QUANTIZATIONS = ("int8",)
_PACKABLE = (torch.float32, torch.bfloat16, torch.float16)
_INT8_MAX = 127


@dataclass(frozen=True, eq=False)
class PackedExperts:
    """E expert MLPs' weights in the CPU micro-kernels' layout; made by ``pack_experts``, read by ``moe_experts``.

    Attributes:
        num_experts, hidden_size, intermediate_size, gated: E, H, I, and whether the first projection holds gate
            and up rows.
        dtype: the dtype of the hidden states it serves (``moe_experts`` checks it).
        quantize: ``None`` or ``"int8"``; group_size: int8 scale groups along the input dimension (``None``: one
            scale per output channel).
        panel: columns per panel (16 on AVX2 machines, 32 with AVX-512).
        gate_up, down, gate_up_scales, down_scales: the packed tensors (layout in csrc/cpu/moe_experts_packed.cpp;
            float16 is packed as float32 panels, bfloat16 as pairs along the input dimension).

    ``nbytes`` is what it holds in memory; ``unpack()`` gives back ``(w_gate_up [E, 2I|I, H], w_down [E, H, I])``
    (exactly for float, the dequantised float32 weights for int8).
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scales: torch.Tensor | None
    down_scales: torch.Tensor | None
    num_experts: int
    hidden_size: int
    intermediate_size: int
    gated: bool
    dtype: torch.dtype
    quantize: str | None
    group_size: int | None
    panel: int

    @property
    def nbytes(self) -> int:
        tensors = (self.gate_up, self.down, self.gate_up_scales, self.down_scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def device(self) -> torch.device:
        return self.gate_up.device

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_gate_up, w_down)`` in ``moe_experts``' layout: the packed weights for float, dequantised float32
        for int8."""
        E, H, inter = self.num_experts, self.hidden_size, self.intermediate_size
        gate_up = _from_panels(self.gate_up, self.gate_up_scales, self.group_size)  # [E, P1, NR, K1]
        down = _from_panels(self.down, self.down_scales, self.group_size)  # [E, P2, NR, Ip]
        units = self.panel // 2 if self.gated else self.panel
        if self.gated:
            halves = gate_up.unflatten(2, (2, units)).transpose(1, 2).reshape(E, 2, -1, gate_up.shape[-1])
            w_gate_up = halves[:, :, :inter, :H].reshape(E, 2 * inter, H)
        else:
            w_gate_up = gate_up.reshape(E, -1, gate_up.shape[-1])[:, :inter, :H]
        w_down = down.reshape(E, -1, down.shape[-1])[:, :H, :inter]
        out_dtype = torch.float32 if self.quantize else self.dtype
        return w_gate_up.to(out_dtype).contiguous(), w_down.to(out_dtype).contiguous()

    def __repr__(self) -> str:
        quant = f", quantize={self.quantize!r}, group_size={self.group_size}" if self.quantize else ""
        return (
            f"PackedExperts(num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, gated={self.gated}, dtype={self.dtype}{quant}, "
            f"panel={self.panel}, nbytes={self.nbytes})"
        )


def default_panel() -> int:
    """Columns per panel for this machine: two vectors of the CPU kernels' instruction set."""
    return 32 if cpu_isa().startswith("avx512") else 16


@torch.no_grad()
def pack_experts(
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    quantize: str | None = None,
    group_size: int | None = None,
    transposed: bool = False,
    gate_up_interleaved: bool = False,
) -> PackedExperts:
    """Pack E experts' weights once for ``moe_experts(hidden, packed, None, topk_weights, topk_ids, ...)``.

    Args:
        w_gate_up: ``[E, 2I, H]`` (gate rows then up rows) or ``[E, I, H]`` (not gated), any strides: the layout
            of ``moe_experts``. ``transposed=True``: ``[E, H, 2I]`` and w_down ``[E, I, H]``;
            ``gate_up_interleaved=True``: gate and up alternate along 2I (GPT-OSS stores both).
        w_down: ``[E, H, I]``.
        dtype: the dtype of the hidden states the packed weights will serve (float32, bfloat16 or float16); by
            default the weights' own.
        quantize: ``None`` or ``"int8"``: symmetric int8 weights with float32 scales per output channel (or per
            ``group_size`` inputs of each output channel), dequantised in the micro-kernel; activations stay in
            ``dtype`` (weight-only).
        group_size: int8 only: inputs per scale, ``None`` for one scale per output channel.

    Returns:
        A ``PackedExperts``. Packing reads any strides and copies once: float packs hold as many bytes as the
        weights (plus padding of I and H to the panel width), int8 a quarter of float32 plus one float32 scale
        per output channel and group. The weights it came from are not referenced: free them if nothing else
        needs them.

    Raises ``TypeError`` for non-float weights or an unsupported ``dtype``, ``ValueError`` for shapes that do not
    fit together, an unknown ``quantize``, or a ``group_size`` without int8 or below 1.

    Example::

        packed = pack_experts(w_gate_up, w_down)                    # once, at load
        out = moe_experts(hidden, packed, None, weights, ids)       # every call
        int8 = pack_experts(w_gate_up, w_down, quantize="int8")     # half the bytes of bfloat16
    """
    _checks.tensor("w_gate_up", w_gate_up, dim=3, floating=True)
    _checks.tensor("w_down", w_down, dim=3, floating=True)
    _checks.boolean("transposed", transposed)
    _checks.boolean("gate_up_interleaved", gate_up_interleaved)
    _checks.same_device("w_down", w_down, "w_gate_up", w_gate_up)
    if transposed:
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    E, H, inter = w_down.shape
    if E == 0 or H == 0 or inter == 0:
        raise ValueError(f"w_down must be [E, H, I] with E, H, I >= 1, got {list(w_down.shape)}")
    if w_gate_up.shape[0] != E or w_gate_up.shape[2] != H or w_gate_up.shape[1] not in (inter, 2 * inter):
        raise ValueError(
            f"w_gate_up must be [E={E}, 2I={2 * inter} (or I={inter} if not gated), H={H}] to match w_down "
            f"{list(w_down.shape)}, got {list(w_gate_up.shape)}" + (" (after transposing)" if transposed else "")
        )
    gated = w_gate_up.shape[1] == 2 * inter
    if gate_up_interleaved:
        if not gated:
            raise ValueError("gate_up_interleaved=True needs gate and up rows (w_gate_up [E, 2I, H])")
        w_gate_up = torch.cat([w_gate_up[:, 0::2], w_gate_up[:, 1::2]], dim=1)
    dtype = w_gate_up.dtype if dtype is None else dtype
    if dtype not in _PACKABLE:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if quantize is not None:
        _checks.choice("quantize", quantize, QUANTIZATIONS)
    if group_size is not None:
        if quantize is None:
            raise ValueError("group_size needs quantize='int8'")
        _checks.integer("group_size", group_size, low=1)
    panel = default_panel()
    units = panel // 2 if gated else panel
    padded_inter = -(-inter // units) * units

    if gated:
        halves = [_pad(part, padded_inter, H) for part in (w_gate_up[:, :inter], w_gate_up[:, inter:])]
        # [E, P1, NR, H]: per panel, `units` gate rows then the same units' up rows.
        first = torch.cat([h.unflatten(1, (-1, units)) for h in halves], dim=2)
    else:
        first = _pad(w_gate_up, padded_inter, H).unflatten(1, (-1, panel))
    second = _pad(w_down, -(-H // panel) * panel, padded_inter).unflatten(1, (-1, panel))  # [E, P2, NR, Ip]
    if quantize is None:
        storage = torch.float32 if dtype == torch.float16 else dtype
        (gate_up, gate_up_scales), (down, down_scales) = _to_panels(first, storage), _to_panels(second, storage)
    else:
        gate_up, gate_up_scales = _quantized_panels(first, group_size)
        down, down_scales = _quantized_panels(second, group_size)
    return PackedExperts(
        gate_up, down, gate_up_scales, down_scales, E, H, inter, gated, dtype, quantize, group_size, panel
    )


class PackCache:
    """The packed copy of a module's two expert weight tensors, made on first use and again whenever either
    changes: its storage, its version counter (bumped by every in-place write: optimizer steps,
    ``load_state_dict``'s ``copy_``), its layout or dtype, or the machine's panel width. Frozen (the weights were
    released, see ``release_weights``) it only hands out its copy."""

    def __init__(self) -> None:
        self.packed: PackedExperts | None = None
        self._key: tuple | None = None
        self.frozen = False

    @staticmethod
    def _key_of(w_gate_up, w_down, quantize, group_size, transposed, gate_up_interleaved) -> tuple:
        options = (quantize, group_size, transposed, gate_up_interleaved, default_panel())
        return (*options, *map(_identity, (w_gate_up, w_down)))

    def get(
        self, w_gate_up: torch.Tensor, w_down: torch.Tensor, *, quantize: str | None = None,
        group_size: int | None = None, transposed: bool = False, gate_up_interleaved: bool = False,
    ) -> PackedExperts:  # fmt: skip
        if self.frozen and torch.compiler.is_compiling():
            return self.packed  # a trace takes the fixed copy (the host-side identity checks do not trace)
        key = self._key_of(w_gate_up, w_down, quantize, group_size, transposed, gate_up_interleaved)
        if self.frozen:
            if key != self._key:
                raise RuntimeError(
                    "the expert weights were released after packing (release_weights): they cannot be converted, "
                    "moved or packed another way (dtype, device, quantisation, instruction set); restore them first "
                    "(restore_weights(), or hf.disable(model))"
                )
            return self.packed
        if self.packed is None or key != self._key:
            self.clear()  # frees the stale copy before the new one is made
            self.packed = pack_experts(
                w_gate_up, w_down, quantize=quantize, group_size=group_size, transposed=transposed,
                gate_up_interleaved=gate_up_interleaved,
            )  # fmt: skip
            self._key = key
        return self.packed

    def freeze(self, w_gate_up, w_down, *, quantize=None, group_size=None, transposed=False, gate_up_interleaved=False):
        """Keep the current copy for these (placeholder) weights and these options only."""
        key = self._key_of(w_gate_up, w_down, quantize, group_size, transposed, gate_up_interleaved)
        self._key, self.frozen = key, True

    def clear(self) -> None:
        self.packed = self._key = None
        self.frozen = False

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes if self.packed is not None else 0


# --- releasing the original weights after packing ------------------------------------------------------------------

_RELEASED = "_netmerge_released"


@dataclass
class _Release:
    """What a module whose expert weights were released needs to give them back."""

    names: tuple[str, str]
    cache: PackCache
    options: dict  # quantize, group_size, transposed, gate_up_interleaved
    requires_grad: tuple[bool, bool]


def release_weights(
    module: torch.nn.Module, cache: PackCache, names: tuple[str, str] = ("gate_up_proj", "down_proj"), *,
    quantize: str | None = None, group_size: int | None = None, transposed: bool = False,
    gate_up_interleaved: bool = False,
) -> PackedExperts:  # fmt: skip
    """Pack the module's two expert weight parameters into ``cache`` and free them (inference on CPU only).

    The parameters are replaced by ``meta`` placeholders of the same shape and dtype (``requires_grad=False``), so
    the memory of the weights is returned once nothing else holds them (an optimizer, a tied module, the caller).
    ``state_dict()`` gives the weights back from the pack (exactly for float packs; int8: the dequantised
    weights), ``load_state_dict`` restores, loads, and releases again; ``restore_weights`` undoes this. Raises
    ``ValueError`` for weights that are not float32/bfloat16/float16 CPU tensors.
    """
    options = dict(
        quantize=quantize, group_size=group_size, transposed=transposed, gate_up_interleaved=gate_up_interleaved
    )
    record = module.__dict__.get(_RELEASED)
    if record is not None:
        if record.cache is cache and record.names == tuple(names) and record.options == options:
            return cache.packed  # released already, as asked: nothing to unpack and pack again
        restore_weights(module)
    weights = tuple(module._parameters[name] for name in names)
    for name, w in zip(names, weights, strict=True):
        if not packable(w):
            got = "None" if w is None else f"{w.dtype} on {w.device}"
            raise ValueError(
                f"release_weights needs the experts' {name} as a float32/bfloat16/float16 CPU tensor (the packed "
                f"CPU kernels serve only those), got {got}"
            )
    packed = cache.get(*weights, **options)
    placeholders = [torch.nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False) for w in weights]
    module._parameters.update(zip(names, placeholders, strict=True))
    cache.freeze(*placeholders, **options)
    if not module.__dict__.get("_netmerge_release_hooks"):
        # Registered once and left in place (they do nothing while the weights are not released): a hook removed
        # while load_state_dict runs the module's hooks would change the dict it iterates.
        module.register_state_dict_post_hook(_state_dict_of_released)
        module.register_load_state_dict_pre_hook(_restore_before_load)
        module.register_load_state_dict_post_hook(_release_after_load)
        module.__dict__["_netmerge_release_hooks"] = True
    requires_grad = tuple(w.requires_grad for w in weights)
    module.__dict__[_RELEASED] = _Release(names, cache, options, requires_grad)
    return packed


def packable(weight: torch.Tensor | None) -> bool:
    """Whether ``release_weights`` can pack this weight: a float32/bfloat16/float16 CPU tensor."""
    return weight is not None and weight.device.type == "cpu" and weight.dtype in _PACKABLE


def is_released(module: torch.nn.Module) -> bool:
    """Whether ``release_weights`` freed this module's expert weights (and ``restore_weights`` did not undo it)."""
    return _RELEASED in module.__dict__


def restore_weights(module: torch.nn.Module) -> _Release | None:
    """Give a released module its weight parameters back, from the pack (exactly for float packs; int8: the
    dequantised weights in the original dtype). Returns what ``release_weights`` recorded (None if the module was
    not released)."""
    record = module.__dict__.pop(_RELEASED, None)
    if record is None:
        return None
    tensors = _unpacked(module, record)
    for name, tensor, grad in zip(record.names, tensors, record.requires_grad, strict=True):
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=grad)
    record.cache.clear()
    return record


def _unpacked(module: torch.nn.Module, record: _Release) -> tuple[torch.Tensor, torch.Tensor]:
    """The released weights in the module's own layout and dtype, rebuilt from the pack."""
    w_gate_up, w_down = record.cache.packed.unpack()
    if record.options["gate_up_interleaved"]:
        inter = w_down.shape[2]
        w_gate_up = torch.stack([w_gate_up[:, :inter], w_gate_up[:, inter:]], dim=2).flatten(1, 2)
    if record.options["transposed"]:
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    dtypes = (module._parameters[name].dtype for name in record.names)
    return tuple(w.to(dtype).contiguous() for w, dtype in zip((w_gate_up, w_down), dtypes, strict=True))


def _state_dict_of_released(module, state_dict, prefix, local_metadata) -> None:
    record = module.__dict__.get(_RELEASED)
    if record is not None:
        for name, tensor in zip(record.names, _unpacked(module, record), strict=True):
            state_dict[prefix + name] = tensor


def _restore_before_load(module, state_dict, prefix, *_args) -> None:
    module.__dict__["_netmerge_release_after_load"] = restore_weights(module)


def _release_after_load(module, incompatible_keys) -> None:
    record = module.__dict__.pop("_netmerge_release_after_load", None)
    if record is not None:
        release_weights(module, record.cache, record.names, **record.options)


_MISSING = object()


def module_attribute(module: torch.nn.Module, name: str, default: object = _MISSING):
    """``getattr(module, name[, default])`` read from the module's own registries (instance attributes,
    parameters, buffers, submodules) without nn.Module.__getattr__'s fall-back: ~1-2 us a lookup on the machines
    measured, and ~5 us for a missing name with a default (the fall-back raises an AttributeError inside). A
    decode step reads four to seven per layer. A name in none of them (a property, another class attribute, or a
    missing name without a default) goes through getattr."""
    for registry in (module.__dict__, module._parameters, module._buffers, module._modules):
        value = registry.get(name, _MISSING)
        if value is not _MISSING:
            return value
    if default is not _MISSING and not hasattr(type(module), name):
        return default
    return getattr(module, name) if default is _MISSING else getattr(module, name, default)


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device)


def runs_packed(hidden: torch.Tensor, w_gate_up: torch.Tensor, backend: str, *needs_grad: torch.Tensor | None) -> bool:
    """Whether a float module call should take the packed path: a CPU call in a packable dtype that needs no
    gradient (``torch.no_grad()``, ``inference_mode``, or nothing that requires one), on the cpu backend. Not
    while torch.compile traces: the pack cache's identity checks are host-side, so a graph runs the weights as
    they are."""
    if torch.compiler.is_compiling():
        return False
    if hidden.device.type != "cpu" or backend not in ("auto", "cpu") or not native_status().available:
        return False
    if hidden.dtype != w_gate_up.dtype or hidden.dtype not in _PACKABLE:
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in needs_grad)


def _pad(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(w, (0, cols - w.shape[2], 0, rows - w.shape[1]))


def _to_panels(rows: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, None]:
    """[E, P, NR, K] output rows -> [E, P, K, NR] (bfloat16: [E, P, K/2, NR, 2], pairs along K), contiguous."""
    rows = rows.to(storage)
    if storage == torch.bfloat16:
        rows = F.pad(rows, (0, rows.shape[-1] % 2))
        return rows.unflatten(3, (-1, 2)).permute(0, 1, 3, 2, 4).contiguous(), None
    return rows.transpose(2, 3).contiguous(), None


def _quantized_panels(rows: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of [E, P, NR, K] rows, one scale per row and group of K: ([E, P, K, NR] int8,
    [E, P, G, NR] float32). An all-zero group gets scale 1 (its values are 0 either way)."""
    K = rows.shape[-1]
    group = group_size or K
    groups = -(-K // group)
    padded = F.pad(rows.float(), (0, groups * group - K)).unflatten(3, (groups, group))
    scales = padded.abs().amax(-1) / _INT8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # [E, P, NR, G]
    q = torch.round(padded / scales[..., None]).clamp_(-_INT8_MAX, _INT8_MAX).flatten(3)[..., :K]
    return q.to(torch.int8).transpose(2, 3).contiguous(), scales.transpose(2, 3).contiguous()


def _from_panels(panels: torch.Tensor, scales: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    """The inverse of _to_panels / _quantized_panels: [E, P, NR, K] (K padded as packed)."""
    if panels.dtype == torch.bfloat16:
        return panels.permute(0, 1, 3, 2, 4).flatten(3)
    rows = panels.transpose(2, 3).float() if scales is not None else panels.transpose(2, 3)
    if scales is None:
        return rows
    K = rows.shape[-1]
    group = group_size or K
    per_k = scales.transpose(2, 3).repeat_interleave(group, dim=-1)[..., :K]
    return rows * per_k


def run(
    hidden: torch.Tensor,
    packed: PackedExperts,
    w_down: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    apply_weights_on_input: bool,
    backend: str,
) -> torch.Tensor:
    """``moe_experts`` with a ``PackedExperts`` in place of the two weight tensors (inference only)."""
    from netmerge_fast import dispatch

    if w_down is not None:
        raise ValueError("with PackedExperts as w_gate_up, w_down must be None (the packed object holds both)")
    _checks.tensor("hidden", hidden, dim=2, floating=True)
    _checks.boolean("gated", gated)
    _checks.boolean("apply_weights_on_input", apply_weights_on_input)
    if gated != packed.gated:
        raise ValueError(f"gated={gated} does not match the packed experts (packed with gated={packed.gated})")
    if hidden.dtype != packed.dtype:
        raise TypeError(f"hidden must have the packed experts' dtype {packed.dtype}, got {hidden.dtype}")
    if hidden.shape[1] != packed.hidden_size:
        raise ValueError(
            f"hidden must be [T, H={packed.hidden_size}] for these packed experts, got {list(hidden.shape)}"
        )
    _checks.same_device("hidden", hidden, "the packed experts", packed.gate_up)
    # The activation, routing and bias checks of moe_experts (the packed weights' shapes are known).
    dispatch._validate_activation(activation, gated)
    inter = packed.intermediate_size
    width = 2 * inter if gated else inter
    # The native kernel checks the id range as it sorts the slots (the same ValueError), so only the torch
    # fall-back pays a scan of the ids here.
    native = resolve("moe_experts_packed", backend, hidden.device, hidden.dtype) != "torch"
    dispatch._validate_routing_and_biases(
        hidden, packed.num_experts, width, topk_weights, topk_ids, b_gate_up, b_down, check_values=not native
    )
    return run_validated(
        hidden, packed, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, apply_weights_on_input, backend
    )


def run_validated(
    hidden, packed, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, apply_weights_on_input, backend
):  # fmt: skip
    """``run`` after its checks (SparseMoE and integrations.hf check once what stays fixed)."""
    grads = (hidden, topk_weights, b_gate_up, b_down)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grads):
        what = "int8" if packed.quantize else "packed"
        raise NotImplementedError(
            f"moe_experts on {what} experts is inference only: no gradient flows through packed weights. Run it "
            "under torch.no_grad() (or inference_mode), or pass the weight tensors to train (a module whose weights "
            "were released: restore_weights() first)"
        )
    chosen = resolve("moe_experts_packed", backend, hidden.device, hidden.dtype)
    if chosen == "torch":
        w_gate_up, w_down = packed.unpack()
        return reference.moe_experts(
            hidden, w_gate_up, w_down, topk_weights, topk_ids, activation=activation, gated=gated,
            b_gate_up=b_gate_up, b_down=b_down, apply_weights_on_input=apply_weights_on_input,
        )  # fmt: skip
    tensors = (hidden, packed.gate_up, packed.down, packed.gate_up_scales, packed.down_scales)
    direct = direct_entry("moe_experts_packed", *tensors, topk_weights, topk_ids, b_gate_up, b_down)
    return (direct or torch.ops.netmerge.moe_experts_packed.default)(
        hidden, packed.gate_up, packed.down, packed.gate_up_scales, packed.down_scales, packed.intermediate_size,
        packed.group_size or 0, topk_weights, topk_ids, activation, gated, b_gate_up, b_down,
        apply_weights_on_input,
    )  # fmt: skip


if native_status().available:

    @torch.library.register_fake("netmerge::moe_experts_packed")
    def _moe_experts_packed_fake(hidden, gate_up, down, gate_up_scales, down_scales, *_args):
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)
