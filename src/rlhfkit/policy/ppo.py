"""PPO against a learned reward (`rlhfkit ppo`), the lm-human-preferences way, plus the critic-free GRPO, RLOO
and REINFORCE estimators in the same loop.

One step is six named phases, called in order by `main`: `rollout` (left-padded prompts, temperature sampling)
-> `score` (reward model at the last real token, reference log-probs) -> `advantages` (per-token KL penalty, then
the estimator the config names, from ADVANTAGE_ESTIMATORS) -> `update` (several epochs of clipped updates over
minibatches) -> `control_kl` (the KL controller) and `monitor` (held-out judge, over-optimisation monitor) -> log
and checkpoint.
Each of "The N Implementation Details of RLHF with PPO" (Huang et al. 2023) is named where it is implemented."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from rlhfkit.config import TrainConfig
from rlhfkit.data.readers import read_prompts
from rlhfkit.errors import ConfigError
from rlhfkit.losses import masked_mean
from rlhfkit.eval.overopt import OveroptimisationMonitor, mean_se
from rlhfkit.losses.advantages import (
    KLController, gae, grpo_advantages, kl_loss, kl_penalised_rewards, reinforce_advantages, rloo_advantages,
    whiten_advantages,
)
from rlhfkit.losses.masked import aggregate
from rlhfkit.losses.ppo import ppo_policy_loss, ppo_value_loss
from rlhfkit.generation import Rollout, sample
from rlhfkit.models import load_causal_lm, load_tokenizer, logprobs_of, position_ids_from_mask
from rlhfkit.reward.combine import CombineConfig, RewardSet, load_reward_set, read_risky_flags
from rlhfkit.reward.model import load_reward_ensemble, score_texts
from rlhfkit.train import Run, check_finite, sharding, zero

log = logging.getLogger(__name__)

# With one epoch over one minibatch, reuse the training forward for the old log-probs (tests switch it off to
# check that both paths take the same step).
FUSE_SINGLE_PASS = True


@dataclass
class PPOConfig(TrainConfig, CombineConfig):
    """Online RL from a reward model (or several, one per criterion, combined): PPO with a value head, or GRPO /
    RLOO / REINFORCE without one."""

    learning_rate: float = 1e-5
    """Peak learning rate (lm-human-preferences: 1e-5, annealed linearly to 0)."""
    batch_size: int = 16
    """Prompts per rollout step on each process (each sampled samples_per_prompt times)."""
    reward_model: str = ""
    """Reward model (or ensemble) directory written by `rlhfkit reward`."""
    ref_model: str = ""
    """Reference policy for the KL penalty (default: --model). With LoRA the adapter-disabled policy is used."""
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce"] = "gae"
    """Advantage estimator: PPO's GAE with a value head, or a critic-free one over the samples of a prompt:
    grpo (Shao et al. 2024: group mean and std), dr_grpo (Liu et al. 2025: group mean only, and by default the
    constant loss normaliser), rloo (Ahmadian et al. 2024: leave-one-out mean), reinforce (batch-mean baseline)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (GRPO and RLOO need at least 2)."""
    max_new_tokens: int = 48
    """Longest response."""
    temperature: float = 0.7
    """Sampling temperature; training log-probs divide the logits by it too."""
    top_p: float = 1.0
    """Nucleus sampling; keep 1.0 for PPO (top-p makes the sampler differ from the policy being trained)."""
    sampler: Literal["auto", "hf", "static"] = "auto"
    """Rollout backend: our static-KV-cache decode loop, Hugging Face generate, or auto (static where supported)."""
    compile_sampler: bool = False
    """torch.compile the static loop's one-token decode step (CUDA graphs on a GPU; compiles once, ~1 min)."""
    frozen_models: Literal["auto", "shard", "replicate"] = "auto"
    """Under FSDP or ZeRO-3 (`sharding`): `auto` and `shard` shard the reference and reward models over the
    processes as the policy is (forward only, one layer gathered at a time; under DeepSpeed, ZeRO-3 inference);
    `replicate` keeps a full copy on every process (more memory, no all-gathers). Under ZeRO-2, whose policy
    weights are replicated, `auto` replicates them too and `shard` partitions them (ZeRO-3 inference).
    Unsharded runs replicate them."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    minibatches: int = 1
    """Minibatches per pass (lm-human-preferences: 1)."""
    clip: float = 0.2
    """Policy ratio clip epsilon."""
    target_kl: float = 0.0
    """Stop this step's remaining epochs once a minibatch's approximate KL(old || new) exceeds 1.5 x target_kl
    (OpenAI Spinning Up's PPO early stopping); 0 = never. Guards against the rare update that moves a small
    policy far in one step."""
    value_clip: float = 0.2
    """Value clip epsilon."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Initial coefficient beta of the per-token KL penalty."""
    adaptive_kl: bool = False
    """Adapt beta toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (nats per sequence) of the adaptive controller."""
    kl_horizon: int = 10_000
    """Horizon of the adaptive controller, in samples."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference acts: "reward" subtracts kl_coef x KL_t from each token's reward (Ziegler et
    al. 2019; InstructGPT); "loss" adds kl_coef x KL_t to the policy loss with its gradient (the GRPO paper), the
    reward then holds the score alone."""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """Per-token KL estimator (Schulman, "Approximating KL divergence"). In the reward only k1 is correct (k2 / k3
    as a detached reward push the policy away from the reference); in the loss k2 or k3 (k1's expected gradient
    there is zero). auto: k1 in the reward, k3 in the loss."""
    missing_eos_penalty: float = -1.0
    """Score of a response that never emitted EOS (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation
    details of RLHF with PPO"), or the reward model's own score of it where that is lower: never a lift. A fixed
    score alone would reward running past the token budget whenever finished answers score below it -- e.g. under
    a reward model whose likelihood term grows more negative with every token."""
    ensemble_penalty: float = 0.0
    """lambda in score = mean - lambda * std over the reward ensemble (Coste et al. 2023)."""
    length_penalty: float = 0.0
    """Score minus this times the response length in tokens."""
    whiten: bool | None = None
    """Whiten advantages over the batch's tokens (mean 0, std 1). Default (None): as each estimator was published
    -- on for gae (N implementation details), off for the critic-free ones, whose group-relative advantages are
    already centred per prompt (re-whitening shifts them by a length-weighted batch mean, so a group with equal
    rewards gets non-zero advantages and signs can flip within a group)."""
    loss_aggregation: Literal["auto", "token_mean", "sequence_mean", "constant"] = "auto"
    """How per-token policy losses are reduced: token_mean (every real token of the minibatch weighs the same),
    sequence_mean (per-response mean, then over responses: the GRPO paper's form), constant (sum / (responses x
    max_new_tokens): Dr. GRPO). auto: constant for dr_grpo, token_mean otherwise."""
    judge_reward_model: str = ""
    """A held-out reward model (e.g. trained on other annotators) scored beside the proxy every eval_every steps
    to watch for over-optimisation; the playground demo passes its gold judge instead."""
    eval_prompts: str = ""
    """Held-out prompts (rows with "prompt" or "text") answered every eval_every steps: their proxy reward and judge
    score feed the over-optimisation monitor. Empty: the step's own rollouts (a smaller, noisier sample)."""
    eval_samples: int = 64
    """Answers per evaluation: the first eval_samples of eval_prompts, or all of them answered in turn until
    eval_samples answers are drawn when there are fewer (the same prompts with the same sampling seed every time,
    so the curve moves with the policy rather than with the draw, and the monitor compares prompt by prompt)."""
    monitor_window: int = 3
    """Judge evaluations per window of the over-optimisation monitor (compares the last window to the one before)."""
    monitor_z: float = 2.0
    """The judge must fall by more than this many standard errors (from its per-sample spread) between windows."""
    stop_on_overoptimisation: bool = False
    """Stop (saving the model) when the monitor fires, instead of only warning."""

    def validate(self) -> None:
        super().validate()
        if bool(self.reward_model) == bool(self.rewards):
            raise ConfigError("pass --reward-model (a directory written by `rlhfkit reward`) or --rewards "
                              "name=directory,... (one reward model per criterion), exactly one of the two.")
        if self.rewards:
            self.check_combination(list(self.rewards))
        if self.eval_samples < 1:
            raise ConfigError(f"eval_samples must be at least 1, got {self.eval_samples}.")
        if self.advantage in ("grpo", "dr_grpo", "rloo") and self.samples_per_prompt < 2:
            raise ConfigError(f"advantage {self.advantage} compares the samples of a prompt: set "
                              "samples_per_prompt to 2 or more.")
        if self.kl_penalty == "reward" and self.kl_estimator in ("k2", "k3"):
            raise ConfigError(f"kl_estimator {self.kl_estimator} cannot be used in the reward: as a detached "
                              "per-token reward only k1 follows the gradient of KL (k2 / k3 push the policy away "
                              "from the reference); use kl_estimator k1, or kl_penalty loss with k2 or k3.")
        if self.kl_penalty == "loss" and self.kl_estimator == "k1":
            raise ConfigError("kl_estimator k1 cannot be used as a loss term (its expected gradient is zero); use "
                              "k2 or k3 with kl_penalty loss, or kl_penalty reward with k1.")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive for PPO (greedy decoding has no log-probs to train).")
        if (self.batch_size * self.samples_per_prompt) % self.minibatches:
            raise ConfigError("batch_size x samples_per_prompt must split evenly into minibatches.")


def gae_estimator(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, k: int, cfg: "PPOConfig"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GAE over the value head's estimates (gamma = 1, lambda = 0.95 by default): per-token advantages and the
    returns the value loss regresses on."""
    return gae(rewards, values, mask, cfg.gamma, cfg.lam)


def sequence_estimator(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[..., tuple[torch.Tensor, None]]:
    """A critic-free estimator: the sequence reward (score minus the summed KL penalty) gets one advantage from
    `fn(sequence rewards (B,), group size)`, spread over every token of the response; no value loss."""
    def estimate(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, k: int, cfg: "PPOConfig"
                 ) -> tuple[torch.Tensor, None]:
        return fn(rewards.sum(-1), k)[:, None] * mask, None

    return estimate


# the config's `advantage` name -> (rewards (B, R), old values (B, R), response mask (B, R), group size k, cfg)
# -> (advantages (B, R), returns (B, R) or None when there is no critic)
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "gae": gae_estimator,
    "grpo": sequence_estimator(grpo_advantages),
    "dr_grpo": sequence_estimator(lambda r, k: grpo_advantages(r, k, scale=False)),
    "rloo": sequence_estimator(rloo_advantages),
    "reinforce": sequence_estimator(lambda r, k: reinforce_advantages(r, r.mean())),
}


def kl_estimator_of(cfg: PPOConfig) -> str:
    if cfg.kl_estimator != "auto":
        return cfg.kl_estimator
    return "k1" if cfg.kl_penalty == "reward" else "k3"


def whitens(cfg: PPOConfig) -> bool:
    return cfg.advantage == "gae" if cfg.whiten is None else cfg.whiten


def loss_aggregation_of(cfg: PPOConfig) -> str:
    if cfg.loss_aggregation != "auto":
        return cfg.loss_aggregation
    return "constant" if cfg.advantage == "dr_grpo" else "token_mean"


class PolicyWithValue(torch.nn.Module):
    """The policy with a scalar value head on its last hidden state, zero-initialised so early value
    predictions do not disturb the advantages (N implementation details: value head init)."""

    def __init__(self, policy: Any):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @property
    def causal_lm(self) -> Any:  # models.causal_lm_of finds the LM head through this
        return self.policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                use_cache: bool = False, logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, logits_to_keep or T, V), values (B, T))."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=use_cache, logits_to_keep=logits_to_keep)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)  # (B, T)
        return out.logits, values

    def _save_value_head(self, path: Any) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                  str(Path(path) / "value_head.safetensors"))

    def save_pretrained(self, path: Any, **kwargs: Any) -> None:  # checkpoints: policy (or adapter) + head
        self.policy.save_pretrained(path, **kwargs)
        self._save_value_head(path)

    def load_checkpoint_weights(self, path: Path, load_weights: Callable[[Any, Path], None]) -> None:
        from safetensors.torch import load_file

        load_weights(self.policy, path)
        self.value_head.load_state_dict(load_file(str(path / "value_head.safetensors")))

    def export_pretrained(self, path: Path, tokenizer: Any) -> None:
        """The final model: a plain Hugging Face policy (LoRA merged), plus the value head beside it."""
        from rlhfkit.models import save_pretrained

        save_pretrained(self.policy, tokenizer, path)
        self._save_value_head(path)


def sampling_dtype(cfg: PPOConfig) -> torch.dtype | None:
    """Rollouts are computed in the run's mixed precision (a bf16 copy of fp32 master weights, refreshed every
    step), as its forward passes are: sampling in fp32 would make generation, most of an RL step, several times
    slower on a GPU."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)


def response_forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, P: int, temperature: float,
                     entropy: bool = False):
    """Log-probs (B, R), values (B, R) and optionally entropies (B, R) of the response tokens. ids: prompt (P,
    left-padded) + response (R, right-padded). Training logits are divided by the sampling temperature
    (N implementation details), so the ratio compares the distributions actually sampled from. The LM head
    runs only on the response positions (models.logprobs_of)."""
    out, (_, values) = logprobs_of(model, ids, mask, temperature, return_entropy=entropy, start=P - 1,
                                   with_output=True)  # (B, R) [, (B, R)]; values (B, T)
    if entropy:
        lp, ent = out
        return lp, values[:, P - 1 : -1], ent
    return out, values[:, P - 1 : -1]


