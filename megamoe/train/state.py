"""`TrainState`: everything a resumed run needs besides the DeepSpeed engine, with one state contract.

A checkpoint holds two kinds of state (train/checkpoint.py):

- the engine's (weights, fp32 masters, Adam moments, LR schedule, step counters) and the EMA,
  sharded like the parameters in `state/`, readable at any parallel layout;
- this rank's own: the step, the data stream's position, the RNG states and the count of skipped
  steps, one `rank_NNNNN.pt` per rank. That is `TrainState.state_dict()`.

The EMA travels with the TrainState (`state.ema`) because the run owns it, but its tensors are
saved with the engine's sharded state, not in the rank file. In the spirit of lingua's
`TrainState` and torchtitan's checkpointed states.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from megamoe.data.loader import LoaderState, ShardLoader
from megamoe.device import rng_states, set_rng_states
from megamoe.train.engine import EMA
from megamoe.train.resilience import StepAgreement


class RankState(TypedDict):
    """The contents of one rank file of a checkpoint (tensors and plain values only)."""

    step: int
    """Steps completed; the resumed run continues with step + 1."""
    data: LoaderState
    """The rank's data-stream position (data/loader.py)."""
    rng: dict[str, torch.Tensor]
    """The global RNG states: 'torch_cpu', and 'torch_cuda' on a GPU (see device.rng_states)."""
    skipped_steps: int
    """Steps skipped in all for a non-finite loss or gradient norm (resilience.StepAgreement)."""
    nonfinite_streak: int
    """Of those, how many in a row up to `step`."""


class TrainState:
    """The run's step, data position, RNG, step agreement and EMA, saved and restored as one.

    step: optimizer steps completed so far (0 at the start of a fresh run).
    restart_stream: data.restart_stream_on_resume; when set, a restored run starts its data stream
    over instead of continuing it (another data-parallel size).
    """

    def __init__(
        self,
        loader: ShardLoader,
        agreement: StepAgreement,
        ema: EMA | None,
        device: torch.device,
        restart_stream: bool = False,
    ):
        self.step = 0
        self.loader, self.agreement, self.ema, self.device = loader, agreement, ema, device
        self.restart_stream = restart_stream

    def state_dict(self) -> RankState:
        return {
            "step": self.step,
            "data": self.loader.state_dict(),
            "rng": rng_states(self.device),
            **self.agreement.state_dict(),
        }

    def load_state_dict(self, state: RankState) -> None:
        """Raises StreamStateError when the saved data position cannot be continued (see data/loader.py)."""
        self.agreement.load_state_dict(state)
        self.loader.load_state_dict(state["data"], restart=self.restart_stream)
        set_rng_states(state["rng"], self.device)
        self.step = int(state["step"])
