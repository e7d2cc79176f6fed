"""4-bit NF4 base weights for QLoRA, on bitsandbytes' kernels."""

from .nf4 import NF4Linear, decoder_linear_names, dequantize_decoder_linears, quantize_decoder_linears

__all__ = ["NF4Linear", "decoder_linear_names", "dequantize_decoder_linears", "quantize_decoder_linears"]
