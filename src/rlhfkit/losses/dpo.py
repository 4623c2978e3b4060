"""Direct preference losses (DPO and its variants), one pure function per variant, each returning typed diagnostics.

Inputs are sequence log-probabilities log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens, shape (B,)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.losses.masked import masked_sum


@dataclass
class PreferenceStats:
    """Diagnostics of one paired preference loss evaluation (all detached)."""

    chosen_rewards: torch.Tensor
    """(B,) implicit reward of the chosen response: β·(log π − log π_ref), or the variant's own reward."""
    rejected_rewards: torch.Tensor
    """(B,) implicit reward of the rejected response, on the same scale as `chosen_rewards`."""
    margins: torch.Tensor
    """(B,) chosen_rewards − rejected_rewards."""
    accuracy: torch.Tensor
    """() fraction of pairs whose chosen reward is strictly greater than the rejected one (a tie counts as wrong)."""
    losses: torch.Tensor
    """(B,) per-pair loss; the returned loss is their mean."""


@dataclass
class ORPOStats(PreferenceStats):
    """PreferenceStats with rewards = log odds of the length-normalised probability, plus ORPO's two terms."""

    nll: torch.Tensor
    """The L_SFT term as passed in (per pair (B,) or a scalar)."""
    odds_ratio_losses: torch.Tensor
    """(B,) −log σ(log odds(y_w) − log odds(y_l)), before the λ weight."""


@dataclass
class KTOStats:
    """Diagnostics of one KTO loss evaluation (all detached). KTO is unpaired, so there is no margin or accuracy."""

    rewards: torch.Tensor
    """(B,) implicit reward β·(log π − log π_ref) of every example."""
    desirable_rewards: torch.Tensor
    """(n_D,) the rewards of the desirable examples."""
    undesirable_rewards: torch.Tensor
    """(n_U,) the rewards of the undesirable examples."""
    kl: torch.Tensor
    """() the reference point z₀: batch estimate of KL(π‖π_ref) from mismatched pairs, clamped ≥ 0."""
    losses: torch.Tensor
    """(B,) per-example λ_y − v(x, y); the returned loss is their mean."""


def sequence_logps(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-prob sums and response lengths from per-token log-probs.

    token_logprobs: (B, T) log π(token_t | tokens_<t); response_mask: (B, T), 1 = response token that counts
    (0 = prompt or padding). Returns (logps (B,), lengths (B,)), lengths in token_logprobs' dtype."""
    mask = response_mask.to(token_logprobs.dtype)  # (B, T)
    logps = masked_sum(token_logprobs, mask, dim=-1)  # (B,)
    lengths = mask.sum(dim=-1)  # (B,)
    return logps, lengths


def _check_same_shape(**tensors: torch.Tensor) -> None:
    # A (B, 1) against a (B,) tensor would broadcast to (B, B) and give a silently wrong loss.
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Preference loss inputs must all have the same shape (B,), got {listing}.")


def _check_lengths(**lengths: torch.Tensor) -> None:
    for name, value in lengths.items():
        if bool((value <= 0).any()):
            raise ValueError(f"{name} has a zero or negative entry: every response needs at least one real token; "
                             "drop empty (or fully truncated) responses from the data.")


def _pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                losses: torch.Tensor) -> PreferenceStats:
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards  # (B,)
    return PreferenceStats(
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracy=(margins > 0).to(losses.dtype).mean(),
        losses=losses.detach(),
    )


def _log_ratios(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    # π_ref is frozen in every paper of this family: never backpropagate into it, even if the caller forgot no_grad.
    chosen_log_ratios = policy_chosen_logps - ref_chosen_logps.detach()  # (B,)
    rejected_log_ratios = policy_rejected_logps - ref_rejected_logps.detach()  # (B,)
    return chosen_log_ratios, rejected_log_ratios


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, PreferenceStats]:
    """DPO: mean over pairs of −log σ(β h), h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)).

    All inputs (B,) sequence log-prob sums. Rewards in the stats are β·(log π − log π_ref)."""
    chosen_log_ratios, rejected_log_ratios = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps)
    h = chosen_log_ratios - rejected_log_ratios  # (B,)
    losses = -F.logsigmoid(beta * h)  # (B,) Eq. 7 of arXiv 2305.18290; logsigmoid stays finite for any gap
    return losses.mean(), _pair_stats(beta * chosen_log_ratios, beta * rejected_log_ratios, losses)


def cdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float | torch.Tensor = 0.1,
) -> tuple[torch.Tensor, PreferenceStats]:
    """Conservative DPO: DPO assuming each preference label is flipped with probability ε = label_smoothing.

    A float ε must lie in [0, 0.5): ε = 0 is plain DPO; ε = 0.5 means the labels carry no information. A (B,)
    tensor gives each pair its own ε in [0, 1] (a soft label, see `confidence_label_smoothing`); above 0.5 the
    pair is more likely reversed than not, and is trained that way."""
    chosen_log_ratios, rejected_log_ratios = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps)
    h = chosen_log_ratios - rejected_log_ratios  # (B,)
    if isinstance(label_smoothing, torch.Tensor):
        _check_same_shape(policy_chosen_logps=policy_chosen_logps, label_smoothing=label_smoothing)
        if not bool(((label_smoothing >= 0) & (label_smoothing <= 1)).all()):  # NaN fails both comparisons
            raise ValueError("a per-pair label_smoothing must lie in [0, 1]: it is the probability that each "
                             "preference label is flipped.")
    elif not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}; it is the assumed "
                         "probability that a preference label is flipped.")
    # one tensor in h's dtype either way, so a float ε and a (B,) tensor of that ε give the same bits
    eps = torch.as_tensor(label_smoothing, dtype=h.dtype, device=h.device)  # () or (B,)
    # Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO": −(1−ε) log σ(βh) − ε log σ(−βh)
    losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)  # (B,)
    return losses.mean(), _pair_stats(beta * chosen_log_ratios, beta * rejected_log_ratios, losses)


