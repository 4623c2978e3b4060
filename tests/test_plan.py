"""`rlhfkit plan`: hand-computed model states, the relations between strategies, the totals against measured peak
tensor memory of real training steps (CPU, fp32), the CLI and README command, and its error messages."""

import json
import re
import shlex
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from rlhfkit import plan as P
from rlhfkit.cli import main as cli_main
from rlhfkit.errors import ConfigError, UserError

README = Path(__file__).resolve().parents[1] / "README.md"
GIB = 2**30


def cfg(**kw) -> P.PlanConfig:
    return P.PlanConfig(**kw)


SMALL = dict(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=10,
             tied_embeddings=False)


# --------------------------------------------------------------------------------------- hand arithmetic
def test_small_shape_by_hand():
    # d = 8 / 2 = 4; q 8x8 = 64, k and v 8x4 = 32 each, o 8x8 = 64, gate/up/down 3 x 8x16 = 384, norms 2x8 = 16
    # -> 592 per layer; embedding 10x8 = 80, head 80, final norm 8: 80 + 80 + 2x592 + 8 = 1352
    p = P.plan(cfg(**SMALL, gpus=4))
    assert p["params"] == 1352
    ddp = p["strategies"]["DDP"]
    # rlhfkit's own layout (autocast, the default): fp32 weights, gradients and AdamW m, v: 4 + 4 + 8
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (4 * 1352, 4 * 1352, 8 * 1352)
    z2 = p["strategies"]["ZeRO-2"]
    assert (z2["weights"], z2["gradients"], z2["optimizer"]) == (4 * 1352, 4 * 1352 / 4, 8 * 1352 / 4)
    mixed = P.plan(cfg(**SMALL, gpus=4, precision="bf16-mixed"))["strategies"]  # the ZeRO paper's 2 + 2 + 12
    assert (mixed["DDP"]["weights"], mixed["DDP"]["gradients"], mixed["DDP"]["optimizer"]) == \
        (2 * 1352, 2 * 1352, 12 * 1352)
    assert (mixed["ZeRO-2"]["weights"], mixed["ZeRO-2"]["gradients"], mixed["ZeRO-2"]["optimizer"]) == \
        (2 * 1352, 2 * 1352 / 4, 12 * 1352 / 4)
    assert P.plan(cfg(**SMALL, precision="bf16"))["strategies"]["DDP"]["optimizer"] == 4 * 1352
    f32 = P.plan(cfg(**SMALL, precision="fp32"))["strategies"]["DDP"]
    assert (f32["weights"], f32["gradients"], f32["optimizer"]) == (4 * 1352, 4 * 1352, 8 * 1352)
    # LoRA r=2 on q, v: 2 layers x (2x(8+8) + 2x(8+4)) = 2 x 56 = 112 adapter parameters, trained at 16 bytes;
    # the frozen base in fp32, as rlhfkit loads it
    lora = P.plan(cfg(**SMALL, lora_rank=2, lora_targets=["q_proj", "v_proj"]))["strategies"]["LoRA"]
    assert (lora["weights"], lora["gradients"], lora["optimizer"]) == (4 * 1352 + 4 * 112, 4 * 112, 8 * 112)
    # QLoRA: the 2 x 576 linear weights at 4.127 bits, embedding, head and norms (200) at 4 bytes
    qlora = P.plan(cfg(**SMALL, lora_rank=2, lora_targets=["q_proj", "v_proj"]))["strategies"]["QLoRA"]
    assert qlora["weights"] == pytest.approx(1152 * 4.127 / 8 + 4 * 200 + 4 * 112, rel=1e-3)


# --------------------------------------------------------------------------------------- strategy relations
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_strategy_relations(stage):
    n = 8
    s = P.plan(cfg(preset="llama3-8b", stage=stage, gpus=n, cached_reference=False))["strategies"]
    ddp, z2, z3, fsdp = s["DDP"], s["ZeRO-2"], s["ZeRO-3"], s["FSDP"]
    for key in ("weights", "gradients", "optimizer"):
        assert z3[key] == pytest.approx(ddp[key] / n)  # ZeRO-3 shards every model state (frozen networks too)
        assert fsdp[key] == z3[key]
    assert z2["weights"] == ddp["weights"]
    assert z2["gradients"] == pytest.approx(ddp["gradients"] / n) and z2["optimizer"] == pytest.approx(ddp["optimizer"] / n)
    assert ddp["total"] > z2["total"] > z3["total"] == fsdp["total"]
    # adapters train a sliver; QLoRA's base is ~4x smaller than LoRA's in its linear layers
    assert s["LoRA"]["optimizer"] < ddp["optimizer"] / 100 and s["QLoRA"]["weights"] < s["LoRA"]["weights"]
    for row in s.values():
        assert row["activations_checkpointed"] < row["activations_no_checkpointing"]


