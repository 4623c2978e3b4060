"""Batches. Two layouts of a list of token sequences, right-padded and packed (padding-free: several sequences end
to end in a row, a block-diagonal mask keeping them apart), one bin-packing rule (first fit) deciding which
sequences share a row, and the collate functions of SFT examples, preference pairs and rankings, KTO completions
and responses to score, each a view of those layouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhfkit.data.preference_tokens import apply_overlong, encode_prompt_responses, prompt_response_sequence
from rlhfkit.data.rows import Text

if TYPE_CHECKING:
    from rlhfkit.data.kto import TokenizedCompletion
    from rlhfkit.data.preference_tokens import TokenizedPair, TokenizedRanking
    from rlhfkit.data.sft import SFTExample


# ------------------------------------------------------------------------------------------------------ packing
def first_fit(lengths: list[int], width: int, order: list[int] | None = None) -> list[list[int]]:
    """First-fit bin packing of sequences (by index) into rows of at most `width` tokens: taken in `order`
    (default: as given), each goes into the first row with room for it, else starts a new row. Each row's
    indices are in the order they are laid out; a sequence longer than width gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in range(len(lengths)) if order is None else order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """The padding-free rows of one batch: first fit, longest first (first-fit decreasing), into rows no wider
    than the longest sequence. Rows are as wide as padding would make them, so attention costs what it costs
    padded while the padding's share of the linear layers is mostly gone."""
    return first_fit(lengths, max(lengths), sorted(range(len(lengths)), key=lambda i: -lengths[i]))


def block_diagonal_mask(segment: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
    """Additive attention mask (R, 1, T, T) for packed rows: 0 where query t may attend key s (same sequence,
    s <= t), the float32 minimum elsewhere. segment: (R, T) index of the sequence at each position, -1 = padding.
    tail (shared prefixes, `shared_prefix_batch`): (R, T) which member of the segment's group a position belongs
    to, -1 for the group's shared prefix; a key in one member's tail is then hidden from every other member.

    Additive, not boolean: transformers hands a 4-D mask to the attention kernel as it is, and eager attention
    *adds* it to the scores, so a boolean mask there adds 1 / 0 and lets packed sequences see each other (sdpa
    reads a boolean mask as "may attend"; an additive float mask means the same thing to both). Padding attends
    to itself, so no softmax row is fully masked."""
    T = segment.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=segment.device))  # (T, T)
    allowed = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0) & causal  # (R, T, T)
    if tail is not None:
        allowed &= (tail[:, None, :] < 0) | (tail[:, :, None] == tail[:, None, :])
    allowed |= torch.eye(T, dtype=torch.bool, device=segment.device)
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=segment.device)
    return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]  # (R, 1, T, T)


# ------------------------------------------------------------------------------------------------------ layouts
def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """(N, T) long tensor of the sequences, right-padded with value to the longest."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)  # (N, T)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def padded_batch(input_ids: list[list[int]], pad_id: int, **masks: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of N sequences. masks: per-token 0/1 lists, one per sequence (loss_mask,
    response_mask), laid out beside the ids with 0 on padding.

    Returns input_ids, attention_mask (1 = real token), each of masks: (N, T); last_index: (N,) index of each
    sequence's last real token."""
    lengths = torch.tensor([len(s) for s in input_ids], dtype=torch.long)  # (N,)
    batch = {"input_ids": pad(input_ids, pad_id),  # (N, T), right-padded
             "attention_mask": pad([[1] * len(s) for s in input_ids], 0)}  # (N, T), 1 = real token
    batch.update({name: pad(mask, 0) for name, mask in masks.items()})  # (N, T) each
    # the reward is read here: the last real token (EOS unless truncated), never a pad (trl#3750, trl#937);
    # taken from the lengths, so it is right even when pad_id equals the EOS id
    batch["last_index"] = lengths - 1  # (N,)
    return batch


