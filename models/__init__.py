"""The language model, its objectives, metric, callbacks and LightningModule."""

from .callbacks import (AtomicCheckpointIO, ExclusiveDevice, Interrupted, LastCheckpoint, MultirunReport, StopOnSignal,
                        ThroughputMonitor)
from .lit_module import LanguageModelModule
from .metrics import LanguageModelMetric
from .objectives import IGNORE, CausalLM, MaskedLM
from .transformer import TransformerLM

__all__ = ["AtomicCheckpointIO", "ExclusiveDevice", "IGNORE", "CausalLM", "Interrupted", "LanguageModelMetric",
           "LanguageModelModule", "LastCheckpoint", "MaskedLM", "MultirunReport", "StopOnSignal", "ThroughputMonitor",
           "TransformerLM"]
