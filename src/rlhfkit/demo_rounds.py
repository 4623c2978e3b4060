"""The human-in-the-loop experiment of `rlhfkit demo` (root/rounds): `rlhfkit rounds` on the playground, with the
simulated annotators as the people, measured against the gold judge. Three questions, each in summary.json's
"rounds" section:

- label efficiency: the reward model's gold agreement after the same label budget, collected in rounds with an
  active queue (BALD over the previous round's ensemble) or at random, over several seeds;
- rounds against one shot: a policy trained over three rounds (labels sampled from the policy of the round
  before) against one trained after collecting the same labels once from the SFT model;
- reliability: a crowd with random clickers and an adversary, the reward model trained with the Dawid-Skene
  posteriors as soft labels against the same labels taken at face value, and how well the estimate finds the bad
  annotators (AUC).

It runs the rounds loop and the simulated annotators beside training, so it sits with the pipeline (and may reach
the gold judge for evaluation)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlhfkit.eval.overopt import mean_se as overopt_mean_se
from rlhfkit.eval.playground import reward_gold_accuracy


def _row(prompt: Any, a: str, b: str) -> dict[str, Any]:
    return {"prompt": [{"role": "user", "content": prompt.text}], "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}]}


def gold_pairs(sft_dir: str, prompts: list[Any], seed: int, k: int = 4) -> list[dict[str, Any]]:
    """Held-out pairs of SFT samples (every distinct pair of k per prompt) the gold judge does not call a tie: the
    distribution the rounds' candidates come from, for the reward models' gold agreement."""
    import itertools

    from rlhfkit.playground.gold import gold_score
    from rlhfkit.playground.preferences import policy_groups

    rows = []
    for p, group in policy_groups(sft_dir, prompts, k, seed=seed):
        for a, b in itertools.combinations(group, 2):
            if gold_score(p, a) != gold_score(p, b):
                rows.append(_row(p, a, b))
    return rows


def gold_items(prompts: list[Any], seed: int, n: int, min_gap: float = 1.5) -> list[dict[str, Any]]:
    """n gold items: generator pairs the gold judge separates by at least min_gap, with the answer it gives."""
    from rlhfkit.playground.gold import gold_score
    from rlhfkit.playground.preferences import generator_pairs

    out: list[dict[str, Any]] = []
    for s in range(50):
        for p, a, b in generator_pairs(prompts, seed + s):
            gap = gold_score(p, a) - gold_score(p, b)
            if abs(gap) >= min_gap and len(out) < n:
                out.append({"prompt": p.text, "responses": [a, b], "answer": "A" if gap > 0 else "B"})
        if len(out) >= n:
            break
    return out


def auc(scores: list[float], positives: list[bool]) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, positives) if y]
    neg = [s for s, y in zip(scores, positives) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds; one seed has no standard error (nan), so no difference is called
    significant on one."""
    mean, se = overopt_mean_se(values)
    return mean, se if len(values) > 1 else math.nan


def prepare(root: Path, plan: dict[str, Any], seed: int) -> int:
    """The studies' fixed data in root/rounds, made once: held-out SFT pairs for the reward models' gold agreement
    and the reliability study's gold items. Returns the number of held-out pairs."""
    from rlhfkit.playground.world import read_prompts

    out = Path(root) / "rounds"
    out.mkdir(parents=True, exist_ok=True)
    data = Path(root) / "data"
    eval_path = out / "gold_pairs.jsonl"
    if not eval_path.exists():
        rows = gold_pairs(str(Path(root) / "sft"), read_prompts(data / "prompts_val.jsonl"), seed + 4242)
        eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold_path = out / "gold_items.jsonl"
    if not gold_path.exists():
        items = gold_items(read_prompts(data / "prompts_train.jsonl"), seed + 99, plan["reliability"]["gold_items"])
        gold_path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return len(eval_path.read_text().splitlines())


class _Study:
    """What the three studies share: the rounds config of a named run, and a reward model's gold agreement on the
    held-out SFT pairs (prepare writes them)."""

    def __init__(self, root: Path, base: dict[str, Any]):
        self.out = Path(root) / "rounds"
        self.data = Path(root) / "data"
        self.sft = str(Path(root) / "sft")
        self.base = base
        self.eval_rows = [json.loads(line) for line in (self.out / "gold_pairs.jsonl").read_text().splitlines()]

    def config(self, name: str, **fields: Any) -> Any:
        from rlhfkit.config import from_dict
        from rlhfkit.rounds import RoundsConfig

        merged = {**self.base, "sft_model": self.sft, "prompts": str(self.data / "prompts_train.jsonl"),
                  "output_dir": str(self.out / name), **fields}
        return from_dict(RoundsConfig, merged, "configs/demo.yaml rounds")

    def accuracy(self, reward_dir: str | Path) -> dict[str, float]:
        return reward_gold_accuracy(str(reward_dir), self.eval_rows)


