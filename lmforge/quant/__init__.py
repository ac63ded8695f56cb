"""L2: quantization by module swap. Quantized linears (int8, group-wise int2/3/4, NF4, W8A8) share
one protocol: `in_features`, `out_features`, `from_float(linear, ...)`, `dequantize()`, `forward(x)`.

    from lmforge.quant import QuantOptions, quantize_model
    quantize_model(model, QuantOptions(method="gptq", scheme="int4-g128"), calib_batches)

Methods: RTN, GPTQ, AWQ, SmoothQuant W8A8, QAT (prepare_qat / convert_qat), mixed precision,
BitNet b1.58 ternary QAT (prepare_bitnet / convert_bitnet -> TernaryLinear, 2-bit packed).
`replay(model, entry)` is what `lmforge.checkpoint` calls to rebuild them before loading weights.
"""

from .api import METHODS, QuantOptions, dequantize_model, quantize_model, replay
from .kernel_linear import Q4_0Linear, Q8_0Linear  # registers the q8_0 / q4_0 formats
from .linear import FORMATS, Int8Linear, IntNLinear, NF4Linear, QuantLinear, W8A8Linear
from .mixed import lm_loss
from .qat import FakeQuantLinear, convert_qat, prepare_qat
from .scheme import DEFAULT_SKIP, check_config, parse_scheme, quant_config, quantize_state_dict, record, swap
from .ternary import BitLinear, TernaryLinear, convert_bitnet, prepare_bitnet

__all__ = [
    "METHODS",
    "QuantOptions",
    "dequantize_model",
    "quantize_model",
    "record",
    "replay",
    "FORMATS",
    "Int8Linear",
    "IntNLinear",
    "NF4Linear",
    "QuantLinear",
    "W8A8Linear",
    "Q8_0Linear",
    "Q4_0Linear",
    "lm_loss",
    "FakeQuantLinear",
    "convert_qat",
    "prepare_qat",
    "BitLinear",
    "TernaryLinear",
    "convert_bitnet",
    "prepare_bitnet",
    "DEFAULT_SKIP",
    "check_config",
    "parse_scheme",
    "quant_config",
    "quantize_state_dict",
    "swap",
]