def packed_batch(input_ids: list[list[int]], rows: list[list[int]], pad_id: int,
                 **masks: list[list[int]]) -> dict[str, torch.Tensor]:
    """Padding-free batch: sequence n laid out in the row `rows` puts it in (after the ones before it there),
    in R = len(rows) rows as wide as the widest, each attending only to itself (block-diagonal causal mask) with
    positions restarting at 0, so every sequence's hidden states equal those of the padded layout. masks as in
    `padded_batch`.

    Returns input_ids, position_ids, each of masks: (R, T); attention_mask: (R, 1, T, T) additive float, 0 = may
    attend (`block_diagonal_mask`); row_index, last_index: (N,) row and column of sequence n's last token;
    segment: (R, T) index of the sequence at each position, -1 on padding."""
    width = max(sum(len(input_ids[n]) for n in members) for members in rows)
    R = len(rows)
    ids = torch.full((R, width), pad_id, dtype=torch.long)  # (R, T)
    laid = {name: torch.zeros((R, width), dtype=torch.long) for name in masks}  # (R, T) each
    positions = torch.zeros((R, width), dtype=torch.long)  # (R, T)
    segment = torch.full((R, width), -1, dtype=torch.long)  # (R, T)
    row_index = torch.zeros(len(input_ids), dtype=torch.long)  # (N,)
    last_index = torch.zeros(len(input_ids), dtype=torch.long)  # (N,)
    for r, members in enumerate(rows):
        at = 0
        for n in members:
            k = len(input_ids[n])
            ids[r, at : at + k] = torch.tensor(input_ids[n], dtype=torch.long)
            for name, mask in masks.items():
                laid[name][r, at : at + k] = torch.tensor(mask[n], dtype=torch.long)
            positions[r, at : at + k] = torch.arange(k)
            segment[r, at : at + k] = n
            row_index[n], last_index[n] = r, at + k - 1
            at += k
    return {"input_ids": ids, "attention_mask": block_diagonal_mask(segment), "position_ids": positions, **laid,
            "row_index": row_index, "last_index": last_index, "segment": segment}


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix every sequence in seqs starts with."""
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def shared_prefix_batch(input_ids: list[list[int]], groups: list[list[int]], pad_id: int,
                        response_mask: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Padding-free batch in which the sequences of a group (the responses to one prompt) share one copy of the
    token prefix they all start with: the prefix, then each sequence's own tail after it, its positions carrying
    on from the prefix's. A tail attends to the prefix and to itself, the prefix only to itself (causally), so
    every sequence's hidden states equal those of the padded layout while the prefix goes through the model once
    per group instead of once per sequence (a preference pair's prompt, a ranking's K). Groups (each sequence in
    exactly one) are packed into rows first fit, longest first. A sequence that is all prefix (a response that
    starts another) ends at the prefix's last token.

    Returns input_ids, position_ids: (R, T); attention_mask: (R, 1, T, T) additive float, 0 = may attend;
    row_index, last_index: (N,) row and column of sequence n's last token. No per-token masks: a token of the
    prefix belongs to several sequences. Instead, given response_mask (per-token 0/1 lists), the response tokens
    to score, one entry each: target_row, target_col (M,) where the hidden state predicting the token sits (its
    sequence's previous token, which may be in the shared prefix), target_id (M,) the token, target_owner (M,)
    its sequence."""
    if sorted(n for g in groups for n in g) != list(range(len(input_ids))):
        raise ValueError("shared_prefix_batch: every sequence must be in exactly one group")
    shared = [common_prefix([input_ids[n] for n in g]) for g in groups]
    lengths = [L + sum(len(input_ids[n]) - L for n in g) for g, L in zip(groups, shared)]
    rows = pack_rows(lengths)
    width = max(sum(lengths[u] for u in members) for members in rows)
    R = len(rows)
    ids = torch.full((R, width), pad_id, dtype=torch.long)  # (R, T)
    positions = torch.zeros((R, width), dtype=torch.long)  # (R, T)
    group = torch.full((R, width), -1, dtype=torch.long)  # (R, T) which group a position holds, -1 = padding
    tail = torch.full((R, width), -1, dtype=torch.long)  # (R, T) whose tail, -1 = a prefix (or padding)
    row_index = torch.zeros(len(input_ids), dtype=torch.long)  # (N,)
    last_index = torch.zeros(len(input_ids), dtype=torch.long)  # (N,)
    targets: list[tuple[int, int, int, int]] = []  # (row, column predicting it, token, sequence)
    for r, members in enumerate(rows):
        at = 0
        for u in members:
            L = shared[u]
            prefix_start = at
            ids[r, at : at + L] = torch.tensor(input_ids[groups[u][0]][:L], dtype=torch.long)
            positions[r, at : at + L] = torch.arange(L)
            group[r, at : at + L] = u
            prefix_end = at + L
            at += L
            for n in groups[u]:
                k = len(input_ids[n]) - L
                ids[r, at : at + k] = torch.tensor(input_ids[n][L:], dtype=torch.long)
                positions[r, at : at + k] = torch.arange(L, L + k)
                group[r, at : at + k] = u
                tail[r, at : at + k] = n
                row_index[n], last_index[n] = r, (at + k if k else prefix_end) - 1
                if response_mask is not None:
                    # token j is predicted at token j - 1's column: in the prefix, or earlier in this tail
                    targets += [(r, prefix_start + j - 1 if j <= L else at + j - 1 - L, input_ids[n][j], n)
                                for j in range(1, len(input_ids[n])) if response_mask[n][j]]
                at += k
    batch = {"input_ids": ids, "attention_mask": block_diagonal_mask(group, tail), "position_ids": positions,
             "row_index": row_index, "last_index": last_index}
    if response_mask is not None:
        laid = torch.tensor(targets, dtype=torch.long).reshape(-1, 4)  # (M, 4)
        batch.update(target_row=laid[:, 0], target_col=laid[:, 1], target_id=laid[:, 2], target_owner=laid[:, 3])
    return batch