def queue_study(root: Path, plan: dict[str, Any], base: dict[str, Any], seed: int, progress: Any = None,
                seeds: list[int] | None = None) -> dict[str, list[list[float]]]:
    """Label efficiency: the same budget in the same rounds, the queue ordered by the ensemble or at random (round
    1 is the same in both: there is no model to ask yet, and the seed draws the same prompts, samples and labels).
    Returns each arm's gold agreement after every round, one curve per seed (`seeds`, default the plan's: the
    demo runs each seed as a job of its own); label_efficiency turns them into the "queue" section."""
    from rlhfkit.rounds import main as rounds_main

    study = _Study(root, base)
    le = plan["label_efficiency"]
    curves: dict[str, list[list[float]]] = {"active": [], "random": []}
    for s in le["seeds"] if seeds is None else seeds:
        for arm, queue in (("active", le.get("queue", "bald")), ("random", "random")):
            cfg = study.config(f"{arm}-{s}", seed=seed + s, queue=queue, rounds=le["rounds"],
                               labels_per_round=le["labels_per_round"], prompts_per_round=le["prompts_per_round"],
                               policy="none", overlap_share=0.0, reliability=False)
            rounds_main(cfg, progress)
            curves[arm].append([study.accuracy(Path(cfg.output_dir) / f"round-{r}" / "reward")["gold_accuracy"]
                                for r in range(1, le["rounds"] + 1)])
    return curves


def iterative_study(root: Path, plan: dict[str, Any], base: dict[str, Any], seed: int, progress: Any = None
                    ) -> dict[str, Any]:
    """Rounds against one shot, with the same labels and policy steps. Returns the "iterative" and "one_shot"
    sections."""
    from rlhfkit.rounds import main as rounds_main

    study = _Study(root, base)
    it = plan["iterative"]
    test = str(study.data / "prompts_test.jsonl")
    iterative = study.config("iterative", seed=seed, rounds=it["rounds"], labels_per_round=it["labels_per_round"],
                             prompts_per_round=it["prompts_per_round"], policy_steps=it["policy_steps"],
                             eval_prompts=test, gold_eval=True)
    one_shot = study.config("one_shot", seed=seed, rounds=1, labels_per_round=it["rounds"] * it["labels_per_round"],
                            prompts_per_round=it["rounds"] * it["prompts_per_round"],
                            policy_steps=it["rounds"] * it["policy_steps"], eval_prompts=test, gold_eval=True)
    it_summary = rounds_main(iterative, progress)
    os_summary = rounds_main(one_shot, progress)
    last_it, last_os = it_summary["rounds"][-1]["eval"], os_summary["rounds"][-1]["eval"]
    return {
        "iterative": {"gold_score": last_it["gold_score"], "gold_score_se": last_it["gold_score_se"],
                      "kl": last_it["kl"], "per_round": [
                          {k: r["eval"][k] for k in ("round", "gold_score", "gold_score_se", "proxy", "kl")}
                          | {"reward_gold_accuracy": study.accuracy(Path(iterative.output_dir) / f"round-{r['round']}"
                                                                    / "reward")["gold_accuracy"]}
                          for r in it_summary["rounds"]]},
        "one_shot": {"gold_score": last_os["gold_score"], "gold_score_se": last_os["gold_score_se"],
                     "kl": last_os["kl"], "reward_gold_accuracy": study.accuracy(
                         Path(one_shot.output_dir) / "round-1" / "reward")["gold_accuracy"]},
    }


