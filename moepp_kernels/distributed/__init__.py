"""Expert parallelism over torch.distributed: FFN experts sharded over the ranks,
the router and the zero-computation experts replicated, so that only FFN slots
cross the wire (layer.py); the exchanges themselves in exchange.py."""

from .exchange import DispatchCounts, exchange_counts, exchange_rows, expert_ranges
from .layer import ExpertParallelMoEPPLayer

__all__ = ["DispatchCounts", "ExpertParallelMoEPPLayer", "exchange_counts", "exchange_rows", "expert_ranges"]
