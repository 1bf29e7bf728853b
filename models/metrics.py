"""Corpus-level language-model metrics, exact under any batching and any number of processes."""

import math

import torch
from torchmetrics import Metric


class LanguageModelMetric(Metric):
    """Sums negative log-likelihood (nats), scored tokens and correct argmax predictions in float64.

    compute() -> {"loss": mean NLL, "bpc" or "ppl": mean NLL / ln 2 or exp(mean NLL), "acc": accuracy}.
    Summing before dividing weighs every token equally, whatever the batch or window it came in.
    """

    full_state_update = False

    def __init__(self, metric: str):
        super().__init__()
        if metric not in ("bpc", "ppl"):
            raise ValueError(f"metric must be 'bpc' or 'ppl', not {metric!r}")
        self.metric = metric
        for name in ("nll_sum", "token_count", "correct_count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, token_count: torch.Tensor, correct_count: torch.Tensor) -> None:
        self.nll_sum += nll_sum.double()
        self.token_count += token_count.double()
        self.correct_count += correct_count.double()

    def compute(self) -> dict[str, torch.Tensor]:
        mean_nll = self.nll_sum / self.token_count
        value = mean_nll / math.log(2) if self.metric == "bpc" else torch.exp(mean_nll)
        return {"loss": mean_nll, self.metric: value, "acc": self.correct_count / self.token_count}
