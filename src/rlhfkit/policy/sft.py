"""Supervised fine-tuning (`rlhfkit sft`): next-token loss on completion tokens only.

The loop reads top to bottom: global batch -> this process's share -> micro-batches -> loss normalised by the
token count of the whole optimizer step -> one optimizer step -> log -> checkpoint."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhfkit.config import TrainConfig
from rlhfkit.data.collate import collate_packed, collate_sft, pack_examples
from rlhfkit.data.readers import split_eval
from rlhfkit.data.sft import SFTExample, read_sft_examples
from rlhfkit.errors import ConfigError
from rlhfkit.losses import sft_loss
from rlhfkit.models import load_causal_lm, load_tokenizer, logprobs_of
from rlhfkit.train import Run, check_finite

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations."""

    eval_data: str = ""
    """Held-out data file; when empty, eval_fraction of --data is held out (deterministically, by seed)."""
    eval_fraction: float = 0.05
    """Fraction of --data held out for evaluation when eval_data is empty (0 disables; needs 20+ rows)."""
    eval_batch_size: int = 32
    """Examples per evaluation forward pass."""
    max_length: int = 512
    """Longest tokenised example (prompt + completion) allowed."""
    overlong: Literal["error", "truncate"] = "error"
    """What to do with an example longer than max_length: stop with an error naming the row, or cut it and
    report how many were cut."""
    packing: bool = False
    """Lay several short examples end to end in one row of max_length (block-diagonal attention keeps them
    independent); saves padding compute. A batch is then batch_size such rows."""
    padding_free: bool = True
    """Without packing: lay each micro-batch's examples end to end in as few rows as fit its longest example
    (block-diagonal attention, positions restarting per example). The same batches, loss and gradients as
    padding, with less arithmetic spent on padding."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}.")


def collate_padding_free(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch in rows as wide as its longest example, packed first-fit decreasing (collate_packed's
    layout); the padded layout when packing would save no row."""
    return collate_sft(examples, pad_id, padding_free=True)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def token_nll(model: Any, batch: dict[str, torch.Tensor], num_tokens: torch.Tensor | None = None):
    """Loss and stats for one (micro-)batch; batch from collate_sft or collate_packed."""
    loss_mask = batch["loss_mask"][:, 1:]  # (B, T-1): the LM head runs on these positions only
    logprobs = logprobs_of(model, batch["input_ids"], batch["attention_mask"],
                           position_ids=batch.get("position_ids"), keep=loss_mask)  # (B, T-1)
    return sft_loss(logprobs, loss_mask, num_tokens)


@torch.no_grad()
def evaluate(run: Run, model: Any, examples: list[SFTExample], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean token NLL and perplexity on held-out examples, summed over every process's share."""
    was_training = model.training
    model.eval()
    mine = examples[run.rank :: run.world]
    nll = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        batch = _to(collate_sft(mine[start : start + batch_size], pad_id), run.accelerator.device)
        with run.accelerator.autocast():
            _, stats = token_nll(model, batch)
        nll += stats.nll_sum.double().cpu()
        count += stats.num_tokens.double().cpu()
    total_nll, total = run.all_sum(nll), run.all_sum(count)
    model.train(was_training)
    loss = float(total_nll / total.clamp(min=1))
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": int(total)}


def main(cfg: SFTConfig) -> dict[str, Any]:
    run = Run(cfg, stage="sft")
    device = run.accelerator.device
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    examples, report = read_sft_examples(cfg.data_source(), tokenizer, cfg.max_length, cfg.overlong)
    if cfg.eval_data:
        held_out = read_sft_examples(cfg.data_source(cfg.eval_data, True), tokenizer, cfg.max_length, cfg.overlong)[0]
        train = examples
    else:
        train, held_out = split_eval(examples, cfg.eval_fraction, cfg.seed)
    units: list[Any] = pack_examples(train, cfg.max_length) if cfg.packing else train
    collate = collate_packed if cfg.packing else collate_padding_free if cfg.padding_free else collate_sft
    log.info("sft: %d training rows (%d batch units), %d held out, %d truncated", len(train), len(units),
             len(held_out), report.truncated)

    model = load_causal_lm(cfg.model, tokenizer, lora=cfg.lora, dropout_off=cfg.dropout_off)
    model, optimizer, scheduler, sampler, start_step = run.begin(model, len(units))
    micro = cfg.batch_size
    last: dict[str, Any] = {}
    for step in range(start_step + 1, cfg.max_steps + 1):
        indices = run.shard(sampler.next_indices(micro * cfg.grad_accum * run.world))
        batches = [collate([units[i] for i in indices[k : k + micro]], tokenizer.pad_token_id)
                   for k in range(0, len(indices), micro)]
        # normalise by the loss tokens of the whole optimizer step, over all micro-batches and processes,
        # so 1x8 accumulation equals 8x1 and N processes equal one (DDP averages gradients: hence * world)
        step_tokens = run.all_sum(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches))
        nll_sum = torch.zeros((), dtype=torch.float64)
        for k, batch in enumerate(batches):
            with run.micro_step(model, k, len(batches)):
                loss, stats = token_nll(model, _to(batch, device), step_tokens.to(torch.float32))
                run.backward(model, loss * run.world)
            nll_sum += stats.nll_sum.double().cpu()
        lr = scheduler.get_last_lr()[0]
        loss_value = float(run.all_sum(nll_sum) / step_tokens.clamp(min=1))
        check_finite({"loss": loss_value}, step)
        grad_norm = run.step_optimizer(model, optimizer, scheduler, step)
        metrics: dict[str, Any] = {
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": int(step_tokens),
            "epoch": round(sampler.epochs_done, 4),
        }
        if held_out and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            with run.gathered(model):  # each process evaluates its share: any number of forwards
                metrics.update(evaluate(run, model, held_out, tokenizer.pad_token_id, cfg.eval_batch_size))
        run.log(step, metrics, headline=("loss", "eval/loss"))
        run.end_step(step, model, optimizer, scheduler, {"sampler": sampler.state_dict()})
        last = metrics

    summary = {
        "stage": "sft",
        "steps": cfg.max_steps,
        "train_rows": len(train),
        "held_out_rows": len(held_out),
        "truncated_rows": report.truncated,
        "final_loss": last.get("loss"),
        "eval_loss": last.get("eval/loss"),
    }
    run.finish(model, tokenizer, summary)
    return summary
