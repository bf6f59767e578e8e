"""What an MoE model needs around each optimizer step, as `StepHooks` (see train/step.py).

- Router state that lives across steps: the aux-loss-free expert biases and other `after_step`
  updates of the routers are applied after an applied step from the step's expert loads, summed
  over every token shard; after a skipped step what the forwards gathered is dropped instead.
- Diagnostics of the seed study's failure modes (moe/diagnostics.py), every
  `model.moe.diagnostics_every` steps: the routings of the last micro-batch are recorded, the
  router weights are snapshot before the update and the bf16 truncation of the update is measured
  after it (on DeepSpeed's fp32 master weights under bf16), and the report goes to the logger.
  With aux-free balancing the report also carries, per layer, the last bias update's proxies of
  the ALF-LB dual objective: `moe/layerNN/bias_max_over_mean_load` (max / mean load over the
  step's global batch, 1 = balanced) and `moe/layerNN/bias_step_size` (the step size eta_t used).
- Routing traces (moe/routing_trace.py), every `model.moe.trace_every` steps: the routings of the
  last micro-batch, sampled per layer, written by every rank under the run directory once the
  step is applied.
- A start-up check that no router state is bf16 where its updates land (the optimizer's master
  copy of a router parameter, a router buffer such as the aux-free bias): one line naming it.

torchtitan runs its expert-bias update as an optimizer step hook in the same spirit.
"""

from __future__ import annotations

import torch

from megamoe.config import Config
from megamoe.deepspeed_adapter import has_fp32_fragments
from megamoe.moe.diagnostics import RoutingDiagnostics, check_router_precision
from megamoe.moe.layer import moe_layers, routers_after_step, routers_discard_step
from megamoe.moe.routing_trace import RoutingTracer
from megamoe.parallel.reductions import sum_over_token_shards
from megamoe.train.step import StepHooks


def fp32_master_getter(cfg: Config):
    """Under bf16, router updates must be measured on DeepSpeed's fp32 master copies; None in fp32."""
    if cfg.train.precision != "bf16":
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return lambda name, param: safe_get_full_fp32_param(param)


def master_dtype(name: str, param: torch.nn.Parameter) -> torch.dtype | None:
    """The dtype of the copy of `param` the optimizer updates: DeepSpeed's fragment of it in this
    rank's flat master partition under ZeRO-1/2 or the bf16 optimizer (None where this rank holds
    none of it; `_hp_mapping.hp_fragment`, DeepSpeed 0.17.1 to 0.19.8), else the parameter itself."""
    if has_fp32_fragments(param):
        return None if param._hp_mapping is None else param._hp_mapping.hp_fragment.dtype
    return param.dtype


class MoEStepHooks(StepHooks):
    """Router updates after each step and, every `diagnostics_every` steps, routing diagnostics
    (every `trace_every` steps, routing traces)."""

    def __init__(self, cfg: Config, module: torch.nn.Module):
        # Built once, after the engine wraps the model: refuse router state that bf16 would truncate.
        check_router_precision(module, master_dtype)
        self.module = module
        self.reduce = sum_over_token_shards(cfg.parallel)
        self.every = cfg.model.moe.diagnostics_every
        self.diagnostics = RoutingDiagnostics(module, cfg.model.moe, reduce=self.reduce) if self.every else None
        self.master_weights = fp32_master_getter(cfg)
        self.trace_every = cfg.model.moe.trace_every
        self.tracer = None
        if self.trace_every:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self.tracer = RoutingTracer(module, cfg.model.moe.trace_tokens, cfg.train.output_dir, rank)

    def _diagnosed(self, step: int) -> bool:
        return self.diagnostics is not None and step % self.every == 0

    def _traced(self, step: int) -> bool:
        return self.tracer is not None and step % self.trace_every == 0

    def before_forward(self, step: int, last_micro_batch: bool) -> None:
        if last_micro_batch and self._traced(step):
            self.tracer.start()
        if last_micro_batch and self._diagnosed(step):
            self.diagnostics.enable_recording(True)

    def after_forward(self, step: int, last_micro_batch: bool) -> None:
        if last_micro_batch and self._traced(step):
            self.tracer.capture(step)
            self.tracer.stop()  # before diagnostics, which may have wanted the recording on too
        if last_micro_batch and self._diagnosed(step):
            self.diagnostics.enable_recording(False)
            self.diagnostics.snapshot_router_params(self.master_weights)

    def after_step(self, step: int):
        routers_after_step(self.module, self.reduce)
        if self._traced(step):
            self.tracer.write(step)
        if not self._diagnosed(step):
            return None
        self.diagnostics.measure_bf16_loss(self.master_weights)
        report = self.diagnostics.compute(step)
        report.scalars.update(self.bias_update_scalars())
        return report

    def bias_update_scalars(self) -> dict[str, float]:
        """Per MoE layer with aux-free balancing, the last update's max / mean load and step size."""
        scalars = {}
        for (_, layer), label in zip(self.diagnostics.layers, self.diagnostics.labels):
            last = getattr(layer.router, "last_bias_update", None)
            if last is not None:
                ratio, eta = last.tolist()
                scalars[f"moe/{label}/bias_max_over_mean_load"] = ratio
                scalars[f"moe/{label}/bias_step_size"] = eta
        return scalars

    def after_skipped_step(self, step: int) -> None:
        routers_discard_step(self.module)
        if self.tracer is not None:
            self.tracer.discard()
        if self.diagnostics is not None:
            self.diagnostics.discard_step()


def step_hooks_for(cfg: Config, module: torch.nn.Module) -> StepHooks:
    """The hooks the model needs: MoE hooks when it has MoE layers, else hooks that do nothing."""
    return MoEStepHooks(cfg, module) if moe_layers(module) else StepHooks()
