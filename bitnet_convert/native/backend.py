"""The native backend: a model built by :func:`bitnet_convert.runtime.modeling.build_model` with its linears,
embeddings and lm_head moved onto the integer CPU kernels of :mod:`bitnet_convert.native.build`.

What runs where:

* every ternary linear whose input is quantized (absmax, absmean, FP4 E2M1) becomes a :class:`NativeLinear`: the
  input is quantized per token to int8 codes and one fp32 multiplier ``s`` (codes identical to
  :mod:`bitnet_convert.quant.functional`), multiplied with the 2-bit weight with exact int32 sums, and scaled once:
  ``y = acc / s · α``. The reference backend computes the same ``(codes · T) / s · α`` in fp32, where the integer
  product is exact, so the linears agree bit for bit and the models differ only in the lm_head's summation order;
* linears named by role in ``sparse_roles`` use the sparse-input kernel, which reads only the weight columns of
  non-zero codes (each column one contiguous run of bytes). Default in every a4.8 scheme: o_proj (top-K: 50% zero
  codes) and down_proj (relu²: 67–87% zero codes measured); nothing for ``b158``, which runs dense as b1.58 engines
  do. At 50% zeros the sparse kernel takes 0.76–0.89 of the dense kernel's time (``eval/bench.py --only kernels``,
  two runs);
* a relu² FFN of an a4.8 scheme skips what relu² makes zero when few tokens go through it (decode: at most
  :data:`GATED_MAX_TOKENS`): gate_proj runs whole, up_proj (one kernel call, :func:`relu2_gated_up`) only for the
  outputs where relu²(gate) ≠ 0 for some token (the dense kernel over those weight rows), and down_proj's
  sparse-input kernel reads only the columns of those entries. A zero entry adds nothing to ffn_sub_norm's mean
  square or to the absmax of the down_proj input, and the entries are the dense path's to the bit, so the output
  equals the dense FFN's exactly (tested). A SwiGLU FFN has no exact zeros and keeps the dense path;
* FP4 E2M1 inputs are exact integers in units of ``max|x| / 12`` (the E2M1 grid ×2), so they run on the same
  kernels with codes in [−12, 12];
* the lm_head is INT8 with one scale per row by default (:class:`Int8Linear`; ``lm_head="stored"`` keeps the
  export's, below): half the bytes a token reads from a bf16 lm_head, at a perplexity cost of 0.02% or less on
  the reference models (docs/native.md); a tied model keeps its bf16 embedding table for the lookups beside it;
* embeddings (and a stored lm_head) keep the export's dtype: bf16 stays bf16 (half the memory of fp32; bf16 → fp32 is
  exact, and the lm_head runs on the bf16-weight GEMM kernel because torch's bf16 matmul on a CPU without bf16
  arithmetic is far slower than fp32); fp16 is converted once to fp32 (no fp16 kernel; a tied lm_head shares that
  fp32 table), and so is a bf16 lm_head whose input width the kernel does not take (not a multiple of 8); fp32
  stays fp32 (torch's BLAS). QwT compensation stays in torch, fp32, as in the reference backend, and so do norms,
  RoPE, attention and the low-bit KV cache except at decode; a ``DynamicCache`` appends in place instead of
  concatenating (:mod:`bitnet_convert.native.cache`);
* a decoded token goes through each BitNet decoder layer in one Python call of a few kernel calls: each RMSNorm
  fused with the next linear's quantizer (the same codes), and attention over the KV cache read in place (RoPE
  and the cache write included for the fp32 cache; the packed low-bit cache dequantized row by row as it is
  read) (:mod:`bitnet_convert.native.decode`; the attention sums differ from SDPA's by rounding);
* each forward call runs on as many threads as there are free cores, at most ``torch.get_num_threads()``
  (:func:`bitnet_convert.runtime.threads.set_thread_policy`; ``fixed`` turns it off): a busy neighbour process
  otherwise stalls every op's barrier;
* a linear whose input method has no native path (``method: none``, full precision) stays on the reference code
  path.

The native model is for inference: it has no gradients and no training forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.activations import ReLUSquaredActivation

from bitnet_convert.io.families import ROLES, role_of
from bitnet_convert.io.load import LM_HEADS
from bitnet_convert.native import build as kernels
from bitnet_convert.native.cache import preallocate_caches
from bitnet_convert.quant import functional as F
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.methods import METHODS
from bitnet_convert.quant.schemes import SPARSE_GLU, ActivationSpec
from bitnet_convert.runtime.memory import trim_heap
from bitnet_convert.runtime.modeling import replace_lm_head
from bitnet_convert.runtime.threads import set_thread_policy


def _ops():
    return torch.ops.bitnet_convert


def quantize(x: torch.Tensor, spec: ActivationSpec, isa: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token integer codes of ``x`` under ``spec``, as the kernels want them: the native path its method
    registers (:data:`bitnet_convert.quant.methods.METHODS`).

    ``x``: fp32 ``[T, K]``. Returns ``(codes int8 [T, Kp], s fp32 [T], sums int32 [T])`` with ``Kp`` = ``K`` padded
    to a multiple of 128 (zero codes), ``s`` the multiplier (``x̂ = codes / s``) and ``sums`` the code sum of each
    token. The codes and ``s`` equal :meth:`ActivationSpec.integer_codes`. Raises ``ValueError`` for a method
    without a native path (``none``).
    """
    native = METHODS[spec.method].native
    if native is None:
        raise ValueError(f"no integer codes for activation method {spec.method!r}")
    return native(_ops(), _sparsify(spec, x), spec.bits, isa)