def test_networks_per_stage():
    names = {st: [n["name"] for n in P.plan(cfg(preset="llama3-8b", stage=st))["networks"]]
             for st in ("sft", "reward", "dpo", "ppo", "grpo")}
    assert names == {"sft": ["policy"], "reward": ["reward model"], "dpo": ["policy"],
                     "ppo": ["policy + value head", "reference", "reward model"],
                     "grpo": ["policy", "reference", "reward model"]}
    dpo = P.plan(cfg(preset="llama3-8b", stage="dpo", cached_reference=False))
    assert [n["name"] for n in dpo["networks"]] == ["policy", "reference"]
    ppo = P.plan(cfg(preset="llama3-8b", stage="ppo"))["strategies"]
    assert ppo["DDP"]["kv_cache"] > 0
    # the value head is the only difference between PPO's and GRPO's trained network
    assert ppo["DDP"]["optimizer"] - P.plan(cfg(preset="llama3-8b", stage="grpo"))["strategies"]["DDP"]["optimizer"] \
        == 8 * (4096 + 1)  # AdamW m and v in fp32


# ------------------------------------------------------------------------- measured vs planned (CPU, fp32)
class LiveTensorBytes:
    """Peak bytes of live tensor storages: every op's outputs are recorded through a TorchDispatchMode and each
    storage is dropped from the count when it is freed (a weak reference's callback). RSS would be useless here:
    the interpreter and torch dwarf a tiny model."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
                return out

        self.mode = Mode()

    def track(self, t) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()

        def freed(_ref, key=key, nbytes=nbytes):
            self.live.pop(key, None)
            self.current -= nbytes

        self.live[key] = weakref.ref(storage, freed)
        self.current += nbytes
        self.peak = max(self.peak, self.current)


def measured_peak(hidden, layers, heads, kv_heads, mlp, vocab, tied, batch, seq, checkpointing) -> int:
    """Peak tensor bytes of a steady-state SFT step (the second: AdamW's states exist, and the gradients stay
    allocated as DDP's buckets keep them): forward through logprobs_of, loss, backward, AdamW step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models import logprobs_of

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        max_position_embeddings=seq, attn_implementation="sdpa"))
    if checkpointing:
        from rlhfkit.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)  # what --gradient-checkpointing does
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))  # (B, T)
    mask = torch.ones_like(ids)  # 1 = real token

    def step():
        loss = -logprobs_of(model, ids, mask).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    tracker = LiveTensorBytes()
    for t in [*model.parameters(), *model.buffers(), ids, mask]:
        tracker.track(t)
    for p in model.parameters():
        tracker.track(p.grad)
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                tracker.track(t)
    with tracker.mode:
        step()
    return tracker.peak


TINY = [  # (hidden, layers, heads, kv heads, mlp, vocab, tied, batch, seq, checkpointing)
    (256, 4, 8, 8, 688, 8000, True, 4, 256, False),  # one logit chunk, MHA, tied
    (256, 4, 8, 2, 512, 40000, False, 4, 256, False),  # GQA; 163 MB of logits > 128 MiB, so two chunks
    (256, 4, 8, 4, 688, 8000, False, 4, 256, True),  # gradient checkpointing
]


@pytest.mark.parametrize("shape", TINY, ids=["mha-tied", "gqa-chunked", "checkpointed"])
def test_planned_total_is_within_20_percent_of_measured_peak(shape):
    hidden, layers, heads, kv_heads, mlp, vocab, tied, batch, seq, ckpt = shape
    planned = P.plan(cfg(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                         intermediate_size=mlp, vocab_size=vocab, tied_embeddings=tied, batch_size=batch,
                         seq_len=seq, precision="fp32", gradient_checkpointing=ckpt, stage="sft"))
    row = planned["strategies"]["DDP"]
    measured = measured_peak(*shape)
    states = row["weights"] + row["gradients"] + row["optimizer"]
    print(f"\n{shape}: planned {row['total'] / 2**20:.1f} MiB (states {states / 2**20:.1f}, activations "
          f"{row['activations'] / 2**20:.1f}, logits {row['logits'] / 2**20:.1f}), measured {measured / 2**20:.1f} MiB, "
          f"ratio {row['total'] / measured:.3f}")
    # the activations and logits are a third or more of the total here, so this checks more than model states
    assert row["activations"] + row["logits"] > 0.3 * row["total"]
    assert row["total"] == pytest.approx(measured, rel=0.20)


