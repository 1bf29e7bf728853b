"""The language model, its objectives, metric, callbacks and LightningModule."""

from .callbacks import (AtomicCheckpointIO, ExclusiveDevice, Interrupted, LastCheckpoint, MultirunReport, ProgressBar,
                        StopOnSignal, ThroughputMonitor)
from .lit_module import LanguageModelModule
from .metrics import LanguageModelMetric
from .objectives import IGNORE, CausalLM, MaskedLM
from .profiling import KernelProfile
from .transformer import TransformerLM

__all__ = ["AtomicCheckpointIO", "ExclusiveDevice", "IGNORE", "CausalLM", "Interrupted", "KernelProfile",
           "LanguageModelMetric", "LanguageModelModule", "LastCheckpoint", "MaskedLM", "MultirunReport", "ProgressBar",
           "StopOnSignal", "ThroughputMonitor", "TransformerLM"]