@torch.no_grad()
def reference_logprobs(ref: Any | None, policy_net: Any, ids: torch.Tensor, mask: torch.Tensor, P: int,
                       temperature: float) -> torch.Tensor:
    """Log-probs under pi_ref: a frozen copy, or (LoRA) the same network with the adapter disabled."""
    if ref is None:
        with policy_net.disable_adapter():
            return logprobs_of(policy_net, ids, mask, temperature, start=P - 1)
    return logprobs_of(ref, ids, mask, temperature, start=P - 1)


@torch.no_grad()
def held_out_scores(policy: Any, tokenizer: Any, reward: Any, judge: Callable[[list[Any], list[str]], list[float]],
                    prompts: list[Any], cfg: PPOConfig, seed: int, risky: list[bool] | None = None
                    ) -> tuple[float, float, float, list[float]]:
    """Mean proxy reward, mean judge score, its standard error, and the judge's mean per prompt, of the policy's
    answers to fixed held-out prompts (cfg.eval_samples answers, the prompts taken in turn). Sampled under a
    forked RNG with a fixed seed: the training RNG stream (and so exact resume) is untouched, and every
    evaluation draws the same noise."""
    asked = [prompts[i % len(prompts)] for i in range(max(cfg.eval_samples, len(prompts)))]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        texts = sample(policy, tokenizer, asked, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, batch_size=len(asked), backend=cfg.sampler,
                       compile=cfg.compile_sampler, dtype=sampling_dtype(cfg)).texts
    if isinstance(reward, RewardSet):  # the combination as it stands (evaluation moves no normaliser)
        flags = [risky[i % len(prompts)] for i in range(len(asked))] if risky else None
        proxy, _ = reward.score_texts(asked, texts, flags)
    else:
        proxy, _ = score_texts(reward, asked, texts)
    scores = list(judge(asked, texts))
    judge_mean, judge_se = mean_se(scores)
    per_prompt = [mean_se(scores[i :: len(prompts)])[0] for i in range(len(prompts))]
    return sum(proxy) / len(proxy), judge_mean, judge_se, per_prompt


