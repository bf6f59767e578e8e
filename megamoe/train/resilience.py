"""Surviving a cluster: preemption signals, non-finite steps and stops for bad input.

Three decisions must be the same on every rank, or ranks drift apart or hang in a collective:

- *stop now* (preemption): SIGTERM or SIGUSR1 may reach the ranks at different times, so each
  rank only raises a local flag, and the flags are combined once per step;
- *this step was skipped* (a non-finite loss or gradient norm);
- *stop with an error*: bad input found by some ranks only (too many bad samples on one
  data-parallel rank, a checkpoint write that failed on one rank). A rank that raised alone
  would leave the others waiting in a collective until a timeout, and torchrun would bury its
  message under their tracebacks. The rank holds its error until the next agreement instead,
  and then every rank raises `AgreedStop` with the same one-line message.

`StepAgreement.end_of_step` combines all three with a single all-reduce (MAX) of three numbers
over all ranks, once per step: cheap next to the step's own gradient reduction. Outside the
step loop (start-up, checkpoint saves) `stop_together` and `agreed_problem` do the same once.

The tests inject their faults (a NaN batch, a save that stalls or fails) from outside, by
wrapping megamoe's functions (tests/distributed/pretrain_with_faults.py): nothing here reads
a test variable.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist


class AgreedStop(RuntimeError):
    """Raised on every rank at once, after an agreement, with the same message: print it once and exit 2."""


class NonFiniteError(AgreedStop):
    """Too many consecutive steps had a non-finite loss or gradient norm; the message names the step."""


def agreed_problem(problem: str | None, device: torch.device) -> str | None:
    """Collective: None on every rank when no rank has a problem, else the same message on every rank.

    The message is the lowest failing rank's, naming that rank when others had none. Costs one
    all-reduce; the messages are gathered only when some rank failed.
    """
    flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return _gather_problem(problem) if flag.item() > 0 else None


def _gather_problem(problem: str | None) -> str:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    failed = [rank for rank, p in enumerate(everyone) if p is not None]
    first = everyone[failed[0]]
    if len(failed) == len(everyone):
        return first
    others = f" and {len(failed) - 1} other rank(s)" if len(failed) > 1 else ""
    return f"{first} [rank {failed[0]}{others}; every rank stopped]"


@contextmanager
def stop_together(device: torch.device, kinds: tuple[type[Exception], ...]):
    """Collective at the end of the block: if any rank raised one of `kinds` in it, every rank raises
    `AgreedStop` with that error's message. For start-up work that a rank may fail alone (data, resume).

    The block must reach no collective after the point where it can raise, or the ranks that did
    not raise would wait in it.
    """
    problem = None
    try:
        yield
    except kinds as exc:
        problem = str(exc)
    message = agreed_problem(problem, device)
    if message is not None:
        raise AgreedStop(message)


class StepAgreement:
    """Per-step agreement on stopping, on skipped steps and on bad input, and the count of skipped steps.

    `skipped_steps` (total) and `streak` (consecutive) travel in the checkpoint, so a resumed run
    keeps counting where the interrupted one was. `problem` is this rank's bad-input error of the
    current step (see `hold`), settled at the end of the step.
    """

    def __init__(self, device: torch.device, max_nonfinite_steps: int):
        self.device = device
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_steps = 0
        self.streak = 0
        self.problem: str | None = None

    def hold(self, error: Exception) -> None:
        """Keep this rank's bad-input error until `end_of_step`, which stops every rank with it.

        Until then the rank must go through the step's collectives like the others."""
        if self.problem is None:
            self.problem = str(error)

    def end_of_step(self, step: int, stop_requested: bool, step_skipped: bool) -> tuple[bool, bool]:
        """Collective (every rank, every step): returns (stop, skipped) as agreed by all ranks.

        Raises AgreedStop on every rank when any rank holds a problem (see `hold`), and
        NonFiniteError when `max_nonfinite_steps` steps in a row were skipped.
        """
        flags = torch.tensor(
            [float(stop_requested), float(step_skipped), float(self.problem is not None)], device=self.device
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, skipped, failed = (bool(v) for v in flags.tolist())
        if failed:
            raise AgreedStop(_gather_problem(self.problem))
        if skipped:
            self.skipped_steps += 1
            self.streak += 1
            if self.streak >= self.max_nonfinite_steps:
                first = step - self.streak + 1
                raise NonFiniteError(
                    f"steps {first}..{step} all had a non-finite loss or gradient norm ({self.streak} in a row, "
                    f"train.max_nonfinite_steps={self.max_nonfinite_steps}); stopped at step {step}: lower optim.lr, "
                    f"check the data, or resume from an earlier checkpoint"
                )
        else:
            self.streak = 0
        return stop, skipped

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "nonfinite_streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))  # checkpoints written before this existed
        self.streak = int(state.get("nonfinite_streak", 0))


def poison_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """Make every gradient NaN when the loss is not finite, so the optimizer step is skipped.

    DeepSpeed's ZeRO-1/2 optimizer already skips the update, zeroes the gradients and leaves the
    LR schedule where it was when the *global* gradient norm is not finite (it is reduced over
    all ranks, so all ranks skip together; `engine.was_step_applied()` reports it). A non-finite
    loss nearly always gives non-finite gradients; multiplying by NaN makes that certain. For a
    finite loss the factor is exactly 1.0, which changes no bit of the loss or the gradients,
    and it needs no host synchronisation.
    """
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, torch.ones_like(loss), torch.full_like(loss, float("nan"))).detach()


def local_grads_finite(module: torch.nn.Module) -> bool:
    """Whether every gradient held by this rank is finite (for optim.zero_stage=0, see step.py)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
