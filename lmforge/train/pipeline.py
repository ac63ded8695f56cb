"""Pipeline parallelism for training through `torch.distributed.pipelining` (`train.pp`, `--pp N`).

Each of the N torchrun ranks holds a contiguous slice of the blocks (the first also the embeddings,
the last the final norm and head) as a `StageModel` whose parameter names are the full model's,
so optimizer groups, checkpoints and resume see ordinary names. A step's `train.grad_accum`
micro-batches are the pipeline's micro-batches, scheduled GPipe (all forwards, then all backwards)
or 1F1B (one forward, one backward in the steady state: at most N micro-batches' activations live
per stage instead of all of them). The loss of each micro-batch is its summed token loss divided by
the step's labelled tokens, the schedule's own gradient scaling is off: one process with the same
accumulation takes the same step. Gradients are clipped by the norm over all stages.

Tied embeddings: the first stage's embedding and the last stage's head are one weight held twice;
their gradients are summed between the two ranks before the update (as Megatron does), so both copies
take the same step.

PP x DP (2D): WORLD_SIZE = pp x dp ranks form dp pipelines of pp consecutive ranks (rank = d * pp +
stage, the layout `parallel.data_parallel_info` reads data by: a pipeline's ranks read the same
batches). Each pipeline runs its own schedule on its share of the batch; each micro-batch's loss is
divided by the labelled tokens of the whole step (all pipelines), and after the backward each stage's
gradients are summed over its dp replicas, so the step equals one process accumulating every
pipeline's micro-batches. Not yet: PP with TP (3D), MoE (its balancing loss spans every layer),
packed/masked batches and custom losses.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.common import LmforgeError, dist_info
from lmforge.model.transformer import build_mask, default_positions

from .objectives import IGNORE, lm_loss_sum

SCHEDULES = ("gpipe", "1f1b")


def stage_layers(num_layers: int, stage: int, num_stages: int) -> range:
    """Blocks of `stage`: an even split, the first stages taking one more when it does not divide."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class StageModel(nn.Module):
    """One stage's share of a Transformer, keeping the full model's parameter names (a ModuleDict
    keyed by the original block index): stage 0 maps token ids to hidden states, the last stage
    hidden states to logits, the others hidden states to hidden states."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int):
        super().__init__()
        c = self.config = model.config
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.model = nn.Module()
        if self.first or (self.last and c.tie_word_embeddings):
            # The last stage holds a tied embedding too (unused in its forward): its head weight then keeps
            # the embedding's name and no-decay group, as in the whole model.
            self.model.embed_tokens = model.model.embed_tokens
        if self.first:
            if c.position == "learned":
                self.model.embed_positions = model.model.embed_positions
        if c.position == "rope":
            self.model.rotary = model.model.rotary  # frequencies only (non-persistent buffers)
        layers = stage_layers(c.num_hidden_layers, stage, num_stages)
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        if self.last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, m = self.config, self.model
        if self.first:
            x = m.embed_tokens(x)
        B, T = x.shape[:2]
        positions = default_positions(B, T, 0, None, x.device)
        rope = m.rotary(positions, x.dtype) if c.position == "rope" else None
        if self.first and c.position == "learned":
            x = x + m.embed_positions(positions)
        masks: dict = {}
        for block in m.layers.values():
            if block.window not in masks:
                masks[block.window] = build_mask(c, B, T, T, 0, None, None, x.device, block.window)
            mask, is_causal = masks[block.window]
            x, _ = block(x, rope, mask, None, 0, is_causal)
        return self.lm_head(m.norm(x)) if self.last else x


def mesh_ranks(world_size: int, pp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(the pipelines' ranks, the data-parallel replicas' ranks of each stage) of a pp x dp layout."""
    dp = world_size // pp
    pipelines = [list(range(d * pp, (d + 1) * pp)) for d in range(dp)]
    return pipelines, [list(range(s, world_size, pp)) for s in range(pp)]