# ------------------------------------------------------------------------------------------------- the phases
@dataclass
class Models:
    """What one PPO run holds: the trained policy + value head (prepared by Accelerate; the bare policy until
    `run.begin`), the frozen reference
    (None: the policy's LoRA adapter disabled), the reward ensemble, and the tokenizer they share."""

    model: Any
    ref: Any | None
    reward: Any
    """The reward ensemble of --reward-model (None with --rewards)."""
    tokenizer: Any
    same_vocab: bool
    """The reward model reads the policy's token ids directly (else it re-tokenises the texts)."""
    rewards: RewardSet | None = None
    """The named reward models of --rewards and their combiner."""
    risky: list[bool] | None = None
    """Per training prompt: flagged risky (the gated combination's --gate-field)."""
    sharded_frozen: list[Any] = field(default_factory=list)
    """The reference and reward networks sharded under FSDP or partitioned under DeepSpeed (frozen_models), else
    empty."""

    def frozen_networks(self) -> list[Any]:
        """The reference and every reward model's members, each once."""
        nets = [self.ref] if self.ref is not None else []
        ensembles = list(self.rewards.ensembles.values()) if self.rewards is not None else [self.reward]
        for ensemble in ensembles:
            nets += [n for n in ensemble.members if all(n is not k for k in nets)]
        return nets

    def sharded_rewards(self) -> list[Any]:
        """The sharded reward networks (the reference left out: it never scores texts)."""
        return [n for n in self.sharded_frozen if n is not self.ref]

    def reads_text(self) -> bool:
        """Whether some reward model re-tokenises the responses (another vocabulary): its forwards then depend on
        this process's texts, not only on the batch's shape."""
        return not self.same_vocab if self.rewards is None else not all(self.rewards.same_vocab.values())


