"""KTO (`rlhfkit dpo --loss kto`): preference optimisation on unpaired thumbs-up/down judgments (Ethayarajh et al.
2024, arXiv 2402.01306), configured by DPOConfig; paired rows are unpaired into one desirable and one undesirable
example each.

The loop is dpo.py's with one addition: before the micro-batches, the reference point z₀ (a KL estimate from each
example's prompt followed by another example's completion) is computed over the whole optimizer step. The
reference log-probs of both (the example's own completion and its mismatched partner) come from
policy/reference.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from rlhfkit.data.collate import collate_completions
from rlhfkit.data.kto import TokenizedCompletion, kl_partners, mismatched, read_kto_records, tokenize_kto, unpair
from rlhfkit.errors import ConfigError
from rlhfkit.losses import kto_loss
from rlhfkit.losses.dpo import kto_weights_ok
from rlhfkit.policy.offline import DPOConfig, Tally, finish, read_records, start
from rlhfkit.policy.reference import Reference, sequence_logprobs, to_device
from rlhfkit.train import Run, check_finite

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class KTOSplit:
    """Training or held-out KTO examples. Column 0 of the reference cache is each example's own completion,
    column 1 its mismatched pair (the example's prompt followed by its fixed partner's completion)."""

    items: list[TokenizedCompletion]
    kl_items: list[TokenizedCompletion]
    """Item i's prompt followed by its fixed partner's completion, for the reference point z₀."""
    ref: torch.Tensor | None = None
    """(N, 2) cached sequence log π_ref of the completion and of the mismatched pair, when reference: cached."""
    padding_free: bool = False
    """Batches in the packed layout (`collate_completions(..., padding_free=True)`); sequence n is still n."""
    layout: ClassVar[str] = "kto"

    def __len__(self) -> int:
        return len(self.items)

    def collate(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The policy's batch: (B, T) completions."""
        return collate_completions([self.items[i] for i in idx], pad_id, self.padding_free)

    def collate_kl(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """(B, T) mismatched pairs."""
        return collate_completions([self.kl_items[i] for i in idx], pad_id, self.padding_free)

    def collate_both(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """(2B, T): completions in rows 0..B-1, mismatched pairs in rows B..2B-1."""
        return collate_completions([self.items[i] for i in idx] + [self.kl_items[i] for i in idx], pad_id,
                                   self.padding_free)

    def sequences(self) -> Iterator[tuple[list[int], list[int]]]:
        for item, kl_item in zip(self.items, self.kl_items):
            yield item.input_ids, item.response_mask
            yield kl_item.input_ids, kl_item.response_mask


def load_data(cfg: DPOConfig, tokenizer: Any) -> tuple[KTOSplit, KTOSplit, dict[str, Any]]:
    """Training and held-out examples; preference pairs in the data are unpaired after the split. Warns when the
    weighted desirable:undesirable ratio is outside the paper's recommended range."""
    records, held_records, info = read_records(cfg, tokenizer, read_kto_records)

    def build(recs: list[Any], seed: int) -> tuple[KTOSplit, Any]:
        examples, report = tokenize_kto(tokenizer, unpair(recs), cfg.max_length, cfg.overlong)
        kl_items = mismatched(examples, kl_partners(len(examples), seed), cfg.max_length)
        return KTOSplit(examples, kl_items, padding_free=cfg.padding_free), report

    train, report = build(records, cfg.seed)
    held = build(held_records, cfg.seed + 1)[0]
    check = kto_weights_ok(report.desirable, report.undesirable, cfg.kto_desirable_weight,
                           cfg.kto_undesirable_weight)
    if not check:
        log.warning("kto: %s", check.message)
    info.update(train_examples=len(train), held_out_examples=len(held), desirable=report.desirable,
                undesirable=report.undesirable, truncated_rows=report.truncated)
    return train, held, info


# ---------------------------------------------------------------------------------------------------- losses
@torch.no_grad()
def kl_reference_point(run: Run, model: Any, data: KTOSplit, chunks: list[list[int]], refs: list[torch.Tensor],
                       pad_id: int) -> torch.Tensor:
    """KTO's z₀ before clamping: mean of log π − log π_ref over the mismatched pairs of every micro-batch on every
    process. No gradient flows through z₀ (arXiv 2402.01306), so the policy side runs under no_grad, in the
    model's current mode."""
    total = torch.zeros((), dtype=torch.float64)
    for idx, ref in zip(chunks, refs):
        batch = to_device(data.collate_kl(idx, pad_id), run.accelerator.device)
        with run.accelerator.autocast():
            logps, _ = sequence_logprobs(model, batch)  # (B,)
        total += (logps.float() - ref[:, 1]).double().sum().cpu()
    count = run.all_sum(sum(len(idx) for idx in chunks))
    return (run.all_sum(total) / count.clamp(min=1)).float().cpu()


def kto_terms(model: Any, batch: dict[str, torch.Tensor], ref: torch.Tensor, z0: torch.Tensor, cfg: DPOConfig):
    """Mean KTO loss over the micro-batch's examples, given the step's reference point z0 (a 0-d tensor, before
    clamping). "chosen" in the metric names means desirable and "rejected" undesirable, as in TRL's KTO logs."""
    logps, _ = sequence_logprobs(model, batch)  # (B,)
    desirable = batch["desirable"]  # (B,) bool
    # kto_loss averages kl_policy − kl_ref over what it is given; passing the whole step's mean as one entry makes
    # z₀ the step-wide estimate (the same for every micro-batch, so 1x8 accumulation equals 8x1)
    loss, stats = kto_loss(logps, ref[:, 0], desirable, z0.view(1).to(logps), torch.zeros(1, device=logps.device),
                           beta=cfg.resolved_beta(), desirable_weight=cfg.kto_desirable_weight,
                           undesirable_weight=cfg.kto_undesirable_weight)
    return loss, {
        "loss": stats.losses,
        "rewards/chosen": stats.desirable_rewards,
        "rewards/rejected": stats.undesirable_rewards,
        "logps/chosen": logps[desirable].detach(),
        "logps/rejected": logps[~desirable].detach(),
    }


@torch.no_grad()
def evaluate(run: Run, cfg: DPOConfig, model: Any, held: KTOSplit, reference: Reference,
             pad_id: int) -> dict[str, float]:
    """The step metrics on held-out examples (eval/ prefix), with z₀ estimated over the whole held-out set."""
    was_training = model.training
    model.eval()
    mine = list(range(run.rank, len(held), run.world))
    chunks = [mine[k : k + cfg.eval_batch_size] for k in range(0, len(mine), cfg.eval_batch_size)]
    refs = [reference.logps(model, held, idx) for idx in chunks]
    z0 = kl_reference_point(run, model, held, chunks, refs, pad_id)
    tally = Tally()
    for idx, ref in zip(chunks, refs):
        batch = to_device(held.collate(idx, pad_id), run.accelerator.device)
        with run.accelerator.autocast():
            _, values = kto_terms(model, batch, ref, z0, cfg)
        tally.add(values)
    model.train(was_training)
    return {**tally.means(run, prefix="eval/"), "eval/kl": float(z0.clamp(min=0.0))}


# ------------------------------------------------------------------------------------------------------ main
def main(cfg: DPOConfig) -> dict[str, Any]:
    if cfg.loss != "kto":  # the saved config.yaml must say what was trained, or a resume would switch losses
        raise ConfigError(f"policy.kto.main trains KTO but the config says loss: {cfg.loss}; set loss: kto, or "
                          "call policy.dpo.main for the paired losses.")
    s = start(cfg, load_data, cfg.reference)
    run, model, optimizer, scheduler, sampler = s.run, s.model, s.optimizer, s.scheduler, s.sampler
    train, held, reference = s.train, s.held, s.reference
    device, pad_id = run.accelerator.device, s.tokenizer.pad_token_id
    micro = cfg.batch_size
    last: dict[str, Any] = {}
    for step in range(s.start_step + 1, cfg.max_steps + 1):
        indices = run.shard(sampler.next_indices(micro * cfg.grad_accum * run.world))
        chunks = [indices[k : k + micro] for k in range(0, len(indices), micro)]
        # the loss is a mean over the examples of the whole optimizer step, over all micro-batches and processes,
        # so 1x8 accumulation equals 8x1 and N processes equal one (DDP averages: hence * world)
        step_items = float(run.all_sum(len(indices)))
        refs = [reference.logps(model, train, idx) for idx in chunks]  # (B, 2) each
        z0 = kl_reference_point(run, model, train, chunks, refs, pad_id)
        tally = Tally()
        for k, (idx, ref) in enumerate(zip(chunks, refs)):
            batch = to_device(train.collate(idx, pad_id), device)
            with run.micro_step(model, k, len(chunks)):
                loss, values = kto_terms(model, batch, ref, z0, cfg)
                run.backward(model, loss * (len(idx) / step_items * run.world))
            tally.add(values)
        lr = scheduler.get_last_lr()[0]
        metrics: dict[str, Any] = tally.means(run)
        check_finite({"loss": metrics["loss"]}, step)
        grad_norm = run.step_optimizer(model, optimizer, scheduler, step)
        metrics.update({"kl": float(z0.clamp(min=0.0)), "grad_norm": grad_norm, "lr": lr,
                        "examples": int(step_items), "epoch": round(sampler.epochs_done, 4)})
        if len(held) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            with run.gathered(model):  # each process evaluates its share: any number of forwards
                metrics.update(evaluate(run, cfg, model, held, reference, pad_id))
        run.log(step, metrics, headline=("loss", "rewards/margin", "eval/loss"))
        run.end_step(step, model, optimizer, scheduler, {"sampler": sampler.state_dict()})
        last = metrics

    return finish(cfg, s, cfg.reference, last)
