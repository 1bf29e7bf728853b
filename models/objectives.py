"""Training objectives: turn a batch of token windows into model inputs and loss targets.

A batch is `{"tokens": [batch, seq_len + 1], "first_target": [batch]}` (see `data/`): positions
`p >= first_target` are the ones that may be scored. Targets use `IGNORE` where nothing is scored.
"""

import torch

IGNORE = -100


class CausalLM:
    """Next-token prediction: input tokens[:, :-1], targets tokens[:, 1:]."""

    causal = True
    sparse_targets = False  # the head runs at every position; unscored ones are IGNORE

    def __call__(self, batch: dict, *, mask_token_id: int, vocab_size: int, generator=None):
        tokens, first_target = batch["tokens"], batch["first_target"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        target_position = torch.arange(1, tokens.shape[1], device=tokens.device)
        targets[target_position[None, :] < first_target[:, None]] = IGNORE
        return inputs, targets


class MaskedLM:
    """BERT's masked LM: select `mask_prob` of the scorable positions of tokens[:, :-1]; of those,
    `mask_fraction` become the mask token, `random_fraction` a random token, the rest stay; the loss
    is on the selected positions only."""

    causal = False
    sparse_targets = True  # ~15% of positions are scored: the head runs only there

    def __init__(self, mask_prob: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1):
        if not (0 < mask_prob <= 1 and mask_fraction >= 0 and random_fraction >= 0
                and mask_fraction + random_fraction <= 1):
            raise ValueError(
                f"objective.mask_prob={mask_prob} must be in (0, 1] and objective.mask_fraction + "
                f"objective.random_fraction ({mask_fraction} + {random_fraction}) at most 1"
            )
        self.mask_prob, self.mask_fraction, self.random_fraction = mask_prob, mask_fraction, random_fraction

    def __call__(self, batch: dict, *, mask_token_id: int, vocab_size: int, generator=None):
        tokens = batch["tokens"][:, :-1]
        position = torch.arange(tokens.shape[1], device=tokens.device)
        scorable = position[None, :] >= batch["first_target"][:, None]
        selected = scorable & (torch.rand(tokens.shape, device=tokens.device, generator=generator) < self.mask_prob)
        action = torch.rand(tokens.shape, device=tokens.device, generator=generator)
        random_tokens = torch.randint(vocab_size, tokens.shape, device=tokens.device, generator=generator)
        inputs = torch.where(selected & (action < self.mask_fraction), mask_token_id, tokens)
        use_random = selected & (action >= self.mask_fraction) & (action < self.mask_fraction + self.random_fraction)
        inputs = torch.where(use_random, random_tokens, inputs)
        targets = torch.where(selected, tokens, IGNORE)
        return inputs, targets
