"""Items and users shared by the feedback tests."""

from rlhfkit.feedback.service import ItemSpec


def arith_items(n: int, start: int = 0) -> list[ItemSpec]:
    """Pairs whose right answer is response 0."""
    out = []
    for i in range(start, start + n):
        a, b = i % 9 + 1, (i * 7) % 9 + 1
        out.append(ItemSpec(prompt=f"what is {a} plus {b} ?", responses=[f"{a} plus {b} is {a + b} , ada !",
                                                                         f"{a} plus {b} is {a + b + 1} ."],
                            sources=["good-model", "bad-model"]))
    return out