@dataclass
class Batch:
    """One step's rollouts and everything computed on them, filled phase by phase. Shapes: B rollouts (prompts x
    samples_per_prompt, groups contiguous), P prompt tokens, R response tokens."""

    prompts: list[Any]
    prompt_index: list[int]  # (B,) each rollout's row in the training prompts
    rollout: Rollout
    ids: torch.Tensor  # (B, P+R) prompt left-padded + response right-padded
    mask: torch.Tensor  # (B, P+R) 1 = real token
    rmask: torch.Tensor  # (B, R) float, 1 = real response token incl. EOS
    P: int
    ended: torch.Tensor | None = None  # (B,) the response has its EOS
    raw_score: torch.Tensor | None = None  # (B,) reward-model score (ensemble mean)
    std: torch.Tensor | None = None  # (B,) ensemble disagreement
    score: torch.Tensor | None = None  # (B,) penalised score the policy is trained on
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    old_logprobs: torch.Tensor | None = None  # (B, R)
    old_values: torch.Tensor | None = None  # (B, R)
    fused: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # single pass: (logprobs, values, entropy)
    rewards: torch.Tensor | None = None  # (B, R) score at the last token, minus the per-token KL penalty
    kl: torch.Tensor | None = None  # (B, R) k1 per token
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R), None without a critic
    reward_metrics: dict[str, float] | None = None  # with --rewards: each reward's mean and the combiner's state


