"""NF4 storage for frozen linear weights (Dettmers et al. 2023, arXiv 2305.14314).

Each block of `block_size` weights keeps 4-bit indices into the 16 NormalFloat levels (bitsandbytes'
values) and its absmax. With double quantization the absmaxes themselves are stored as int8 in blocks of
`scale_block_size` after subtracting their mean, one fp32 scale per block: about 0.516 bytes per weight
instead of 4. Weights are dequantized on the fly in forward and again in backward (never saved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


@dataclass
class NF4Tensor:
    """A quantized weight: packed 4-bit codes, block scales (int8 + fp32 with double quantization)."""

    packed: torch.Tensor  # uint8, two codes per byte, first code in the high nibble
    scales: torch.Tensor  # fp32 absmax per block, or int8 codes of (absmax - offset) with double quantization
    scale_scales: torch.Tensor | None  # fp32 per block of scales (double quantization)
    scale_offset: torch.Tensor | None  # fp32 scalar: the mean absmax (double quantization)
    shape: torch.Size
    block_size: int
    scale_block_size: int

    def nbytes(self) -> int:
        parts = [self.packed, self.scales, self.scale_scales, self.scale_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def check_block_size(numel: int, block_size: int, what: str = "the weight") -> None:
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise PeftlabError(f"NF4 block size must be a positive even integer, got {block_size!r}: use 64")
    if numel % block_size:
        raise PeftlabError(f"NF4 block size {block_size} does not divide {what} ({numel} values): "
                           "pick a block size that divides every quantized weight (64 usually does)")


def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True,
             scale_block_size: int = 256) -> NF4Tensor:
    check_block_size(weight.numel(), block_size)
    blocks = weight.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.bucketize(blocks / absmax[:, None], _MIDPOINTS.to(weight.device)).to(torch.uint8).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, weight.shape, block_size, scale_block_size)
    offset = absmax.mean()
    centred = F.pad(absmax - offset, (0, -absmax.numel() % scale_block_size)).reshape(-1, scale_block_size)
    scale_scales = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scale_codes = torch.round(centred / scale_scales[:, None] * 127).to(torch.int8).reshape(-1)[:absmax.numel()]
    return NF4Tensor(packed, scale_codes, scale_scales, offset, weight.shape, block_size, scale_block_size)


def block_absmax(q: NF4Tensor) -> torch.Tensor:
    if q.scale_scales is None:
        return q.scales
    n = q.scales.numel()
    padded = F.pad(q.scales.float(), (0, -n % q.scale_block_size)).reshape(-1, q.scale_block_size)
    return (padded / 127 * q.scale_scales[:, None]).reshape(-1)[:n] + q.scale_offset


def dequantize(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1).long()
    values = NF4_CODE.to(q.packed.device)[codes].reshape(-1, q.block_size) * block_absmax(q)[:, None]
    return values.reshape(q.shape).to(dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward: only the 4-bit form stays alive."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantized_weight(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` stored as NF4. `weight` is a zero-byte stand-in with the right shape, dtype and
    device (model code reads `layer.weight.dtype`); the values live in the quantized buffers.

    On CUDA with bitsandbytes installed (or with `use_bitsandbytes=True` anywhere), the matmul runs through
    bitsandbytes' 4-bit kernels: the layer is re-quantized once into bitsandbytes' single-level layout,
    which is lossless (each block's largest value maps to the code +-1, so codes and absmax come back
    exactly: tested), at the cost of a second 4-bit copy on that device."""

    use_bitsandbytes: bool | None = None  # None: on CUDA when bitsandbytes imports

    def __init__(self, linear: nn.Linear, block_size: int = 64, double_quant: bool = True,
                 scale_block_size: int = 256, from_conv1d: bool = False) -> None:
        super().__init__()
        self.from_conv1d = from_conv1d  # dequantize back into GPT-2's Conv1D layout
        q = quantize(linear.weight, block_size, double_quant, scale_block_size)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.block_size, self.scale_block_size = block_size, scale_block_size
        self.register_buffer("packed", q.packed)
        self.register_buffer("scales", q.scales)
        self.register_buffer("scale_scales", q.scale_scales)
        self.register_buffer("scale_offset", q.scale_offset)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.scales, self.scale_scales, self.scale_offset,
                         torch.Size((self.out_features, self.in_features)), self.block_size, self.scale_block_size)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.quantized(), dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.compute_dtype, device=self.packed.device).expand(
            self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb_state = self._bitsandbytes_state(x.device)
        if bnb_state is not None:
            import bitsandbytes

            packed, quant_state = bnb_state
            return bitsandbytes.matmul_4bit(x, packed.t(), quant_state=quant_state, bias=self.bias)
        out = _DequantizedMatmul.apply(x, self)
        return out + self.bias if self.bias is not None else out

    def _bitsandbytes_state(self, device: torch.device):
        wanted = self.use_bitsandbytes if self.use_bitsandbytes is not None else device.type == "cuda"
        if not wanted:
            return None
        cached = self.__dict__.get("_bnb_state")
        if cached is None or cached[0].device != device:
            try:
                import bitsandbytes.functional as bnb_functional
            except ImportError:
                if self.use_bitsandbytes:
                    raise PeftlabError("use_bitsandbytes=True but bitsandbytes is not installed: pip install "
                                       "bitsandbytes, or leave it unset") from None
                return None
            weight = self.dequantized_weight().to(device)
            cached = bnb_functional.quantize_4bit(weight, blocksize=self.block_size, quant_type="nf4",
                                                  compress_statistics=False)
            self.__dict__["_bnb_state"] = cached
        return cached

    def to_linear(self) -> nn.Module:
        """The layer in full precision again (`nn.Linear`, or `Conv1D` if it came from one), holding the
        dequantized weight: what merging a QLoRA adapter starts from."""
        kwargs = {"device": self.packed.device, "dtype": self.compute_dtype}
        weight = self.dequantized_weight()
        if self.from_conv1d:
            layer, weight = Conv1D(self.out_features, self.in_features).to(**kwargs), weight.T
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"