def reliability_study(root: Path, plan: dict[str, Any], base: dict[str, Any], seed: int, progress: Any = None
                      ) -> dict[str, Any]:
    """A crowd with random clickers and an adversary: the reward model trained on Dawid-Skene posteriors against
    the same labels at face value, and how well the estimate finds the bad annotators. Returns "reliability"."""
    from rlhfkit.config import load_config
    from rlhfkit.playground.annotators import make_mixed_pool
    from rlhfkit.reward import train as rtrain
    from rlhfkit.rounds import main as rounds_main

    study = _Study(root, base)
    rel = plan["reliability"]
    weighted, unweighted, aucs, flags = [], [], [], []
    for s in rel["seeds"]:
        cfg = study.config(f"crowd-{s}", seed=seed + s, rounds=1, labels_per_round=rel["labels"],
                           prompts_per_round=rel["prompts"], policy="none", queue="random",
                           gold=str(study.out / "gold_items.jsonl"), overlap_share=rel["overlap_share"],
                           simulated_annotators=rel["annotators"], simulated_random_share=rel["random_share"],
                           simulated_adversarial_share=rel["adversarial_share"], reliability=True)
        rounds_main(cfg, progress)
        rdir = Path(cfg.output_dir) / "round-1"
        weighted.append(study.accuracy(rdir / "reward")["gold_accuracy"])
        plain = rdir / "reward_unweighted"
        # the same fit on the same rows, every label taken at face value
        rtrain.main(replace(load_config(rtrain.RewardConfig, rdir / "reward" / "config.yaml"),
                            output_dir=str(plain), use_confidence=False, resume=(plain / "config.yaml").exists()))
        unweighted.append(study.accuracy(plain)["gold_accuracy"])
        pool = make_mixed_pool(cfg.seed, cfg.simulated_annotators, cfg.simulated_random_share,
                               cfg.simulated_adversarial_share)
        bad = {a.id for a in pool if a.behaviour != "honest"}
        report = json.loads((rdir / "reliability.json").read_text())["annotators"]
        aucs.append(auc([a["suspicion"] for a in report], [a["name"] in bad for a in report]))
        flags.append({"bad": sorted(bad), "flagged": sorted(a["name"] for a in report
                                                            if a["flag"] in ("random", "adversarial"))})
    w_mean, w_se = mean_se(weighted)
    u_mean, u_se = mean_se(unweighted)
    d_mean, d_se = mean_se([w - u for w, u in zip(weighted, unweighted)])
    auc_mean, auc_se = mean_se(aucs)
    return {
        "weighted": {"gold_accuracy": w_mean, "gold_accuracy_se": w_se, "per_seed": weighted},
        "unweighted": {"gold_accuracy": u_mean, "gold_accuracy_se": u_se, "per_seed": unweighted},
        "difference": d_mean, "difference_se": d_se, "flag_auc": auc_mean, "flag_auc_se": auc_se,
        "per_seed_auc": aucs, "flags": flags, "seeds": list(rel["seeds"]),
        "crowd": {"annotators": rel["annotators"], "random_share": rel["random_share"],
                  "adversarial_share": rel["adversarial_share"]},
    }


def combine(plan: dict[str, Any], eval_pairs: int, curves: list[dict[str, list[list[float]]]],
            iterative: dict[str, Any], reliability: dict[str, Any]) -> dict[str, Any]:
    """summary.json's "rounds" section from the three studies (the queue study's curves in the plan's seed order,
    from one or more queue_study calls), with its claims."""
    le = plan["label_efficiency"]
    merged = {arm: [c for part in curves for c in part[arm]] for arm in ("active", "random")}
    queue = label_efficiency(merged, le["labels_per_round"], le.get("queue", "bald"), list(le["seeds"]))
    result = {"eval_pairs": eval_pairs, "queue": queue, **iterative, "reliability": reliability}
    result["claims"] = rounds_claims(result)
    return result


def label_efficiency(curves: dict[str, list[list[float]]], per_round: int, strategy: str, seeds: list[int]
                     ) -> dict[str, Any]:
    """The queue study's numbers from each arm's gold agreement after each round (one curve per seed): both arms at
    the full budget with the paired difference, both curves, and the labels the active queue needed to reach the
    random queue's final agreement. That last number counts only where the random curve still rises there (its
    agreement at that many labels below its final by more than 2 paired s.e.): on a flat curve every queue
    "reaches" the final value at once, which says that labels are not what limits the reward model."""
    n_rounds = len(curves["active"][0])
    budget = n_rounds * per_round
    arms = {}
    for arm in ("active", "random"):
        finals = [c[-1] for c in curves[arm]]
        m, e = mean_se(finals)
        arms[arm] = {"gold_accuracy": m, "gold_accuracy_se": e, "per_seed": finals, "per_round": [
            {"labels": (i + 1) * per_round, **dict(zip(("gold_accuracy", "gold_accuracy_se"),
                                                       mean_se([c[i] for c in curves[arm]])))}
            for i in range(n_rounds)]}
    d_mean, d_se = mean_se([a[-1] - r[-1] for a, r in zip(curves["active"], curves["random"])])
    target = arms["random"]["gold_accuracy"]
    reach = None
    for i in range(1, n_rounds):  # round 1 is random in both arms
        rise, rise_se = mean_se([r[-1] - r[i] for r in curves["random"]])
        rising = rise > 2 * (rise_se if math.isfinite(rise_se) else float("inf"))
        if arms["active"]["per_round"][i]["gold_accuracy"] >= target and rising:
            reach = (i + 1) * per_round
            break
    first, last = arms["random"]["per_round"][0]["gold_accuracy"], target
    return {"budget": budget, "seeds": seeds, "strategy": strategy, **arms, "difference": d_mean,
            "difference_se": d_se, "random_curve_rise": last - first,
            "active_labels_to_reach_random": reach, "active_label_ratio": None if reach is None else reach / budget}