def rollout(run: Run, m: Models, prompts: list[Any], sampler: Any, cfg: PPOConfig) -> Batch:
    """Phase 1: this step's prompts (each samples_per_prompt times, groups contiguous), sampled from the current
    policy at the training temperature from left-padded prompts."""
    device = run.accelerator.device
    net = run.accelerator.unwrap_model(m.model)
    indices = run.shard(sampler.next_indices(cfg.batch_size * run.world))
    step_index = [i for i in indices for _ in range(cfg.samples_per_prompt)]
    step_prompts = [prompts[i] for i in step_index]
    # sharded: the weights gathered for the whole decode (see train.sharding); sampled in their own dtype, as a
    # low-precision copy of a sharded model is not made
    with run.gathered(m.model):
        out = sample(net.policy, m.tokenizer, step_prompts, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(step_prompts),
                     backend=cfg.sampler, compile=cfg.compile_sampler,
                     dtype=None if run.fsdp else sampling_dtype(cfg))
    ids = torch.cat([out.prompt_ids, out.response_ids], 1).to(device)  # (B, P+R)
    mask = torch.cat([out.prompt_mask, out.response_mask], 1).to(device)  # (B, P+R)
    rmask = out.response_mask.to(device).float()  # (B, R), 1 = real response token incl. EOS
    return Batch(step_prompts, step_index, out, ids, mask, rmask, out.prompt_ids.shape[1])


def score(run: Run, m: Models, b: Batch, cfg: PPOConfig, single_pass: bool) -> None:
    """Phase 2: reference log-probs, the reward model's score at the last real token (ensemble mean, minus the
    disagreement and length penalties; responses without EOS at most missing_eos_penalty), and the old log-probs and
    values -- from a no-grad forward, or, in a single pass, from the training forward itself."""
    device = run.accelerator.device
    net = run.accelerator.unwrap_model(m.model)
    # the reference and the reward model run under the policy's autocast (Accelerate wraps only the prepared
    # policy's forward): same precision for log pi and log pi_ref, and no fp32 passes on a GPU in bf16 runs
    with torch.no_grad(), run.accelerator.autocast():
        if not single_pass:
            m.model.eval()
            b.old_logprobs, b.old_values = response_forward(m.model, b.ids, b.mask, b.P, cfg.temperature)
        b.ref_logprobs = reference_logprobs(m.ref, net.policy, b.ids, b.mask, b.P, cfg.temperature)
        # sharded frozen reward models scoring texts are gathered: the number of forwards then depends on this
        # process's texts, and every process must make the same collective calls
        with run.gathered_all(m.sharded_rewards() if m.reads_text() else []):
            mean, std = reward_scores(run, m, b, cfg)
        sharding.release(m.sharded_frozen)
        b.raw_score, b.std = mean.float(), std
        penalised = b.raw_score - cfg.length_penalty * b.rmask.sum(-1)
        if m.rewards is None:
            penalised = penalised - cfg.ensemble_penalty * std.float()
        b.ended = b.rollout.ended.to(device)
        b.score = eos_penalised(penalised, b.ended, cfg.missing_eos_penalty)
    if single_pass:
        # one epoch over one minibatch: the policy that sampled is the one being updated, so the training
        # forward's detached log-probs and values are the "old" ones (TRL's GRPO does the same at
        # num_iterations=1); this saves a no-grad forward of the whole batch. It runs after the reference
        # and reward passes, so their activations and its autograd graph are never held at the same time.
        m.model.train()
        with run.micro_step(m.model, 0, 1):
            b.fused = response_forward(m.model, b.ids, b.mask, b.P, cfg.temperature, entropy=True)
        b.old_logprobs, b.old_values = b.fused[0].detach(), b.fused[1].detach()


def eos_penalised(score: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B,) the score of each response, those that never emitted EOS (ended False) capped at the penalty."""
    return torch.where(ended, score, score.clamp(max=penalty))


def response_mask(b: Batch) -> torch.Tensor:
    """(B, P+R) 1 at the batch's response tokens (EOS included), beside b.ids: what a reward model with a likelihood
    term sums its log-probs over."""
    return torch.cat([torch.zeros_like(b.mask[:, : b.P]), b.rmask.to(b.mask.dtype)], 1)


def reward_scores(run: Run, m: Models, b: Batch, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's reward (B,) and the ensemble's disagreement (B,); with several rewards, their combination
    (b.reward_metrics set) and zero disagreement (each reward's penalty is applied before combining). The
    reward model reads the score at the last real token itself."""
    device = run.accelerator.device
    if m.rewards is not None:  # several: each reward (its ensemble penalty applied), then the combination
        named = m.rewards.named_scores(b.ids, b.mask, b.prompts, b.rollout.texts, cfg.ensemble_penalty,
                                       response_mask(b))
        risky = torch.tensor([m.risky[i] for i in b.prompt_index], dtype=torch.bool, device=device) \
            if m.risky is not None else None
        mean, b.reward_metrics = combine_global(run, m.rewards, named, risky)
        return mean, torch.zeros_like(mean)
    if m.same_vocab:
        return m.reward.mean_std(b.ids, b.mask, response_mask(b))
    mu, sd = score_texts(m.reward, b.prompts, b.rollout.texts)
    return torch.tensor(mu, device=device), torch.tensor(sd, device=device)


