"""The reward model's likelihood term on the realistic families: real byte-level BPE tokenizers and the families'
chat templates. Its log-likelihood is the language model's own on exactly the response tokens, and PPO's
token-id path scores sampled rollouts as score_texts scores their decoded texts."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.collate import encode_responses
from rlhfkit.errors import UserError
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.reward import model as rmodel

from realistic.families import FAMILIES

PROMPT = [{"role": "user", "content": "How many legs does a spider have?"}]


@pytest.mark.parametrize("name", FAMILIES)
def test_likelihood_term_on_real_tokenizers_and_templates(tmp_path, family_dir, name):
    family = family_dir(name)
    tok = load_tokenizer(str(family.path))
    lm = load_causal_lm(str(family.path), tok).eval()
    rm = rmodel.load_reward_model(str(family.path), tok)
    if not rm.config.tie_word_embeddings:  # llama3's head is its own matrix: the term is refused, naming why
        with pytest.raises(UserError, match="tie_word_embeddings"):
            rmodel.check_likelihood_term(rm.config, str(family.path))
        return
    prompt = PROMPT if family.has_template else "How many legs does a spider have?"
    # the log-likelihood of the response tokens (through EOS, nothing after it) is the causal LM's own
    batch = encode_responses(tok, prompt, ["Eight.", "Six, I think."], 256)
    with torch.no_grad():
        _, like = rmodel.head_and_likelihood(rm, batch["input_ids"], batch["attention_mask"], batch["last_index"],
                                             batch["response_mask"])
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    want = (lp * batch["response_mask"][:, 1:]).sum(1)
    assert like.tolist() == pytest.approx(want.tolist(), abs=1e-3)
    # a saved model with the term: PPO's ids (left-padded prompts, sampled responses) score as the decoded texts do
    setattr(rm.config, rmodel.LIKELIHOOD_KEY, 0.05)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    ensemble = rmodel.load_reward_ensemble(str(tmp_path / "rm"))
    # PPO's layout: the prompt left-padded beside a longer prompt, the responses' ids (as training encodes them,
    # through EOS) right-padded after it
    other = [{"role": "user", "content": "Name three colours and explain why the sky looks blue."}] \
        if family.has_template else "Name three colours and explain why the sky looks blue."
    texts = ["Eight.", "Six, I think.", "Eight legs."]
    prompts = [prompt, other, prompt]
    rows = [encode_responses(tok, p, [t], 256) for p, t in zip(prompts, texts)]
    starts = [int(r["response_mask"][0].nonzero()[0]) for r in rows]
    answers = [r["input_ids"][0, s : int(r["last_index"][0]) + 1].tolist() for r, s in zip(rows, starts)]
    heads = [r["input_ids"][0, :s].tolist() for r, s in zip(rows, starts)]
    P, R = max(map(len, heads)), max(map(len, answers))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(h)) + h + a + [pad] * (R - len(a)) for h, a in zip(heads, answers)])
    mask = torch.tensor([[0] * (P - len(h)) + [1] * (len(h) + len(a)) + [0] * (R - len(a))
                         for h, a in zip(heads, answers)])
    response = torch.tensor([[0] * P + [1] * len(a) + [0] * (R - len(a)) for a in answers])
    mean, _ = ensemble.mean_std(ids, mask, response)
    scored, _ = rmodel.score_texts(ensemble, prompts, [[{"role": "assistant", "content": t}] if family.has_template
                                                       else t for t in texts])
    assert mean.tolist() == pytest.approx(scored, abs=1e-3)
    # and the term is in both: without it every score moves
    setattr(ensemble.members[0].config, rmodel.LIKELIHOOD_KEY, 0.0)
    bare, _ = rmodel.score_texts(ensemble, prompts, [[{"role": "assistant", "content": t}] if family.has_template
                                                     else t for t in texts])
    assert all(abs(a - b) > 1e-3 for a, b in zip(bare, scored))