def confidence_label_smoothing(confidence: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair flip probabilities ε_i for `cdpo_loss` from each label's confidence c_i (the probability that
    chosen is truly better) and a global ε₀ = label_smoothing: ε_i = (1 − c_i) + ε₀·(2c_i − 1).

    The label is right when c_i holds and cDPO's independent flip does not, or c_i fails and the flip does:
    1 − ε_i = c_i·(1 − ε₀) + (1 − c_i)·ε₀. So c_i = 1 gives ε₀ (cDPO as configured), ε₀ = 0 gives 1 − c_i (the
    soft-label cross-entropy against target c_i), and c_i = 1/2 gives 1/2 whatever ε₀. confidence: (B,) in
    [0, 1]; returns (B,) in its dtype."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}; it is the assumed "
                         "probability that a preference label is flipped.")
    # written as (1 − c) + ε₀(2c − 1), not 1 − [c(1 − ε₀) + (1 − c)ε₀], so that c = 1 gives ε₀ with no rounding
    return (1.0 - confidence) + label_smoothing * (2.0 * confidence - 1.0)  # (B,)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    tau: float = 0.1,
    length_normalize: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PreferenceStats]:
    """IPO: mean over pairs of (h − 1/(2τ))², regressing the log-ratio gap h onto 1/(2τ) instead of pushing it to ∞.

    The paper uses sequence log-prob sums, and so do we by default. TRL instead divides each log-prob by its
    response length; pass length_normalize=True with chosen_lengths and rejected_lengths (B,) to get that form.
    Rewards in the stats are τ·(log-ratio), on whichever scale h uses, so the target reward margin is 1/2."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}; IPO's target gap is 1/(2·tau).")
    chosen_log_ratios, rejected_log_ratios = _log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps)
    if length_normalize:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo_loss(length_normalize=True) needs chosen_lengths and rejected_lengths; "
                             "pass the response lengths from sequence_logps().")
        _check_same_shape(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths,
                          rejected_lengths=rejected_lengths)
        _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        # Departure from the paper (opt-in), matching TRL: per-token average log-ratios.
        chosen_log_ratios = chosen_log_ratios / chosen_lengths.to(chosen_log_ratios.dtype)
        rejected_log_ratios = rejected_log_ratios / rejected_lengths.to(rejected_log_ratios.dtype)
    h = chosen_log_ratios - rejected_log_ratios  # (B,)
    losses = (h - 1.0 / (2.0 * tau)) ** 2  # (B,) Eq. 17 of arXiv 2310.12036
    return losses.mean(), _pair_stats(tau * chosen_log_ratios, tau * rejected_log_ratios, losses)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, PreferenceStats]:
    """SimPO: reference-free, length-normalised DPO with a target margin.

    Mean over pairs of −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ). `gamma` is the margin γ itself, as
    in the paper's Eq. 6, not the authors' code's `gamma_beta_ratio` (which sets γ = β·gamma_beta_ratio): to
    reproduce a config written for their code, pass gamma = beta * gamma_beta_ratio. Rewards in the stats are
    β/|y|·log π(y) (without γ). Lengths (B,) count response tokens and must be ≥ 1."""
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)  # (B,)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)  # (B,) Eq. 6 of arXiv 2405.14734
    return losses.mean(), _pair_stats(chosen_rewards, rejected_rewards, losses)


def _log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) for p = exp(mean_logps), computed without forming 1 − p in floating point.

    log(1 − e^m) for m ≤ 0 uses log(−expm1(m)) near 0 and log1p(−e^m) far from it (Mächler's log1mexp); each branch
    sees only inputs where it is finite, so torch.where does not leak NaN gradients. m = 0 (p = 1) has infinite
    odds: we clamp m to ≤ −eps of its dtype, which caps log odds at about 16 in float32 — a departure from the
    exact formula that only matters once the model already assigns the sequence probability ≈ 1."""
    eps = torch.finfo(mean_logps.dtype).eps
    m = mean_logps.clamp(max=-eps)  # (B,)
    near_zero = m > -0.6931471805599453  # −log 2
    log_one_minus_p = torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, m, torch.full_like(m, -1.0)))),
        torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(m, -1.0), m))),
    )  # (B,)
    return m - log_one_minus_p


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_nll: torch.Tensor,
    lam: float = 0.1,
) -> tuple[torch.Tensor, ORPOStats]:
    """ORPO: L_SFT(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l))), reference-free.

    odds(y) = p/(1 − p), p = exp(log π(y)/|y|) the length-normalised (per-token geometric mean) probability.
    chosen_nll is L_SFT: either per pair (B,) (the paper's −log π(y_w)/|y_w|) or an already-reduced scalar (e.g.
    sft_loss normalised by the step's token count). Rewards in the stats are the log odds, so the margin is the
    log odds ratio and accuracy is the fraction of pairs where the chosen response has the higher per-token
    probability."""
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if chosen_nll.dim() != 0 and tuple(chosen_nll.shape) != tuple(policy_chosen_logps.shape):
        raise ValueError(f"chosen_nll must be a scalar or have shape {tuple(policy_chosen_logps.shape)} like "
                         f"policy_chosen_logps, got {tuple(chosen_nll.shape)}.")
    chosen_log_odds = _log_odds(policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype))  # (B,)
    rejected_log_odds = _log_odds(policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype))  # (B,)
    # arXiv 2403.07691: L_OR = −log σ(log(odds(y_w)/odds(y_l))), L_ORPO = E[L_SFT + λ·L_OR]
    odds_ratio_losses = -F.logsigmoid(chosen_log_odds - rejected_log_odds)  # (B,)
    losses = chosen_nll + lam * odds_ratio_losses  # (B,)
    base = _pair_stats(chosen_log_odds, rejected_log_odds, losses)
    return losses.mean(), ORPOStats(
        chosen_rewards=base.chosen_rewards,
        rejected_rewards=base.rejected_rewards,
        margins=base.margins,
        accuracy=base.accuracy,
        losses=base.losses,
        nll=chosen_nll.detach(),
        odds_ratio_losses=odds_ratio_losses.detach(),
    )


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, KTOStats]:
    """KTO on unpaired examples: mean over examples of λ_y − v(x, y).

    policy_logps, ref_logps: (B,) sequence log-probs of each example's own completion; desirable: (B,) bool,
    True = thumbs-up. kl_policy_logps, kl_ref_logps: (M,) log-probs of mismatched (prompt, another example's
    completion) pairs, used only to estimate the reference point z₀ ≈ KL(π‖π_ref). z₀ is estimated from this call's
    mismatched pairs; pass the whole step's pairs if micro-batches are small (the estimate is noisy)."""
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    _check_same_shape(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    desirable = desirable.bool()
    log_ratios = policy_logps - ref_logps.detach()  # (B,) r = log π(y|x) − log π_ref(y|x)
    # arXiv 2402.01306: z₀ = max(0, mean of mismatched log-ratios), with no gradient through it
    kl = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0.0).detach()  # ()
    # λ_D − λ_D σ(β(r − z₀)) = λ_D σ(−β(r − z₀)); the σ(−·) form keeps precision when σ(·) is close to 1.
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (log_ratios - kl))  # (B,)
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (kl - log_ratios))  # (B,)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # (B,) arXiv 2402.01306, L = E[λ_y − v]
    rewards = (beta * log_ratios).detach()  # (B,)
    return losses.mean(), KTOStats(
        rewards=rewards,
        desirable_rewards=rewards[desirable],
        undesirable_rewards=rewards[~desirable],
        kl=kl,
        losses=losses.detach(),
    )


