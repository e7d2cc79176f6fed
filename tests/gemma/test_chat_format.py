"""Code extraction from a model's answer, including the study's failures, and the user turn."""

from __future__ import annotations

import pytest

from gemma.chat_format import extract_code, user_turn

FIB = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)"


@pytest.mark.parametrize("response, code", [
    pytest.param(FIB + "<end_of_turn>", FIB, id="stops-at-end-of-turn"),
    pytest.param(FIB + "\n<start_of_turn>user\nNow write a sort<end_of_turn>", FIB, id="stray-turn-marker"),
    pytest.param(FIB + "\nuser\nNow write a sort\nmodel\ndef sort(x):\n    pass", FIB, id="stray-bare-role-lines"),
    pytest.param("Here is the code:\n\n```python\n" + FIB + "\n```\n\nThis uses recursion.", FIB, id="fence-and-prose"),
    pytest.param("```py\n" + FIB + "\n", FIB, id="unclosed-fence"),
    pytest.param("Sure! Here is a function:\n" + FIB + "\n\nThis function uses recursion.\nIt is slow.", FIB,
                 id="prose-without-fence"),
    pytest.param(FIB + "\n\nOutput:\n55", FIB, id="output-section"),
    pytest.param("   \n\t", "", id="whitespace-is-no-code"),
    pytest.param("<end_of_turn>", "", id="empty-turn"),
])
def test_extract_code(response, code):
    assert extract_code(response) == code


# The study cut the answer at the word "model", which broke on code like this.
SKLEARN = ("from sklearn.linear_model import LinearRegression\n\n"
           "def train(X, y):\n    # fit the model to the data\n    model = LinearRegression()\n"
           "    model.fit(X, y)\n    return model")


@pytest.mark.parametrize("response", [
    SKLEARN,
    SKLEARN + "<end_of_turn>\n<start_of_turn>model\nmodel = None",
    "This trains a linear model:\n```python\n" + SKLEARN + "\n```\nThe model is returned.",
])
def test_code_mentioning_model_is_kept_whole(response):
    assert extract_code(response) == SKLEARN


def test_the_entry_point_picks_among_several_blocks():
    response = "```python\nimport math\n```\nthen\n```python\n" + FIB + "\n```\n```python\nprint(fib(5))\n```"
    assert extract_code(response, entry_point="fib") == FIB
    assert extract_code(response) == "import math"


def test_the_user_turn_ends_where_the_model_answers():
    assert user_turn("Write fib") == "<start_of_turn>user\nWrite fib<end_of_turn>\n<start_of_turn>model\n"
    assert user_turn("Sort", "[3, 1]") == "<start_of_turn>user\nSort\n[3, 1]<end_of_turn>\n<start_of_turn>model\n"


def test_a_conversation_of_one_user_message_is_the_training_prompt():
    from gemma.chat_format import conversation, user_turn

    assert conversation([("user", "Write fib")]) == user_turn("Write fib")
    prompt = conversation([("system", "Be brief."), ("user", "Write fib"), ("assistant", "def fib(n): ..."),
                           ("user", "Now with a cache")])
    assert prompt == ("<start_of_turn>user\nBe brief.\n\nWrite fib<end_of_turn>\n<start_of_turn>model\n"
                      "def fib(n): ...<end_of_turn>\n<start_of_turn>user\nNow with a cache<end_of_turn>\n"
                      "<start_of_turn>model\n")
    for bad in ([], [("user", "x"), ("assistant", "y")], [("robot", "x")]):
        with pytest.raises(ValueError):
            conversation(bad)
