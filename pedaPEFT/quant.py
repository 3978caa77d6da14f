"""Quantization from absmax int8 to NF4 with double quantization: the lessons' one entry point.

Lessons 6-8 build every piece step by step and call it as ``quant.X``; each piece lives in the
module of its lesson, and this module gathers their public names:

* ``quant_absmax`` (lesson 6): absmax integers, whole-tensor, blockwise and row-wise int8;
* ``quant_4bit`` (lesson 7): the NF4 and FP4 codes, packing, blockwise 4-bit quantization;
* ``quant_double`` (lesson 8): the dynamic map, double quantization, bit accounting;
* ``quant_bnb``: a 4-bit state as bitsandbytes stores it, and back.
"""

from pedaPEFT.quant_4bit import (
    FAKE_QUANT_METHODS,
    NF4_OFFSET,
    QUANT_TYPES,
    QuantState,
    dequantize_4bit,
    fake_quantize,
    four_bit_errors,
    fp4_code,
    nf4_code,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)
from pedaPEFT.quant_absmax import (
    BLOCKSIZES,
    FLOAT_DTYPES,
    Int8State,
    absmax_dequantize,
    absmax_quantize,
    blockwise_absmax_dequantize,
    blockwise_absmax_quantize,
    check_blocksize,
    dequantize_int8,
    nearest_code_index,
    normal_with_outliers,
    quantize_int8,
)
from pedaPEFT.quant_bnb import from_bnb_state_dict, to_bnb_state_dict
from pedaPEFT.quant_double import (
    DQ_ROUNDINGS,
    bits_per_parameter,
    dequantize_absmax,
    dequantize_blockwise_8bit,
    dynamic_code,
    quantize_blockwise_8bit,
    storage_bits,
    storage_bits_per_parameter,
)

__all__ = [
    "BLOCKSIZES", "DQ_ROUNDINGS", "FAKE_QUANT_METHODS", "FLOAT_DTYPES", "NF4_OFFSET",
    "QUANT_TYPES", "Int8State", "QuantState", "absmax_dequantize", "absmax_quantize",
    "bits_per_parameter", "blockwise_absmax_dequantize", "blockwise_absmax_quantize",
    "check_blocksize", "dequantize_4bit", "dequantize_absmax", "dequantize_blockwise_8bit",
    "dequantize_int8", "dynamic_code", "fake_quantize", "four_bit_errors", "fp4_code",
    "from_bnb_state_dict", "nearest_code_index", "nf4_code", "normal_with_outliers",
    "pack_4bit", "quantize_4bit", "quantize_blockwise_8bit", "quantize_int8",
    "storage_bits", "storage_bits_per_parameter", "to_bnb_state_dict", "unpack_4bit",
]
