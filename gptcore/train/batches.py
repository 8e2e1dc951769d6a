"""Where each training stage's batches come from, each source with a seeded generator of its own.

The generator's state is the data position: `fit` saves it in every checkpoint and a resumed
run draws exactly the batches the interrupted one would have drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gptcore.data.chat import PackedRows, inputs_and_targets
from gptcore.data.passages import Passages
from gptcore.errors import InputError
from gptcore.model import pad_right


class SeededBatches:
    """A batch source whose only state is its generator (`fit` needs next, state_dict, load_state_dict)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, ...]:  # first tensor: input ids (B, T)
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class TokenBatches(SeededBatches):
    """Random (input, target) windows of a token memmap: pretraining.

    Each optimizer step draws one global batch of world_size x grad_accum x batch_size window
    starts, the same on every rank, and a rank reads only its share: what a step trains on does
    not depend on how it is spread over processes.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum_steps: int = 1,
        pin: bool = False,
    ):
        if len(tokens) <= block_size + 1:
            raise InputError(f"the train split has {len(tokens)} tokens; block_size={block_size} needs more")
        super().__init__(seed)
        self.tokens, self.batch_size, self.block_size, self.pin = tokens, batch_size, block_size, pin
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.pending: list[torch.Tensor] = []  # this rank's micro-batches of the current step

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pending:
            per_rank = self.grad_accum_steps * self.batch_size
            starts = torch.randint(
                len(self.tokens) - self.block_size - 1, (self.world_size * per_rank,), generator=self.generator
            )
            self.pending = list(starts[self.rank * per_rank : (self.rank + 1) * per_rank].split(self.batch_size))
        starts = self.pending.pop(0)
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        window = torch.from_numpy(rows)  # (B, T + 1)
        if self.pin:
            window = window.pin_memory()  # lets the copy to the GPU overlap compute
        return window[:, :-1], window[:, 1:]  # (B, T) inputs, (B, T) targets

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints are taken between steps, when no micro-batch of a step is pending.
        super().load_state_dict(state)
        self.pending = []


class PassageBatches(SeededBatches):
    """Random labelled passages (with replacement), right-padded: classification."""

    def __init__(self, passages: Passages, batch_size: int, pad_id: int, seed: int):
        super().__init__(seed)
        self.passages, self.batch_size, self.pad_id = passages, batch_size, pad_id

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.passages), (self.batch_size,), generator=self.generator).tolist()
        ids, mask = pad_right([self.passages.ids[i] for i in picks], self.pad_id)
        return ids, mask, torch.from_numpy(self.passages.labels[picks])


class RowBatches(SeededBatches):
    """Random packed conversation rows (with replacement): chat SFT's (inputs, targets)."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int):
        super().__init__(seed)
        self.rows, self.batch_size = rows, batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.rows), (self.batch_size,), generator=self.generator).numpy()
        inputs, targets = inputs_and_targets(self.rows.ids[picks], self.rows.loss[picks])
        return torch.from_numpy(inputs), torch.from_numpy(targets)


def fixed_windows(tokens: np.ndarray, block_size: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` non-overlapping (T + 1)-token windows, evenly spread: (N, T + 1)."""
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise InputError(f"a split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
    picks = np.linspace(0, n - 1, num=min(n, max_windows)).astype(np.int64)
    return np.stack([tokens[i * block_size : i * block_size + block_size + 1] for i in picks]).astype(np.int64)
