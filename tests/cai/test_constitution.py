"""Constitution files: the shipped default, and one clear error per mistake in a user's file."""

import random
from collections import Counter

import pytest
import yaml

from rlhfkit.errors import UserError
from rlhfkit.feedback.constitution import DEFAULT_TEMPLATES, load_constitution, parse_constitution


def test_the_default_constitution_ships_with_the_package():
    c = load_constitution()
    assert c.name == "rlhfkit-default"
    assert [p.id for p in c.principles] == ["harmless", "honest", "helpful", "respectful", "concise"]
    for p in c.principles:
        assert p.comparison.startswith("Which") and "?" in p.comparison
        assert p.critique and p.revision
    assert c.templates == DEFAULT_TEMPLATES
    assert c.principle("harmless").weight == 2.0


def test_principles_are_drawn_in_proportion_to_their_weights():
    c = parse_constitution({"name": "x", "principles": [
        {"id": "a", "critique": "c", "revision": "r", "comparison": "q?", "weight": 3},
        {"id": "b", "critique": "c", "revision": "r", "comparison": "q?"}]}, "t.yaml")
    rng = random.Random(0)
    counts = Counter(c.sample(rng).id for _ in range(4000))
    assert 0.72 < counts["a"] / 4000 < 0.78  # 3 / (3 + 1)


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


GOOD = {"id": "kind", "critique": "find unkindness", "revision": "be kind", "comparison": "Which is kinder?"}


@pytest.mark.parametrize("data, words", [
    ({"principles": [GOOD]}, ["'name'"]),
    ({"name": "x"}, ["'principles'", "non-empty list"]),
    ({"name": "x", "principles": [GOOD], "rules": 1}, ["unknown key", "rules"]),
    ({"name": "x", "principles": [{**GOOD, "colour": "red"}]}, ["principles[0]", "colour"]),
    ({"name": "x", "principles": [{**GOOD, "id": "Be Kind"}]}, ["principles[0].id", "'Be Kind'"]),
    ({"name": "x", "principles": [GOOD, GOOD]}, ["'kind'", "twice"]),
    ({"name": "x", "principles": [{**GOOD, "comparison": ""}]}, ["kind.comparison", "non-empty"]),
    ({"name": "x", "principles": [{k: v for k, v in GOOD.items() if k != "revision"}]}, ["kind.revision"]),
    ({"name": "x", "principles": [{**GOOD, "weight": -1}]}, ["'kind'", "weight -1"]),
    ({"name": "x", "principles": [GOOD], "templates": {"comparison": "{prompt} {first} {second}"}},
     ["template 'comparison'", "missing", "question"]),
    ({"name": "x", "principles": [GOOD], "templates": {"critique": "{prompt} {response} {critique} {oops}"}},
     ["unknown", "oops"]),
    ({"name": "x", "principles": [GOOD], "templates": {"judge": "x"}}, ["unknown template 'judge'"]),
    ("name: [unclosed", ["not valid YAML"]),
])
def test_a_bad_constitution_is_one_error_naming_the_file_and_the_key(tmp_path, data, words):
    path = _write(tmp_path, data)
    with pytest.raises(UserError) as err:
        load_constitution(path)
    message = str(err.value)
    assert path in message or "not valid YAML" in message
    for word in words:
        assert word in message, message


def test_a_missing_constitution_file_says_so(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_constitution(str(tmp_path / "nope.yaml"))


def test_a_user_constitution_with_its_own_template_loads(tmp_path):
    path = _write(tmp_path, {"name": "mine", "principles": [GOOD], "templates": {
        "comparison": "Q: {question}\nUser: {prompt}\n1) {first}\n2) {second}\nAnswer:"}})
    c = load_constitution(path)
    assert c.principle("kind").comparison == "Which is kinder?"
    assert c.templates["comparison"].startswith("Q: {question}")
    assert c.templates["critique"] == DEFAULT_TEMPLATES["critique"]
    with pytest.raises(UserError, match="no principle 'harmless'"):
        c.principle("harmless")