def check_pipeline(config, pp: int, schedule: str, grad_accum: int, eval_batches: int, world_size: int) -> None:
    """Refuse what this pipeline cannot do exactly, naming the setting."""
    problems = [
        (
            world_size < pp or world_size % pp != 0,
            f"needs a multiple of {pp} processes (pp x dp: torchrun --nproc_per_node {pp} or {2 * pp}, ...); "
            f"WORLD_SIZE={world_size}",
        ),
        (schedule not in SCHEDULES, f"train.pp_schedule {schedule!r} is not one of {', '.join(SCHEDULES)}"),
        (config.num_hidden_layers < pp, f"model.num_hidden_layers={config.num_hidden_layers} < {pp} stages"),
        (schedule == "1f1b" and grad_accum < pp, f"1F1B needs train.grad_accum >= {pp} micro-batches"),
        (eval_batches % grad_accum != 0, f"train.eval_batches={eval_batches} is not a multiple of grad_accum"),
        (config.num_experts > 0, "MoE models are not supported (the balancing loss spans every layer)"),
        (config.final_logit_softcapping is not None, "final logit soft-capping is not supported"),
        (
            any(config.layer_window(i) is not None for i in range(config.num_hidden_layers))
            and config.rope_local_theta is not None,
            "a local RoPE base is not supported",
        ),
    ]
    for bad, why in problems:
        if bad:
            raise LmforgeError(f"--pp {pp}: {why}")