def rounds_claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each [ok] or [NOT MET] with the measured numbers."""
    q, it, rel = result["queue"], result["iterative"], result["reliability"]
    ratio = q.get("active_label_ratio")
    gap_se = q["difference_se"] if not math.isnan(q["difference_se"]) else float("inf")
    claims = [
        {"claim": f"an active queue beats a random one at {q['budget']} labels by more than 2 s.e. (or reaches the "
                  "random queue's accuracy with ≤ 0.7× its labels)",
         "ok": q["difference"] > 2 * gap_se or (ratio is not None and ratio <= 0.7),
         "value": f"active {q['active']['gold_accuracy']:.3f} vs random {q['random']['gold_accuracy']:.3f}, "
                  f"difference {q['difference']:+.3f} ± {q['difference_se']:.3f} over {len(q['seeds'])} seeds"
                  + (f"; active reached random's final accuracy at {q['active_labels_to_reach_random']} labels"
                     if ratio is not None else
                     f"; the random queue's curve rose {q['random_curve_rise']:+.3f} from {q['budget'] // len(q['random']['per_round'])} "
                     f"to {q['budget']} labels")},
    ]
    d = it["gold_score"] - result["one_shot"]["gold_score"]
    se = math.hypot(it["gold_score_se"], result["one_shot"]["gold_score_se"])
    claims.append({"claim": "three rounds beat one shot with the same labels (gold score, by more than 2 s.e.)",
                   "ok": d > 2 * se,
                   "value": f"iterative {it['gold_score']:+.3f} ± {it['gold_score_se']:.3f} vs one shot "
                            f"{result['one_shot']['gold_score']:+.3f} ± {result['one_shot']['gold_score_se']:.3f}"})
    rse = rel["difference_se"] if not math.isnan(rel["difference_se"]) else float("inf")
    claims.append({"claim": "reliability-weighted labels give a better reward model than the same labels "
                            "unweighted (by more than 2 s.e.)",
                   "ok": rel["difference"] > 2 * rse,
                   "value": f"weighted {rel['weighted']['gold_accuracy']:.3f} vs unweighted "
                            f"{rel['unweighted']['gold_accuracy']:.3f}, difference {rel['difference']:+.3f} ± "
                            f"{rel['difference_se']:.3f}"})
    claims.append({"claim": "the reliability estimate finds the random and adversarial annotators (AUC ≥ 0.9)",
                   "ok": rel["flag_auc"] >= 0.9, "value": f"AUC {rel['flag_auc']:.3f} over {len(rel['seeds'])} seeds"})
    return claims


def format_rounds_table(result: dict[str, Any]) -> str:
    q, it, os_, rel = result["queue"], result["iterative"], result["one_shot"], result["reliability"]
    lines = ["human-in-the-loop rounds (reward model gold agreement on "
             f"{result['eval_pairs']} held-out SFT pairs; policy gold score on test prompts):",
             f"  queue at {q['budget']} labels   active {q['active']['gold_accuracy']:.3f} ± "
             f"{q['active']['gold_accuracy_se']:.3f}   random {q['random']['gold_accuracy']:.3f} ± "
             f"{q['random']['gold_accuracy_se']:.3f}",
             f"  policy gold score      iterative {it['gold_score']:+.3f} ± {it['gold_score_se']:.3f}   one shot "
             f"{os_['gold_score']:+.3f} ± {os_['gold_score_se']:.3f}",
             f"  crowd with bad raters  weighted {rel['weighted']['gold_accuracy']:.3f}   unweighted "
             f"{rel['unweighted']['gold_accuracy']:.3f}   flag AUC {rel['flag_auc']:.3f}"]
    return "\n".join(lines)
