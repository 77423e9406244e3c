"""A1111's prompt language as text: emphasis, BREAK, prompt editing/alternation, extra-network tags.

Expected values are AUTOMATIC1111's own: the doctests of `modules/prompt_parser.py` (transcribed, floats
as A1111 prints them) and, where noted, the output of A1111's lark grammar run on the same input.
"""

import pytest

from ldm.errors import UserError
from ldm.prompts.syntax import (
    BREAK,
    ExtraNetwork,
    extract_extra_networks,
    parse_prompt_attention,
    prompt_schedule,
)

# parse_prompt_attention doctests of A1111's prompt_parser.py
ATTENTION_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_DOCTESTS)
def test_attention_matches_a1111_doctests(text, expected):
    assert parse_prompt_attention(text) == expected


def test_documented_example_weights():
    """The issue's example: the outer '(' of '(((house' is only closed at the end of the text, so
    everything after it is x1.1 and `[on]` lands back on 1.0."""
    runs = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert runs["house"] == pytest.approx(1.1 * 1.1 * 1.3)
    assert runs["on"] == pytest.approx(1.0)
    assert runs["hill"] == pytest.approx(0.55)
    assert runs["sky"] == pytest.approx(1.1**4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[word]", [("word", 1 / 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("(several words:0.8)", [("several words", 0.8)]),
        ("( spaced : 1.5 )", [(" spaced ", 1.5)]),
        ("((a:2)b)", [("a", 2 * 1.1), ("b", 1.1)]),
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("\\(a\\) \\[b\\] \\\\", [("(a) [b] \\", 1.0)]),
        ("a) b] c", [("a) b] c", 1.0)]),  # closers with nothing open are text
        ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),  # open groups run to the end
        ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight with no group open is text
        ("(a:b)", [("a:b", 1.1)]),  # a non-numeric weight: plain (x1.1) group, ':' kept
        ("", [("", 1.0)]),
    ],
)
def test_attention_edge_cases(text, expected):
    result = parse_prompt_attention(text)
    assert [t for t, _ in result] == [t for t, _ in expected]
    assert [w for _, w in result] == pytest.approx([w for _, w in expected])


def test_break_markers():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_attention("a,BREAK\nb (c)") == [("a,", 1.0), BREAK, ("b ", 1.0), ("c", 1.1)]
    # only the whole word: BREAKFAST is text
    assert parse_prompt_attention("BREAKFAST") == [("BREAKFAST", 1.0)]
    # inside brackets A1111 multiplies the marker's -1 too, so it is no longer a BREAK (tokenized as text)
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


# get_learned_conditioning_prompt_schedules doctests of A1111's prompt_parser.py, steps=10
SCHEDULE_DOCTESTS = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), SCHEDULE_DOCTESTS)
def test_schedule_matches_a1111_doctests(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_of_the_documented_landscape():
    """The example at the top of A1111's prompt_parser.py, 100 steps."""
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


@pytest.mark.parametrize(
    ("prompt", "steps", "expected"),
    [
        ("[red:blue:0.5]", 10, [(5, "red"), (10, "blue")]),
        ("[red:blue:7]", 10, [(7, "red"), (10, "blue")]),
        ("[red:blue:30]", 10, [(10, "red")]),  # past the end: never switches
        ("[red:blue:1.5]", 10, [(10, "red")]),  # a decimal point makes it a fraction (150% of the run)
        ("[red:blue:0]", 10, [(10, "blue")]),  # switched before the first step
        ("[red:blue:0.29]", 100, [(28, "red"), (100, "blue")]),  # int(0.29 * 100) = 28, as in A1111
        ("[red:blue:1e1]", 20, [(10, "red"), (20, "blue")]),
        ("[cat|dog|bird]", 4, [(1, "cat"), (2, "dog"), (3, "bird"), (4, "cat")]),
        ("[a:b:2] [c|d]", 3, [(1, "a c"), (2, "a d"), (3, "b c")]),
        ("a | b", 10, [(10, "a | b")]),  # '|' outside brackets: A1111's grammar fails, text is literal
        ("trailing \\", 10, [(10, "trailing \\")]),
        ("\\[a:b:2\\]", 10, [(10, "\\[a:b:2\\]")]),  # escaped brackets are not an edit
        ("[a:b]", 10, [(10, "[a:b]")]),  # no number: literal
    ],
)
def test_schedule_cases(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_extract_extra_networks():
    text, tags = extract_extra_networks("a cat <lora:film grain:0.8>, <hypernet:x> (b:1.2)<lora:y:1:te=0.5>")
    assert text == "a cat ,  (b:1.2)"
    assert tags == [
        ExtraNetwork("lora", "film grain", ["0.8"]),
        ExtraNetwork("hypernet", "x", []),
        ExtraNetwork("lora", "y", ["1", "te=0.5"]),
    ]
    assert extract_extra_networks("no tags <here> or <:x>") == ("no tags <here> or <:x>", [])


def test_malformed_weight_is_one_line_user_error():
    with pytest.raises(UserError, match=r"prompt weight '1\.2\.3' .* is not a number"):
        parse_prompt_attention("a (cat:1.2.3)")
