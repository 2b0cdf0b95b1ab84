"""Diagnostics that show the methods work: mean-bias statistics of FP4 GEMM operands (Averis)."""

from .mean_bias import MeanBiasCallback, mean_bias, summarize, tensor_mean_bias_stats

__all__ = ["MeanBiasCallback", "mean_bias", "summarize", "tensor_mean_bias_stats"]