# how much dearer (estimated) the shared-prefix layout may be and still be used: within it, timings do not tell the
# layouts apart (the playground's reward batches: 7% estimate dearer shared, by at most 1.19x)
SHARED_PREFIX_SLACK = 1.25


def packed_rows(lengths: list[int]) -> list[list[int]] | None:
    """The padding-free rows (`pack_rows`) of sequences of these lengths when packing saves at least one row, else
    None: the padded layout (nothing to gain, and a plain mask keeps the fastest attention kernels)."""
    if len(lengths) > 1:
        rows = pack_rows(lengths)
        if len(rows) < len(lengths):
            return rows
    return None


def shared_prefix_pays(input_ids: list[list[int]], groups: list[list[int]], token_weight: float | None) -> bool:
    """Whether `shared_prefix_batch` costs less arithmetic than the packed layout of the same sequences. Its rows
    are as wide as a whole group (prompt and every response), the packed layout's as the longest sequence, and a
    packed row attends densely: a (rows, width) batch costs rows x width x (token_weight + width), token_weight
    being one token's linear layers in units of one query-key pair of attention (`models.attention_token_weight`).
    With long responses to short prompts on a small model the wider rows can cost more than the prompt copies
    saved; otherwise the prompt saved wins. Where the two are within SHARED_PREFIX_SLACK of each other the measured
    times are too (the estimate leaves out per-row overheads), so the shared layout is kept unless it is clearly
    dearer. token_weight None: always share."""
    if token_weight is None:
        return True
    lengths = [len(s) for s in input_ids]
    shared = [common_prefix([input_ids[n] for n in g]) for g in groups]
    group_lengths = [L + sum(lengths[n] - L for n in g) for g, L in zip(groups, shared)]
    rows = pack_rows(group_lengths)
    width = max(sum(group_lengths[u] for u in members) for members in rows)
    plain = packed_rows(lengths)
    plain_rows, plain_width = len(plain or lengths), max(lengths)
    shared_cost = len(rows) * width * (token_weight + width)
    return shared_cost <= SHARED_PREFIX_SLACK * plain_rows * plain_width * (token_weight + plain_width)