def _sparsify(spec: ActivationSpec, x: torch.Tensor) -> torch.Tensor:
    """``spec.sparsify(x)`` for fp32 ``x [T, K]``; top-K on the kernel (``topk_sparsify``) for every token whose
    kept set is unique, and from torch's top-K for a token whose K-th largest ``|x|`` is tied with an entry left out
    (which of the tied entries is kept is torch's choice) or that holds a NaN."""
    if spec.topk is None or spec.topk >= 1.0:
        return spec.sparsify(x)
    y, exact = _ops().topk_sparsify(x, F.topk_count(x.shape[-1], spec.topk))
    if not bool(exact.all()):
        y[~exact] = spec.sparsify(x[~exact])
    return y


class NativeLinear(nn.Module):
    """A ternary linear on the integer kernels (see the module docstring); built from a :class:`QuantLinear`.

    ``weight``: uint8, the dense kernel's row layout ``[N, Kp/4]`` or, when ``sparse``, the sparse-input kernel's
    column layout ``[Kp, Np/4]``: 2 bits per weight plus padding to multiples of 128. Input ``[..., K]`` of any
    float dtype, output ``[..., N]`` in that dtype (computed in fp32).
    """

    def __init__(self, source: QuantLinear, sparse: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.spec = source.spec
        self.sparse = sparse
        self.isa = kernels.isa()
        #: many tokens go through the table-lookup GEMM: AVX2, the dense layout, and signed integer codes of at most 4
        #: bits (in [-8, 7]; not FP4 E2M1, whose codes reach ±12)
        self.lut = (self.isa == kernels.ISA_AVX2 and not sparse and METHODS[source.spec.method].signed_int_codes
                    and source.spec.bits <= 4)
        layout = kernels.cols_layout if sparse else kernels.rows_layout
        self.register_buffer("weight", layout(source.weight.cpu()))
        #: the scale as the source stores it, and whether it divides (the ``bitlinear`` convention)
        self.alpha = float(source.weight_scale.item())
        self.divides = source.scale_divides
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().float().clone())
        self.rms_norm = source.rms_norm
        self._quantize_input = source.spec.quantizer()  # the fake quantizer, for activation statistics
        #: zero share of the quantized inputs seen since the last reset, as (zeros, total) when ``record_zeros``
        self.record_zeros = False
        self.zeros = [0, 0]
        #: up_proj rows the gated relu² FFN did not compute, as (skipped, total) over tokens, when ``record_zeros``
        self.skipped_rows = [0, 0]

    def quantizer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the input quantizer sees of the module input ``x`` (after the optional input RMSNorm)."""
        return x if self.rms_norm is None else self.rms_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.apply_codes(*_quantized_input(self, x))
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def apply_codes(self, codes: torch.Tensor, s: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """The linear on an input already quantized (:func:`quantize`'s ``(codes, s, sums)`` for ``T`` tokens):
        fp32 ``[T, out_features]``, bias added."""
        if self.record_zeros:
            count = codes.shape[0] * self.in_features
            self.zeros[0] += round(_ops().zero_share(codes, self.in_features) * count)
            self.zeros[1] += count
        if self.sparse:
            y = _ops().ternary_gemm_sparse(codes, sums, s, self.weight, self.out_features, self.alpha, self.divides,
                                            self.isa)
        elif self.lut and codes.shape[0] >= LUT_MIN_TOKENS:
            y = _ops().ternary_gemm_lut(codes, sums, s, self.weight, self.alpha, self.divides)
        else:
            y = _ops().ternary_gemm(codes, sums, s, self.weight, self.alpha, self.divides, self.isa)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kernel = "sparse-input GEMV/GEMM" if self.sparse else "GEMV/GEMM"
        kernel += ", table-lookup GEMM" if self.lut else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, input={self.spec.describe()}, " \
               f"kernel={kernel}"


#: The last quantized input, ``(tensor, version, spec, (codes, s, sums))``: q/k/v (and gate/up) receive the same
#: tensor, so its codes are computed once. Holding the tensor keeps its storage alive, so identity plus version
#: means the same values; the entry is replaced by one rebinding (atomic under the GIL).
_last_input: tuple = (None, -1, None, None)


def _quantized_input(module: NativeLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize`` of the module's input, reusing the previous call's codes when a sibling linear already
    quantized this very tensor with the same spec (not across an input RMSNorm, whose output is new each call)."""
    global _last_input
    # an inference tensor (torch.inference_mode) has no version counter: an in-place change could not be seen, so
    # its codes are not reused
    reusable = module.rms_norm is None and not x.is_inference()
    tensor, version, spec, result = _last_input
    if reusable and tensor is x and version == x._version and spec == module.spec:
        return result
    flat = module.quantizer_input(x).reshape(-1, module.in_features).float().contiguous()
    result = quantize(flat, module.spec, module.isa)
    _last_input = (x, x._version, module.spec, result) if reusable else (None, -1, None, None)
    return result


class Bf16Linear(nn.Module):
    """A bias-free linear with a bf16 weight ``[N, K]`` run by the bf16-weight GEMM kernel (fp32 products and
    sums); input ``[..., K]``, output fp32 ``[..., N]``. Used for the lm_head of bf16 exports."""

    def __init__(self, weight: nn.Parameter | torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.bfloat16 or not self.accepts(weight.shape[1]):
            raise ValueError(f"the bf16 GEMM kernel takes a bf16 weight with in_features a multiple of "
                             f"{kernels.BF16_GEMM_K_MULTIPLE}; got {weight.dtype} {list(weight.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.isa = kernels.isa()

    @staticmethod
    def accepts(in_features: int) -> bool:
        """Whether the kernel takes this input width (else the lm_head runs in fp32 on torch's matmul)."""
        return in_features % kernels.BF16_GEMM_K_MULTIPLE == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        return _ops().bf16_gemm(flat, self.weight, self.isa).reshape(*lead, self.weight.shape[0])


class Int8Linear(nn.Module):
    """A bias-free linear with an INT8 weight ``[N, K]`` and one fp32 scale per output row (absmax: ``scale =
    max|W[n]| / 127``, ``W[n] ≈ scale · q``), run by the INT8-weight GEMM kernel: each token's input quantized to
    int16 codes per token, exact int32 sums, ``y = acc / s_x · scale``. Input ``[..., K]``, output fp32
    ``[..., N]``. Half the bytes of a bf16 lm_head; the default lm_head of :func:`convert` (its perplexity cost
    on the reference models is in docs/native.md). The reference backend's
    :class:`~bitnet_convert.quant.linear.Int8Head` computes the same numbers in torch."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = F.int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.isa = kernels.isa()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        return _ops().int8_gemm(flat, self.weight, self.scale, self.isa).reshape(*lead, self.weight.shape[0])


class UpcastEmbedding(nn.Embedding):
    """An embedding that stores its table in a narrow dtype and returns fp32 rows (exact for bf16/fp16)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


#: Roles on the sparse-input kernel by default (a4.8 schemes on relu² models; see the module docstring).
SPARSE_ROLES: tuple[str, ...] = ("o", "down")
#: The most tokens a relu² FFN takes on its gated path (up_proj rows where relu²(gate) ≠ 0); more run dense. The
#: union of the tokens' active rows is computed, which for many tokens is nearly every row.
GATED_MAX_TOKENS = 8
#: The fewest tokens a dense linear with integer inputs of at most 4 bits (a4.8's q/k/v and gate/up) runs on the
#: table-lookup GEMM (``ternary_gemm_lut``); fewer go to ``ternary_gemm``. Both give the same result bit for bit; on
#: 2B-4T gate shapes (6,912 × 2,560, 2 threads, AVX2) the lookup ran 0.91× as fast at 4 tokens, 1.10× at 8, 1.26× at
#: 16 and 1.31–1.38× from 32 to 512 in a one-off timing (``eval/bench.py --only kernels`` measures 512 tokens).
LUT_MIN_TOKENS = 16


def relu2_gated_up(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's ``relu2_gated_up`` (``csrc/ternary_dense.cpp``): relu²(gate) · up_proj(x) with up_proj computed
    on the kept rows only; ``(product fp32 [T, I], rows int64 [R])``. A module function, so that the runtime
    benchmark can time it with the linears."""
    return _ops().relu2_gated_up(*args)


def _gated_relu2_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``BitNetMLP.forward`` (``down(ffn_sub_norm(relu²(gate(x)) · up(x)))``) with up_proj computed
    only for the outputs where relu²(gate) ≠ 0 for some token (the kernel's ``relu2_gated_up``); the other entries
    of the product are 0 as in the dense path. ``x`` ``[..., hidden]`` → ``[..., hidden]``."""
    tokens = x.numel() // x.shape[-1]
    if tokens > GATED_MAX_TOKENS:
        return type(mlp).forward(mlp, x)
    gate = mlp.gate_proj(x)
    codes = _quantized_input(mlp.up_proj, x)  # gate_proj's codes when it quantized this tensor with up's spec
    product = gated_product(mlp.up_proj, gate.reshape(tokens, -1).float().contiguous(), *codes)
    return mlp.down_proj(mlp.ffn_sub_norm(product.reshape(gate.shape).to(x.dtype)))


def gated_product(up: NativeLinear, gate: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, sums: torch.Tensor
                  ) -> torch.Tensor:
    """relu²(gate) · up_proj(x) for fp32 ``gate [T, I]`` and up_proj's quantized input, up_proj computed on the
    kept rows only (:func:`relu2_gated_up`; the skipped rows counted when ``up.record_zeros``): fp32 ``[T, I]``."""
    product, rows = relu2_gated_up(gate, codes, sums, s, up.weight, up.alpha, up.divides, up.isa)
    if up.record_zeros:
        tokens = gate.shape[0]
        up.skipped_rows[0] += (up.out_features - rows.numel()) * tokens
        up.skipped_rows[1] += up.out_features * tokens
    return product


def is_gated(mlp: nn.Module) -> bool:
    """Whether ``mlp`` runs the gated relu² forward (:func:`convert` gave it one, and it was not replaced)."""
    return getattr(vars(mlp).get("forward"), "__func__", None) is _gated_relu2_forward


def _gateable(module: nn.Module) -> bool:
    """Whether ``module`` is a relu² GLU FFN on the native kernels with the sub-norm layout of BitNet's MLP."""
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(isinstance(p, NativeLinear) for p in parts) and not parts[1].sparse and parts[1].bias is None
            and isinstance(getattr(module, "ffn_sub_norm", None), nn.Module)
            and isinstance(getattr(module, "act_fn", None), ReLUSquaredActivation))


def convert(model: nn.Module, scheme: str, sparse_roles: tuple[str, ...] | None = None,
            lm_head: str = "int8") -> nn.Module:
    """Move a model from :func:`~bitnet_convert.runtime.modeling.build_model` onto the native kernels, in place.

    ``scheme``: the scheme name the checkpoint declares. ``sparse_roles``: roles (``qkv``, ``o``, ``gate_up``,
    ``down``) whose linears run on the sparse-input kernel; default :data:`SPARSE_ROLES` for a4.8 schemes on relu²
    models and none for ``b158`` or a SwiGLU model (dense down_proj input). Each linear is replaced one at a time,
    so the peak memory is the model plus one linear. ``lm_head``: ``int8`` (the default, also for ``auto``:
    :class:`Int8Linear`, made from the stored weight; a tied embedding table is kept as stored) or ``stored`` (the
    export's dtype; see the module docstring). The model's forward calls follow the free cores
    (``set_thread_policy(model, "fixed")`` undoes it). Raises
    :class:`~bitnet_convert.native.build.NativeUnavailable` when the kernels cannot be built and ``ValueError`` for
    an unknown role or lm_head.
    """
    kernels.ensure_built()
    a48_relu2 = scheme != "b158" and getattr(model.config, "hidden_act", "relu2") in SPARSE_GLU
    if sparse_roles is None:  # a SwiGLU down_proj input is dense: the sparse-input kernel would only be slower
        sparse_roles = SPARSE_ROLES if a48_relu2 else ()
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head: unknown '{lm_head}'; expected one of {', '.join(LM_HEADS)}")
    unknown = sorted(set(sparse_roles) - set(ROLES))
    if unknown:
        raise ValueError(f"sparse_roles: unknown role '{unknown[0]}'; expected some of {', '.join(ROLES)}")
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear) or METHODS[module.spec.method].native is None:
            continue
        model.set_submodule(name, NativeLinear(module, role_of(name) in sparse_roles))
    if a48_relu2:
        for module in model.modules():
            if _gateable(module):
                module.forward = types.MethodType(_gated_relu2_forward, module)
    from bitnet_convert.native import decode  # it builds on this module's NativeLinear

    decode.install(model)
    _convert_embeddings(model, "int8" if lm_head == "auto" else lm_head)
    set_thread_policy(model, "free-cores")
    preallocate_caches(model)
    model.requires_grad_(False)
    trim_heap()  # the heap pages freed while repacking go back to the OS (else the resident size keeps the copies)
    return model.eval()


def _convert_embeddings(model: nn.Module, lm_head: str) -> None:
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    weight = embed.weight
    if weight.dtype not in (torch.float32, torch.bfloat16):
        weight = nn.Parameter(weight.detach().float(), requires_grad=False)  # fp16: no fp16 kernel, fp32 once
    model.set_input_embeddings(UpcastEmbedding(weight.shape[0], weight.shape[1], padding_idx=embed.padding_idx,
                                               _weight=weight.detach(), _freeze=True))
    if head is None:
        return
    head_weight = weight if tied else head.weight
    if lm_head == "int8":
        replace_lm_head(model, Int8Linear(head_weight))
    elif head_weight.dtype == torch.bfloat16 and Bf16Linear.accepts(head_weight.shape[1]):
        model.set_output_embeddings(Bf16Linear(head_weight))
    else:  # fp16 (no fp16 kernel; a tied head shares the fp32 table made above) or a shape the bf16 kernel does
        # not take: torch's fp32 matmul, as the reference backend computes it
        fp32 = head_weight if head_weight.dtype == torch.float32 else head_weight.detach().float()
        head.weight = fp32 if isinstance(fp32, nn.Parameter) else nn.Parameter(fp32, requires_grad=False)


def linear_zero_shares(model: nn.Module) -> dict[str, float]:
    """Measured zero share of the quantized inputs per role (``o``, ``down``, …) since the last
    :func:`record_zeros` ``(model, True)``, and under ``"up rows skipped"`` the share of up_proj outputs the gated
    relu² FFN did not compute (when it ran)."""
    totals: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, NativeLinear) and module.zeros[1]:
            acc = totals.setdefault(role_of(name) or name, [0, 0])
            acc[0] += module.zeros[0]
            acc[1] += module.zeros[1]
    shares = {role: zeros / total for role, (zeros, total) in totals.items()}
    skipped = [sum(m.skipped_rows[i] for m in model.modules() if isinstance(m, NativeLinear)) for i in (0, 1)]
    if skipped[1]:
        shares["up rows skipped"] = skipped[0] / skipped[1]
    return shares


def record_zeros(model: nn.Module, on: bool) -> None:
    """Start (``on``, counters reset) or stop counting zero input codes in every :class:`NativeLinear`."""
    for module in model.modules():
        if isinstance(module, NativeLinear):
            module.record_zeros = on
            if on:
                module.zeros = [0, 0]
                module.skipped_rows = [0, 0]