class PipelineModel(nn.Module):
    """This rank's stage and the schedule that runs all stages; `train_step`/`evaluate` call
    `pipeline_step`/`pipeline_eval` instead of a forward pass."""

    def __init__(self, model: nn.Module, pp: int, schedule: str, grad_accum: int, device: torch.device):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        rank, world = dist.get_rank(), dist.get_world_size()
        self.dp, stage_id, replica = world // pp, rank % pp, rank // pp
        self.first_rank, self.last_rank = replica * pp, replica * pp + pp - 1  # of this rank's pipeline
        self.stage_model = StageModel(model, stage_id, pp).to(device)
        # The whole Transformer, unregistered (its other stages' blocks are not trained here): `unwrap`
        # gives it to the checkpoint code, which takes its config and rebuilds the full model to save.
        object.__setattr__(self, "module", model)
        # Every rank takes part in creating every group, in the same order. One pipeline: the world.
        pipelines, replicas = mesh_ranks(world, pp)
        self.pp_group = self.dp_group = None
        if self.dp > 1:
            self.pp_group = [dist.new_group(r) for r in pipelines][replica]
            self.dp_group = [dist.new_group(r) for r in replicas][stage_id]
        self.tied = None  # this rank's copy of a tied embedding/head weight, if any
        if model.config.tie_word_embeddings:
            groups = [dist.new_group([p[0], p[-1]]) for p in pipelines]
            if rank in (self.first_rank, self.last_rank):
                self.tied, self.tie_group = model.model.embed_tokens.weight, groups[replica]
        self.config, self.device, self.pp, self.n_micro = model.config, device, pp, grad_accum
        self._n = 1.0  # the divisor of each micro-batch's summed loss (set per step)
        stage = PipelineStage(self.stage_model, stage_id, pp, device, group=self.pp_group)
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = kind(stage, n_microbatches=grad_accum, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, labels)[0] / self._n

    def _run(self, micro_batches: list[dict], train: bool) -> float:
        """Every micro-batch through the pipeline -> sum of their losses (the last stage's, on every rank)."""
        for b in micro_batches:
            extra = sorted(k for k, v in b.items() if v is not None and k not in ("input_ids", "labels"))
            if extra:
                raise LmforgeError(f"--pp: batches with {', '.join(extra)} are not supported (plain CLM batches only)")
        x = torch.cat([b["input_ids"] for b in micro_batches]).to(self.device)
        y = torch.cat([b["labels"] for b in micro_batches]).to(self.device)
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        args = (x,) if self.stage_model.first else ()
        run(*args, target=y if self.stage_model.last else None, losses=losses)
        total = torch.stack(losses).sum().detach().float() if losses else torch.zeros(())
        dist.broadcast(total, src=self.last_rank, group=self.pp_group)  # the last stage computed it
        return float(self._dp_sum(total))

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the data-parallel replicas of this stage (every pipeline's share)."""
        if self.dp > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def pipeline_step(self, micro_batches: list[dict]) -> tuple[float, int]:
        """Forward and backward of one step's micro-batches -> (mean token loss, labelled tokens)."""
        local = torch.tensor(float(sum(int((b["labels"] != IGNORE).sum()) for b in micro_batches)))
        n = max(1, int(self._dp_sum(local)))  # the whole step's labelled tokens, every pipeline's
        self._n = float(n)
        loss = self._run(micro_batches, train=True)
        if self.tied is not None:  # embedding gradient + head gradient, on both copies
            dist.all_reduce(self.tied.grad, group=self.tie_group)
        for p in self.stage_model.parameters():  # each loss was already divided by the step's tokens: a sum
            if self.dp > 1 and p.grad is not None:
                dist.all_reduce(p.grad, group=self.dp_group)
        return loss, n

    @torch.no_grad()
    def pipeline_eval(self, batches: list[dict], group: int) -> tuple[float, int]:
        """(summed token loss, labelled tokens) over `batches`, run `group` at a time."""
        self._n = 1.0
        total, count = 0.0, 0
        for i in range(0, len(batches), group):
            chunk = batches[i : i + group]
            total += self._run(chunk, train=False)
            count += sum(int((b["labels"] != IGNORE).sum()) for b in chunk)
        return total, int(self._dp_sum(torch.tensor(float(count))))

    def grad_norm_and_clip(self, max_norm: float) -> float:
        """clip_grad_norm_ over the whole model: each stage's squared norm, summed over stages."""
        twice = self.tied if self._head_alias() else None
        grads = [p.grad for p in self.stage_model.parameters() if p.grad is not None and p is not twice]
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        dist.all_reduce(sq, group=self.pp_group)  # the stages of one pipeline (replicas hold the same grads)
        norm = math.sqrt(float(sq))
        coef = min(1.0, max_norm / (norm + 1e-6))
        for g in grads + ([twice.grad] if twice is not None else []):
            g.mul_(coef)
        return norm

    def _head_alias(self) -> bool:
        """True where this stage's head is the copy of a tied embedding held by the first stage."""
        return self.tied is not None and self.stage_model.last and not self.stage_model.first

    def _gather(self, part):
        """The stages' parts on rank 0 (the first pipeline's: every replica holds the same), [] elsewhere."""
        if self.first_rank != 0:
            return []
        parts = [None] * self.pp if dist.get_rank() == 0 else None
        dist.gather_object(part, parts, dst=0, group=self.pp_group)
        return parts or []

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on rank 0 (each stage's part gathered), {} elsewhere."""
        part = {k: v.detach().cpu() for k, v in self.stage_model.state_dict().items()}
        return {k: v for p in self._gather(part) for k, v in p.items()}

    def _param_names(self, optimizer: torch.optim.Optimizer) -> list[list[str]]:
        names = {id(p): n for n, p in self.stage_model.named_parameters()}
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """{"state": {name: ...}, "param_groups": [...]} of the whole model on rank 0, {} elsewhere:
        the stages' states merged, each group's parameter names concatenated in stage order (a tied
        weight's once). By name, without torch's state-dict helpers: their collectives assume every
        rank holds the same parameters, which stages do not."""
        sd, names = optimizer.state_dict(), self._param_names(optimizer)
        index = {i: n for g, ns in zip(sd["param_groups"], names) for i, n in zip(g["params"], ns)}
        cpu = {
            index[i]: {k: t.detach().cpu() if torch.is_tensor(t) else t for k, t in v.items()}
            for i, v in sd["state"].items()
        }
        groups = [dict(g, params=ns) for g, ns in zip(sd["param_groups"], names)]
        parts = self._gather({"state": cpu, "param_groups": groups})
        if not parts:
            return {}
        merged = [
            dict(g, params=list(dict.fromkeys(n for p in parts for n in p["param_groups"][i]["params"])))
            for i, g in enumerate(parts[0]["param_groups"])
        ]
        return {"state": {k: v for p in parts for k, v in p["state"].items()}, "param_groups": merged}

    def load_full_state(self, optimizer, model_state: dict, optim_state: dict | None) -> None:
        """Every rank passes the whole model's state; each stage keeps its own part."""
        own = self.stage_model.state_dict()
        missing = sorted(set(own) - set(model_state))
        if missing:
            raise LmforgeError(f"checkpoint lacks {len(missing)} tensors of this stage, e.g. {missing[0]}")
        self.stage_model.load_state_dict({k: model_state[k] for k in own})
        if optimizer is None or optim_state is None:
            return
        names = self._param_names(optimizer)
        flat = [n for ns in names for n in ns]
        lost = [n for n in flat if n not in optim_state["state"]]
        if lost:
            raise LmforgeError(f"checkpoint has no optimizer state for {lost[0]}")
        saved = {n: g for g in optim_state["param_groups"] for n in g["params"]}
        groups = [
            dict(
                saved[ns[0]] if ns else {}, params=list(range(sum(map(len, names[:i])), sum(map(len, names[: i + 1]))))
            )
            for i, ns in enumerate(names)
        ]
        state = {i: optim_state["state"][n] for i, n in enumerate(flat)}
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def wrap_pipeline(model: nn.Module, pp: int, schedule: str, grad_accum: int, eval_batches: int, device) -> nn.Module:
    check_pipeline(model.config, pp, schedule, grad_accum, eval_batches, dist_info().world_size)
    return PipelineModel(model, pp, schedule, grad_accum, device)