# ------------------------------------------------------------------------------------------------ the CLI
def readme_plan_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = [ln.split("#")[0].strip() for b in blocks for ln in b.splitlines() if ln.startswith("rlhfkit plan")]
    assert commands == ["rlhfkit plan --preset llama3-8b --stage ppo --gpus 8"]
    return commands[0]


def test_readme_command_prints_the_table():
    argv = shlex.split(readme_plan_command())
    proc = subprocess.run([sys.executable, "-m", "rlhfkit", *argv[1:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for strategy in P.STRATEGIES:
        assert re.search(rf"^{re.escape(strategy)}\s+[\d.]+", proc.stdout, re.M), strategy
    assert "reference" in proc.stdout and "reward model" in proc.stdout


def test_readme_table_holds_the_planners_numbers():
    """The README's table is this planner's output: each of its cells equals a recomputed total."""
    text = README.read_text()
    section = text[text.index("### Memory plan"):]
    section = section[: section.index("\n## ")]
    checked = 0
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"Llama-3-(8B|70B) (PPO|DPO)", cells[0])
        if not m:
            continue
        p = P.plan(cfg(preset=f"llama3-{m[1].lower()}", stage=m[2].lower(), gpus=8))["strategies"]
        for strategy, cell in zip(P.STRATEGIES, cells[1:]):
            assert float(cell) == pytest.approx(p[strategy]["total"] / GIB, abs=0.051), (line, strategy)
            checked += 1
    assert checked == 24


def test_cli_dpo_table_and_json(capsys):
    assert cli_main(["plan", "--preset", "llama3-8b", "--stage", "dpo", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "reference log-probs cached" in out and re.search(r"^ZeRO-3\s+3\.74\s", out, re.M)
    assert cli_main(["plan", "--preset", "llama3-8b", "--stage", "dpo", "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 8_030_261_248 and set(data["strategies"]) == set(P.STRATEGIES)


def test_model_config_json_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}))
    assert P.plan(cfg(model=str(tmp_path)))["strategies"] == P.plan(cfg(preset="llama3-8b"))["strategies"]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw, message", [
    (dict(preset="llama3-8"), "unknown preset 'llama3-8'; did you mean 'llama3-8b'?"),
    (dict(hidden_size=64, num_layers=2, num_heads=4), "the model shape lacks intermediate_size, vocab_size; pass "
                                                      "--intermediate-size N --vocab-size N"),
    (dict(preset="llama3-8b", hidden_size=-1), "hidden_size must be a positive integer, got -1; pass --hidden-size"),
    (dict(preset="llama3-8b", gpus=0), "gpus must be a positive integer, got 0; pass --gpus N"),
    (dict(preset="llama3-8b", seq_len=1), "seq_len must be at least 2"),
    (dict(preset="llama3-8b", num_kv_heads=5), "num_heads (32) is not a multiple of num_kv_heads (5)"),
    (dict(preset="llama3-8b", model="x"), "--preset and --model both give the shape"),
    (dict(preset="llama3-8b", lora_targets=["qproj"]), "lora_targets ['qproj'] are not Llama matrices"),
])
def test_bad_input_is_one_clear_error(kw, message):
    with pytest.raises(ConfigError) as exc:
        P.plan(cfg(**kw))
    assert message in str(exc.value)


def test_config_json_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match="no config.json there"):
        P.plan(cfg(model=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    with pytest.raises(UserError, match=r"has no num_attention_heads, intermediate_size, vocab_size; .*"
                                        r"--num-heads, --intermediate-size, --vocab-size"):
        P.plan(cfg(model=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({**{k: 8 for k in P.HF_KEYS.values()}, "vocab_size": 0}))
    with pytest.raises(UserError, match="vocab_size must be a positive integer, got 0"):
        P.plan(cfg(model=str(tmp_path)))


def test_cli_error_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "rlhfkit", "plan", "--preset", "gpt5"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("rlhfkit plan: error: unknown preset 'gpt5'")