@dataclass
class KTOWeightCheck:
    """Result of kto_weights_ok; truthy when the weights are in the recommended range."""

    ok: bool
    ratio: float
    """(λ_D·n_D) / (λ_U·n_U); inf when there are no undesirable examples."""
    message: str
    """Empty when ok; otherwise one sentence saying what is wrong and which weights would fix it."""

    def __bool__(self) -> bool:
        return self.ok


def kto_weights_ok(n_desirable: int, n_undesirable: int, wd: float, wu: float) -> KTOWeightCheck:
    """Check KTO's recommendation (arXiv 2402.01306) that (λ_D·n_D) : (λ_U·n_U) lies in [1, 4/3].

    wd, wu are λ_D (desirable_weight) and λ_U (undesirable_weight); n_* count examples of each kind in the data."""
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"Example counts must be non-negative, got n_desirable={n_desirable}, "
                         f"n_undesirable={n_undesirable}.")
    if wd <= 0 or wu <= 0:
        raise ValueError(f"KTO weights must be positive, got desirable_weight={wd}, undesirable_weight={wu}.")
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        ratio = 0.0 if n_desirable == 0 else float("inf")
        return KTOWeightCheck(False, ratio, f"The data has no {missing} examples, so the weighted ratio "
                                            "(λ_D·n_D):(λ_U·n_U) cannot lie in [1, 4/3]; add some.")
    ratio = (wd * n_desirable) / (wu * n_undesirable)
    tol = 1e-9
    if 1.0 - tol <= ratio <= 4.0 / 3.0 + tol:
        return KTOWeightCheck(True, ratio, "")
    low = wu * n_undesirable / n_desirable
    high = 4.0 / 3.0 * low
    side = "below 1" if ratio < 1.0 else "above 4/3"
    return KTOWeightCheck(False, ratio, (
        f"(λ_D·n_D):(λ_U·n_U) = ({wd}·{n_desirable}):({wu}·{n_undesirable}) = {ratio:.3f} is {side}, outside the "
        f"KTO paper's recommended [1, 4/3]; with undesirable_weight={wu}, set desirable_weight between "
        f"{low:.3f} and {high:.3f}."))