def sequence_batch(input_ids: list[list[int]], pad_id: int, padding_free: bool = False,
                   **masks: list[list[int]]) -> dict[str, torch.Tensor]:
    """`padded_batch`; with padding_free, `packed_batch` in the rows of `packed_rows` when packing saves a row."""
    rows = packed_rows([len(s) for s in input_ids]) if padding_free else None
    if rows is not None:
        return packed_batch(input_ids, rows, pad_id, **masks)
    return padded_batch(input_ids, pad_id, **masks)


# -------------------------------------------------------------------------------------------------------- SFT
def _per_token(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SFT batch without the per-sequence indices: its loss is a sum over tokens."""
    return {k: v for k, v in batch.items() if k not in ("row_index", "last_index", "segment")}


def collate_sft(examples: list[SFTExample], pad_id: int, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch. Returns input_ids, attention_mask (1 = real), loss_mask (1 = target): each (B, T).
    padding_free: the examples packed into rows as wide as the longest one (`sequence_batch`), then with
    position_ids and a 4-D attention_mask as `collate_packed` gives them."""
    return _per_token(sequence_batch([e.input_ids for e in examples], pad_id, padding_free,
                                     loss_mask=[e.loss_mask for e in examples]))


@dataclass
class PackedRow:
    """Several examples laid end to end in one row; they never attend to each other."""

    examples: list[SFTExample]

    @property
    def length(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def pack_examples(examples: list[SFTExample], max_length: int) -> list[PackedRow]:
    """Rows of up to max_length tokens, filled by first fit in data order (not longest first as `pack_rows`):
    these rows are the units a run's sampler shuffles, so which examples share one is part of what its seed
    reproduces. An example is never split across rows."""
    return [PackedRow([examples[i] for i in row])
            for row in first_fit([len(e.input_ids) for e in examples], max_length)]


def collate_packed(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed batch of `pack_examples` rows (`packed_batch`'s layout): a block-diagonal causal mask keeps
    examples sharing a row independent, and positions restart at 0 for each example. Returns input_ids,
    position_ids, loss_mask: (B, T); attention_mask: (B, 1, T, T) additive float, 0 = may attend."""
    examples = [e for row in rows for e in row.examples]
    members, n = [], 0  # the indices into examples of each row's examples
    for row in rows:
        members.append(list(range(n, n + len(row.examples))))
        n += len(row.examples)
    return _per_token(packed_batch([e.input_ids for e in examples], members, pad_id,
                                   loss_mask=[e.loss_mask for e in examples]))


# ------------------------------------------------------------------------------------------ preference and KTO
def collate_pairs(pairs: list[TokenizedPair], pad_id: int, padding_free: bool = False, share_prompt: bool = False,
                  token_weight: float | None = None) -> dict[str, torch.Tensor]:
    """One right-padded batch for a single forward pass: rows 0..B-1 are the chosen sequences and rows B..2B-1
    the rejected ones, in the same order (split the scores with `scores.split(B)` or [:B], [B:]).

    Returns input_ids, attention_mask, response_mask: (2B, T); last_index: (2B,) index of the last real token;
    margin: (B,) float label margins, 0 where a pair has none (Bradley-Terry without a margin); confidence: (B,)
    float probability that chosen is truly better, 1 where a pair has none (a certain label); safety: (2B,)
    +1 for a response labelled safe, -1 unsafe, 0 unlabelled, in the rows' order.
    padding_free: the packed layout instead (see `packed_batch`; sequence n is still n); with share_prompt, a
    pair's chosen and rejected sequences share one copy of their prompt (`shared_prefix_batch`, with its response
    tokens' target_* entries in place of response_mask) when that costs less (`shared_prefix_pays` with
    token_weight; None: always)."""
    ids = [p.chosen_input_ids for p in pairs] + [p.rejected_input_ids for p in pairs]
    resp = [p.chosen_response_mask for p in pairs] + [p.rejected_response_mask for p in pairs]
    groups = [[i, len(pairs) + i] for i in range(len(pairs))]
    if padding_free and share_prompt and shared_prefix_pays(ids, groups, token_weight):
        batch = shared_prefix_batch(ids, groups, pad_id, resp)
    else:
        batch = sequence_batch(ids, pad_id, padding_free, response_mask=resp)
    batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)  # (B,)
    batch["confidence"] = torch.tensor([1.0 if p.confidence is None else p.confidence for p in pairs],
                                       dtype=torch.float32)  # (B,)
    labels = [p.chosen_safe for p in pairs] + [p.rejected_safe for p in pairs]
    batch["safety"] = torch.tensor([0.0 if s is None else 1.0 if s else -1.0 for s in labels])  # (2B,)
    return batch


def collate_rankings(rankings: list[TokenizedRanking], pad_id: int, padding_free: bool = False,
                     share_prompt: bool = False, token_weight: float | None = None) -> dict[str, torch.Tensor]:
    """All responses of G prompts in one right-padded batch of N = ΣK_g sequences, each scored once
    (InstructGPT: the K responses of a prompt are one batch element).

    Returns input_ids, attention_mask, response_mask: (N, T); last_index: (N,); group_index, slot_index: (N,)
    placing sequence n at rewards[group_index[n], slot_index[n]] of a (G, K) tensor, K = max K_g; beats:
    (G, K, K) bool, beats[g, i, j] = response i of prompt g ranked above response j (False for ties and
    padding slots) — ready for `losses.reward.batched_ranking_loss`. padding_free, share_prompt, token_weight: as
    in `collate_pairs` (a ranking's K sequences share one copy of their prompt)."""
    ids = [s for r in rankings for s in r.input_ids]
    resp = [m for r in rankings for m in r.response_mask]
    starts = [0]
    for r in rankings:
        starts.append(starts[-1] + len(r.input_ids))
    groups = [list(range(a, b)) for a, b in zip(starts, starts[1:])]
    if padding_free and share_prompt and shared_prefix_pays(ids, groups, token_weight):
        batch = shared_prefix_batch(ids, groups, pad_id, resp)
    else:
        batch = sequence_batch(ids, pad_id, padding_free, response_mask=resp)
    K = max(len(r.input_ids) for r in rankings)
    batch["group_index"] = torch.tensor([g for g, r in enumerate(rankings) for _ in r.input_ids])  # (N,)
    batch["slot_index"] = torch.tensor([k for r in rankings for k in range(len(r.input_ids))])  # (N,)
    beats = torch.zeros((len(rankings), K, K), dtype=torch.bool)  # (G, K, K)
    for g, r in enumerate(rankings):
        for t, better in enumerate(r.ranking):
            for worse in r.ranking[t + 1 :]:
                for i in better:
                    for j in worse:
                        beats[g, i, j] = True
    batch["beats"] = beats
    return batch


def collate_completions(examples: list[TokenizedCompletion], pad_id: int, padding_free: bool = False
                        ) -> dict[str, torch.Tensor]:
    """One right-padded batch of KTO completions. Returns input_ids, attention_mask, response_mask: (B, T);
    last_index: (B,); desirable: (B,) bool. padding_free: the packed layout instead (see `packed_batch`;
    sequence n is still n)."""
    batch = sequence_batch([e.input_ids for e in examples], pad_id, padding_free,
                           response_mask=[e.response_mask for e in examples])
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)  # (B,)
    return batch


def encode_responses(tokenizer: Any, prompt: Text, responses: list[Text], max_length: int) -> dict[str, torch.Tensor]:
    """Score-ready batch for one prompt's responses, encoded exactly as training pairs are (over-long responses
    are cut at max_length: scoring, unlike training data, must not stop on a long policy sample). A plain-text
    response to a message-list prompt (what a sampler returns) is scored as the assistant's turn."""
    if isinstance(prompt, list):
        responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
    prompt_ids, encoded = encode_prompt_responses(tokenizer, prompt, list(responses))
    fitted, _ = apply_overlong(prompt_ids, encoded, [f"response {i}" for i in range(len(encoded))], max_length,
                               "truncate", "<scoring>", 0)
    seqs = [prompt_response_sequence(prompt_ids, r) for r in fitted]
    return padded_batch([s[0] for s in seqs], tokenizer.pad_token_id, response_mask=[s[2] for s in seqs])
