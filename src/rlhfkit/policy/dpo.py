"""Direct preference optimisation (`rlhfkit dpo`): DPO, cDPO, IPO, SimPO and ORPO on preference pairs; no reward
model, no sampling. `--loss kto` (unpaired judgments) is trained by policy/kto.py under the same config. Rows with
a confidence column train dpo and cdpo as soft labels (a per-row cDPO flip probability).

The loop reads top to bottom like sft.py: global batch -> this process's share -> micro-batches (chosen and
rejected in one forward pass) -> loss normalised by the pair count of the whole optimizer step -> one optimizer
step -> log -> checkpoint. The reference log-probs come from policy/reference.py: computed once before training
and cached in the run directory (ref_logps.safetensors), so no reference model is held during training, or with
LoRA and `reference: adapter` the policy with its adapter switched off, computed on the fly."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch

from rlhfkit.data.collate import collate_pairs
from rlhfkit.data.preference import PreferencePair, Ranking, ranking_to_pairs, read_preferences
from rlhfkit.data.preference_tokens import TokenizedPair, tokenize_preferences
from rlhfkit.losses import PreferenceStats, cdpo_loss, dpo_loss, ipo_loss, orpo_loss, simpo_loss
from rlhfkit.losses.dpo import confidence_label_smoothing
from rlhfkit.policy.offline import REFERENCE_FREE, SOFT_LABEL_LOSSES, DPOConfig, Tally, finish, read_records, start
from rlhfkit.policy.reference import REF_CACHE as REF_CACHE  # re-exported: the pipeline and tests read dpo.REF_CACHE
from rlhfkit.policy.reference import Reference, sequence_logprobs, to_device
from rlhfkit.train import Run, check_finite

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------- data
@dataclass
class Split:
    """Training or held-out preference pairs; column 0 of the reference cache is chosen, column 1 rejected."""

    items: list[TokenizedPair]
    ref: torch.Tensor | None = None
    """(N, 2) cached sequence log π_ref of chosen and rejected, when reference: cached."""
    soft: bool = False
    """Whether the pairs' confidence reaches the loss (its batches keep their `confidence` column)."""
    padding_free: bool = False
    """Batches in the packed layout (`collate_pairs(..., padding_free=True)`); sequence n is still n."""
    share_prompt: bool = False
    """With padding_free: each pair's two sequences behind one copy of their prompt (`shared_prefix_batch`) in the
    batches where that costs less (`collate.shared_prefix_pays`)."""
    token_weight: float | None = None
    """The policy's `models.attention_token_weight`, set once it is loaded; None: share in every batch."""
    layout: ClassVar[str] = "pairs"

    def __len__(self) -> int:
        return len(self.items)

    def collate(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """(2B, T): chosen rows then rejected rows, in one batch so both go through one forward pass; with soft,
        also confidence (B,)."""
        batch = collate_pairs([self.items[i] for i in idx], pad_id, self.padding_free, self.share_prompt,
                              self.token_weight)
        if not self.soft:
            del batch["confidence"]
        return batch

    collate_both = collate

    def sequences(self) -> Iterator[tuple[list[int], list[int]]]:
        for item in self.items:
            yield item.chosen_input_ids, item.chosen_response_mask
            yield item.rejected_input_ids, item.rejected_response_mask


def _expand(records: list[Any]) -> list[PreferencePair]:
    return [p for r in records for p in (ranking_to_pairs(r) if isinstance(r, Ranking) else [r])]


def load_data(cfg: DPOConfig, tokenizer: Any) -> tuple[Split, Split, dict[str, Any]]:
    """Training and held-out pairs; K-way rankings are expanded into their pairs after the split. The training
    pairs train on their confidence when the data has one (see DPOConfig.use_confidence); held-out pairs are
    evaluated as certain, so runs with and without confidence report comparable held-out numbers."""
    records, held_records, info = read_records(cfg, tokenizer, read_preferences)
    train_pairs, report = tokenize_preferences(tokenizer, _expand(records), cfg.max_length, cfg.overlong)
    held_pairs = tokenize_preferences(tokenizer, _expand(held_records), cfg.max_length, cfg.overlong)[0]
    info.update(train_pairs=len(train_pairs), held_out_pairs=len(held_pairs), truncated_rows=report.truncated)
    soft = bool(info.get("confidence_rows")) and any(p.confidence is not None for p in train_pairs)
    return (Split(train_pairs, soft=soft, padding_free=cfg.padding_free, share_prompt=cfg.share_prompt),
            Split(held_pairs, padding_free=cfg.padding_free, share_prompt=cfg.share_prompt), info)


# ---------------------------------------------------------------------------------------------------- losses
@dataclass
class PairLogps:
    """One micro-batch's sequence log-probs, split into chosen and rejected. All (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    confidence: torch.Tensor | None = None
    """Probability that each label is right (a soft target, for SOFT_LABEL_LOSSES only); None: every label is
    certain."""


PairLoss = Callable[[PairLogps, DPOConfig], tuple[torch.Tensor, PreferenceStats]]

PAIR_LOSSES: dict[str, PairLoss] = {
    # a soft label c makes DPO the cross-entropy against target c: cDPO with a per-pair flip probability 1 - c
    "dpo": lambda s, cfg: (
        dpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=cfg.resolved_beta())
        if s.confidence is None else
        cdpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=cfg.resolved_beta(),
                  label_smoothing=confidence_label_smoothing(s.confidence))),
    "cdpo": lambda s, cfg: cdpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=cfg.resolved_beta(),
                                     label_smoothing=cfg.label_smoothing if s.confidence is None else
                                     confidence_label_smoothing(s.confidence, cfg.label_smoothing)),
    "ipo": lambda s, cfg: ipo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, tau=cfg.tau),
    "simpo": lambda s, cfg: simpo_loss(s.chosen, s.rejected, s.chosen_lengths, s.rejected_lengths,
                                       beta=cfg.resolved_beta(), gamma=cfg.simpo_gamma),
    # ORPO's L_SFT per pair: the chosen response's mean token NLL, −log π(y_w)/|y_w| (arXiv 2403.07691 Eq. 6)
    "orpo": lambda s, cfg: orpo_loss(s.chosen, s.rejected, s.chosen_lengths, s.rejected_lengths,
                                     chosen_nll=-s.chosen / s.chosen_lengths, lam=cfg.orpo_lambda),
}
"""The one name -> paired loss table, at the config edge: a new paired variant is a function in losses/dpo.py and
an entry here (plus its name in DPOConfig.loss). KTO is not here: its data is unpaired and policy/kto.py trains it."""


def pair_loss(cfg: DPOConfig) -> Callable[[PairLogps], tuple[torch.Tensor, PreferenceStats]]:
    """The paired loss cfg.loss names, with cfg's hyperparameters bound. Given pairs with a confidence, a loss
    outside SOFT_LABEL_LOSSES raises instead of ignoring it (the data reader refuses such files first)."""
    loss = PAIR_LOSSES[cfg.loss]
    if cfg.loss in SOFT_LABEL_LOSSES:
        return functools.partial(loss, cfg=cfg)

    def hard_only(s: PairLogps) -> tuple[torch.Tensor, PreferenceStats]:
        if s.confidence is not None:
            raise ValueError(f"loss {cfg.loss} has no soft target for a confidence; only {SOFT_LABEL_LOSSES} do.")
        return loss(s, cfg)

    return hard_only


def paired_terms(model: Any, batch: dict[str, torch.Tensor], ref: torch.Tensor | None,
                 loss_fn: Callable[[PairLogps], tuple[torch.Tensor, PreferenceStats]]):
    """Mean loss over the micro-batch's pairs (chosen and rejected in one forward pass) and per-pair values for
    the step's metrics. ref: (B, 2) log π_ref of chosen and rejected, or None. The batch's confidence (B,), when
    it has one (`Split.soft`), is each pair's soft label."""
    logps, lengths = sequence_logprobs(model, batch)  # (2B,), (2B,)
    B = batch["margin"].shape[0]
    s = PairLogps(logps[:B], logps[B:], lengths[:B], lengths[B:],
                  None if ref is None else ref[:, 0], None if ref is None else ref[:, 1], batch.get("confidence"))
    loss, stats = loss_fn(s)
    return loss, {
        "loss": stats.losses,
        "rewards/chosen": stats.chosen_rewards,
        "rewards/rejected": stats.rejected_rewards,
        "rewards/accuracy": (stats.margins > 0).float(),
        "logps/chosen": s.chosen.detach(),
        "logps/rejected": s.rejected.detach(),
    }


@torch.no_grad()
def evaluate(run: Run, cfg: DPOConfig, model: Any, held: Split, reference: Reference,
             pad_id: int) -> dict[str, float]:
    """The step metrics on held-out pairs (eval/ prefix), summed over every process's share."""
    was_training = model.training
    model.eval()
    mine = list(range(run.rank, len(held), run.world))
    chunks = [mine[k : k + cfg.eval_batch_size] for k in range(0, len(mine), cfg.eval_batch_size)]
    refs = [reference.logps(model, held, idx) for idx in chunks]
    tally = Tally()
    loss_fn = pair_loss(cfg)
    for idx, ref in zip(chunks, refs):
        batch = to_device(held.collate(idx, pad_id), run.accelerator.device)
        with run.accelerator.autocast():
            _, values = paired_terms(model, batch, ref, loss_fn)
        tally.add(values)
    model.train(was_training)
    return tally.means(run, prefix="eval/")


# ------------------------------------------------------------------------------------------------------ main
def main(cfg: DPOConfig) -> dict[str, Any]:
    if cfg.loss == "kto":  # unpaired data and its own loop; `rlhfkit dpo --loss kto` stays the user's command
        from rlhfkit.policy import kto

        return kto.main(cfg)
    ref_kind: Literal["cached", "adapter", "none"] = "none" if cfg.loss in REFERENCE_FREE else cfg.reference
    s = start(cfg, load_data, ref_kind)
    run, model, optimizer, scheduler, sampler = s.run, s.model, s.optimizer, s.scheduler, s.sampler
    train, held, reference = s.train, s.held, s.reference
    device, pad_id = run.accelerator.device, s.tokenizer.pad_token_id
    loss_fn = pair_loss(cfg)
    micro = cfg.batch_size
    last: dict[str, Any] = {}
    for step in range(s.start_step + 1, cfg.max_steps + 1):
        indices = run.shard(sampler.next_indices(micro * cfg.grad_accum * run.world))
        chunks = [indices[k : k + micro] for k in range(0, len(indices), micro)]
        # the loss is a mean over the pairs of the whole optimizer step, over all micro-batches and processes, so
        # 1x8 accumulation equals 8x1 and N processes equal one (DDP averages: hence * world)
        step_items = float(run.all_sum(len(indices)))
        refs = [reference.logps(model, train, idx) for idx in chunks]  # (B, 2) each, or None
        tally = Tally()
        for k, (idx, ref) in enumerate(zip(chunks, refs)):
            batch = to_device(train.collate(idx, pad_id), device)
            with run.micro_step(model, k, len(chunks)):
                loss, values = paired_terms(model, batch, ref, loss_fn)
                run.backward(model, loss * (len(idx) / step_items * run.world))
            tally.add(values)
        lr = scheduler.get_last_lr()[0]
        metrics: dict[str, Any] = tally.means(run)
        check_finite({"loss": metrics["loss"]}, step)
        grad_norm = run.step_optimizer(model, optimizer, scheduler, step)
        metrics.update({"grad_norm": grad_norm, "lr": lr, "pairs": int(step_items),
                        "epoch": round(sampler.epochs_done, 4)})
        if len(held) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            with run.gathered(model):  # each process evaluates its share: any number of forwards
                metrics.update(evaluate(run, cfg, model, held, reference, pad_id))
        run.log(step, metrics, headline=("loss", "rewards/margin", "eval/loss"))
        run.end_step(step, model, optimizer, scheduler, {"sampler": sampler.state_dict()})
        last = metrics

    return finish(cfg, s, ref_kind, last)
