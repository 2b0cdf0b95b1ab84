"""Diagnostics that show the methods work: mean-bias statistics of FP4 GEMM operands (Averis), expert spectral
similarity and router alignment (SD-MoE), and routing N_eff (MH-MoE / continual learning)."""

from .experts import expert_similarity, plot_similarity, router_alignment
from .mean_bias import MeanBiasCallback, mean_bias, summarize, tensor_mean_bias_stats
from .routing import RouteNeff, collect_routes, layer_summary, routing_neff, token_factors, token_losses

__all__ = ["MeanBiasCallback", "RouteNeff", "collect_routes", "expert_similarity", "layer_summary", "mean_bias",
           "plot_similarity", "router_alignment", "routing_neff", "summarize", "tensor_mean_bias_stats",
           "token_factors", "token_losses"]