def combine_global(run: Run, rewards: RewardSet, named: dict[str, torch.Tensor], risky: torch.Tensor | None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The combiner over the global batch (every process's scores gathered), so its normalisers and multiplier
    see what one process would see at the same global batch and stay identical on every process; returns this
    process's share of the combined reward and the global metrics."""
    if run.world == 1:
        return rewards.combiner(named, risky)
    B = next(iter(named.values())).shape[0]
    gathered = {n: run.accelerator.gather(v.contiguous()) for n, v in named.items()}
    flags = run.accelerator.gather(risky.contiguous()) if risky is not None else None
    combined, metrics = rewards.combiner(gathered, flags)
    rank = run.accelerator.process_index
    return combined[rank * B:(rank + 1) * B], metrics


@torch.no_grad()
def advantages(b: Batch, kl_ctl: KLController, cfg: PPOConfig) -> None:
    """Phase 3: per-token rewards (the score at the last token minus the KL penalty: k1 in the reward, or -- with
    kl_penalty loss -- none here, the KL then entering the policy loss), then advantages from the estimator the
    config names, whitened when asked."""
    reward_kl_coef = kl_ctl.value if cfg.kl_penalty == "reward" else 0.0
    b.rewards, b.kl = kl_penalised_rewards(b.score, b.old_logprobs, b.ref_logprobs, b.rmask, reward_kl_coef)
    b.advantages, b.returns = ADVANTAGE_ESTIMATORS[cfg.advantage](b.rewards, b.old_values, b.rmask,
                                                                 cfg.samples_per_prompt, cfg)
    if whitens(cfg):
        b.advantages = whiten_advantages(b.advantages, b.rmask)


@dataclass
class UpdateResult:
    stats: dict[str, list[float]]
    grad_norm: float
    lr: float
    early_stop: bool


def update(run: Run, m: Models, b: Batch, optimizer: Any, scheduler: Any, step: int, kl_coef: float,
           cfg: PPOConfig) -> UpdateResult:
    """Phase 4: ppo_epochs epochs of clipped policy (and value) updates over minibatches, stopped early once a
    minibatch's approximate KL to the sampling policy exceeds 1.5 x target_kl."""
    device = run.accelerator.device
    model = m.model
    estimator, aggregation = kl_estimator_of(cfg), loss_aggregation_of(cfg)
    model.train()
    B = b.ids.shape[0]
    mb = B // cfg.minibatches
    stats: dict[str, list[float]] = {k_: [] for k_ in ("policy_loss", "value_loss", "clip_frac", "approx_kl",
                                                       "value_clip_frac", "explained_var", "entropy", "kl_loss")}
    grad_norm = 0.0
    lr = scheduler.get_last_lr()[0]
    early_stop = False
    for epoch in range(cfg.ppo_epochs):
        if early_stop:
            break
        order = torch.randperm(B).tolist()  # drawn either way: the RNG stream does not depend on fusing
        if b.fused is not None:
            order = list(range(B))  # the fused forward holds the batch in its own order
        for j in range(cfg.minibatches):
            sel = torch.tensor(order[j * mb : (j + 1) * mb], device=device)
            with run.micro_step(model, 0, 1):
                if b.fused is not None:
                    lp, values, ent = b.fused
                else:
                    lp, values, ent = response_forward(model, b.ids[sel], b.mask[sel], b.P, cfg.temperature,
                                                       entropy=True)
                mask = b.rmask[sel]
                pl, ps = ppo_policy_loss(lp, b.old_logprobs[sel], b.advantages[sel], mask, cfg.clip, aggregation,
                                         cfg.max_new_tokens)
                loss = pl
                if cfg.kl_penalty == "loss":
                    kl_term = aggregate(kl_loss(lp, b.ref_logprobs[sel], mask, estimator), mask, aggregation,
                                        cfg.max_new_tokens)
                    loss = loss + kl_coef * kl_term
                    stats["kl_loss"].append(float(kl_term.detach()))
                if b.returns is not None:
                    vl, vs = ppo_value_loss(values, b.old_values[sel], b.returns[sel], mask, cfg.value_clip)
                    loss = loss + cfg.vf_coef * vl
                    stats["value_loss"].append(float(vl.detach()))
                    stats["value_clip_frac"].append(float(vs.clip_fraction))
                    stats["explained_var"].append(float(vs.explained_variance))
                # Spinning Up's PPO early stop: a minibatch that already sees a policy too far from the one that
                # sampled is not applied, and the rest of this step's epochs are skipped. Every process takes the
                # same decision. Its backward still runs, of a zero loss, so no gradient of it reaches the
                # optimizer (DeepSpeed reduces gradients into its partitions during backward) and sharded
                # engines see every forward's backward.
                stop = bool(cfg.target_kl) and float(
                    run.all_sum(ps.approx_kl.detach().reshape(1)).sum()) / run.world > 1.5 * cfg.target_kl
                run.backward(model, loss * 0.0 if stop else loss)
            stats["policy_loss"].append(float(pl.detach()))
            stats["clip_frac"].append(float(ps.clip_fraction))
            stats["approx_kl"].append(float(ps.approx_kl))
            stats["entropy"].append(float(masked_mean(ent.detach(), mask)))
            if stop:
                run.discard_gradients(model, optimizer)
                early_stop = True
                break
            last_update = epoch == cfg.ppo_epochs - 1 and j == cfg.minibatches - 1
            grad_norm = run.step_optimizer(model, optimizer, scheduler, step, advance_schedule=last_update)
    if early_stop:
        scheduler.step()  # the learning rate anneals once per rollout step, stopped early or not
    return UpdateResult(stats, grad_norm, lr, early_stop)


def control_kl(run: Run, b: Batch, kl_ctl: KLController) -> float:
    """Phase 5a: the KL controller reads this step's mean sequence KL (over every process), which it returns."""
    B = b.ids.shape[0]
    kl_seq = float(run.all_sum(b.kl.sum(-1).sum()) / (B * run.world))
    kl_ctl.update(kl_seq, B * run.world)
    return kl_seq


def step_metrics(run: Run, b: Batch, u: UpdateResult, kl_seq: float, kl_ctl: KLController) -> dict[str, Any]:
    """The step's logged metrics, averaged over every process."""
    B = b.ids.shape[0]
    metrics: dict[str, Any] = {
        "reward/score": float(run.all_sum(b.raw_score.sum()) / (B * run.world)),
        "reward/penalised": float(run.all_sum(b.score.sum()) / (B * run.world)),
        "reward/total": float(run.all_sum(b.rewards.sum()) / (B * run.world)),
        "reward/ensemble_std": float(b.std.float().mean()),
        "kl": kl_seq,
        "kl_coef": kl_ctl.value,
        "response_length": float(b.rmask.sum(-1).mean()),
        "eos_fraction": float(b.ended.float().mean()),
        "early_stopped": float(u.early_stop),
        "lr": u.lr,
        "grad_norm": u.grad_norm,
        **{key: sum(v) / len(v) for key, v in u.stats.items() if v},
    }
    metrics.update(b.reward_metrics or {})  # each named reward and the combiner's state (global already)
    return metrics


@dataclass
class Watch:
    """The held-out judge and the over-optimisation monitor it feeds (judge None: nothing is watched)."""

    judge: Callable[[list[Any], list[str]], list[float]] | None
    prompts: list[Any] | None
    monitor: OveroptimisationMonitor
    flagged: bool = False
    firing: bool = False
    risky: list[bool] | None = None  # per held-out prompt, for a gated combination's proxy


def monitor(run: Run, m: Models, b: Batch, watch: Watch, metrics: dict[str, Any], step: int, cfg: PPOConfig) -> bool:
    """Phase 5b: every eval_every steps the held-out judge scores the policy and the over-optimisation monitor looks
    for the proxy rising while the judge falls (both logged into `metrics`). Returns whether to stop training."""
    evaluate = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps
    if watch.judge is None or not evaluate:
        return False
    if watch.prompts:
        net = run.accelerator.unwrap_model(m.model)
        with run.gathered(m.model), run.gathered_all(m.sharded_rewards()):  # scored from texts
            proxy, metrics["judge/score"], judge_se, per_prompt = held_out_scores(
                net.policy, m.tokenizer, m.rewards or m.reward, watch.judge, watch.prompts, cfg, seed=cfg.seed,
                risky=watch.risky)
        metrics["eval/proxy"] = proxy
    else:  # fresh prompts every step: nothing to pair
        proxy, per_prompt = metrics["reward/score"], None
        metrics["judge/score"], judge_se = mean_se(list(watch.judge(b.prompts, b.rollout.texts)))
    metrics["judge/se"] = judge_se
    stop = False
    firing_now = watch.monitor.update(proxy, metrics["judge/score"], judge_se, per_prompt)
    if firing_now:
        metrics["monitor/overoptimising"] = 1.0
        watch.flagged = True
        stop = cfg.stop_on_overoptimisation
        if not watch.firing or stop:  # said once when it starts (the metric records every evaluation)
            log.warning("step %d: over-optimisation: over the last %d evaluations the held-out judge sits "
                        "more than %g standard errors below its best while the proxy reward is higher; "
                        "raise kl_coef, add ensemble_penalty, or stop here%s", step, cfg.monitor_window,
                        cfg.monitor_z, " (stopping: stop_on_overoptimisation)" if stop else
                        " (monitor/overoptimising in the metrics marks each evaluation that agrees)")
    elif watch.firing:
        log.info("step %d: the over-optimisation monitor no longer fires", step)
    watch.firing = firing_now
    return stop


# ------------------------------------------------------------------------------------------------------ main
def load_models(run: Run, cfg: PPOConfig) -> Models:
    device = run.accelerator.device
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    policy = load_causal_lm(cfg.model, tokenizer, lora=cfg.lora, dropout_off=True)  # dropout off (N details)
    ref = None
    if not (cfg.lora.enabled and not cfg.ref_model):
        ref = load_causal_lm(cfg.ref_model or cfg.model, tokenizer).eval().to(device)
        ref.requires_grad_(False)
        run.maybe_compile(ref)
    if cfg.rewards:
        rewards = load_reward_set(cfg, tokenizer, device)
        risky = read_risky_flags(cfg.data_source(), cfg.gate_field) if cfg.combine == "gated" else None
        return Models(policy, ref, None, tokenizer, False, rewards, risky)
    reward = load_reward_ensemble(cfg.reward_model, device=device)
    same_vocab = reward.tokenizer.get_vocab() == tokenizer.get_vocab()
    return Models(policy, ref, reward, tokenizer, same_vocab)  # the value head is added by main, after the judge


def main(cfg: PPOConfig, judge: Callable[[list[Any], list[str]], list[float]] | None = None) -> dict[str, Any]:
    """judge: optional held-out scorer (prompts, responses) -> scores, logged beside the proxy reward every
    eval_every steps to watch for over-optimisation (the playground passes its gold judge; training code never
    imports it)."""
    run = Run(cfg, stage="ppo")
    prompts = read_prompts(cfg.data_source())
    m = load_models(run, cfg)
    kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    if judge is None and cfg.judge_reward_model:
        held_out = load_reward_ensemble(cfg.judge_reward_model, device=run.accelerator.device)
        judge = lambda ps, rs: score_texts(held_out, ps, rs)[0]  # noqa: E731
    eval_prompts = read_prompts(cfg.data_source(cfg.eval_prompts, held_out=True))[: cfg.eval_samples] \
        if cfg.eval_prompts else None
    watch = Watch(judge, eval_prompts, OveroptimisationMonitor(cfg.monitor_window, cfg.monitor_z))
    if eval_prompts and m.risky is not None:
        watch.risky = read_risky_flags(cfg.data_source(cfg.eval_prompts, held_out=True), cfg.gate_field)[
            : cfg.eval_samples]
    net = PolicyWithValue(m.model)
    if cfg.advantage != "gae":  # critic-free: the value head is not trained (DDP would wait for its gradients)
        net.value_head.requires_grad_(False)
    m.model, optimizer, scheduler, sampler, start_step = run.begin(net, len(prompts))
    if run.fsdp and cfg.frozen_models != "replicate":
        m.sharded_frozen = m.frozen_networks()
        for frozen in m.sharded_frozen:
            sharding.shard(frozen, run.world, run.accelerator.device)
        log.info("frozen_models: %d frozen networks (reference, reward models) sharded over %d processes",
                 len(m.sharded_frozen), run.world)
    elif (run.zero == 3 and cfg.frozen_models != "replicate") or (run.zero and cfg.frozen_models == "shard"):
        m.sharded_frozen = m.frozen_networks()
        zero.shard_frozen(m.sharded_frozen)
        log.info("frozen_models: %d frozen networks (reference, reward models) partitioned over %d processes "
                 "(ZeRO-3)", len(m.sharded_frozen), run.world)
    if run.resumed_state is not None:
        kl_ctl.load_state_dict(run.resumed_state["kl_controller"])
        watch.monitor.load_state_dict(run.resumed_state["monitor"])
        if m.rewards is not None:
            m.rewards.combiner.load_state_dict(run.resumed_state["combiner"])
    single_pass = FUSE_SINGLE_PASS and cfg.ppo_epochs == 1 and cfg.minibatches == 1
    last: dict[str, Any] = {}
    step_done = start_step
    for step in range(start_step + 1, cfg.max_steps + 1):
        batch = rollout(run, m, prompts, sampler, cfg)
        score(run, m, batch, cfg, single_pass)
        advantages(batch, kl_ctl, cfg)
        result = update(run, m, batch, optimizer, scheduler, step, kl_ctl.value, cfg)
        kl_seq = control_kl(run, batch, kl_ctl)
        metrics = step_metrics(run, batch, result, kl_seq, kl_ctl)
        stop = monitor(run, m, batch, watch, metrics, step, cfg)
        # ---- log and checkpoint
        check_finite(metrics, step)
        run.log(step, metrics, headline=("reward/score", "kl", "judge/score"))
        state = {"sampler": sampler.state_dict(), "kl_controller": kl_ctl.state_dict(),
                 "monitor": watch.monitor.state_dict()}
        if m.rewards is not None:
            state["combiner"] = m.rewards.combiner.state_dict()
        run.end_step(step, m.model, optimizer, scheduler, state)
        last, step_done = metrics, step
        if stop:
            break
    summary = {"stage": "ppo", "steps": step_done, "advantage": cfg.advantage,
               "overoptimisation_flagged": watch.flagged,
               **{k_: last.get(k_) for k_ in ("reward/score", "kl", "kl_coef", "judge/score", "response_length")}}
    if m.rewards is not None:
        summary["combine"] = cfg.combine
        summary.update({k_: v for k_, v in last.items()
                        if k_.startswith("combine/") or k_.removeprefix("reward/") in m.rewards.ensembles})
    run.finish(m.model, m.tokenizer, summary)
    return summary
