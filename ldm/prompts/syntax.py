"""AUTOMATIC1111's prompt language as text: emphasis weights, BREAK, prompt editing and alternation over
the steps of a run, and extra-network tags (`<lora:name:0.8>`).

Pure string processing (no torch). The behaviour, including its quirks with unbalanced brackets, is that
of A1111's `modules/prompt_parser.py` and `modules/extra_networks.py`.
"""

import re
from dataclasses import dataclass
from typing import NamedTuple

from ldm.errors import UserError

BREAK = ("BREAK", -1.0)  # an entry of parse_prompt_attention's result: start a new 75-token chunk here

_ATTENTION_TOKEN = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\     # escaped bracket or backslash; a lone backslash
    | \( | \[                                 # openers
    | :\s*([+-]?[.\d]+)\s*\)                  # ':1.3)' closes a round group with an explicit weight
    | \) | \]                                 # closers
    | [^\\()\[\]:]+                           # text
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def _weight(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise UserError(
            f"prompt weight '{number}' in {text!r} is not a number: write e.g. (word:1.2)"
        ) from None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (text, weight) runs: `(x)` x1.1, `[x]` /1.1, `(x:1.3)` x1.3, nesting multiplies;
    `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; a bracket left open applies to the end of the text,
    a closer with nothing open is literal text. `BREAK` (a whole word) gives the entry `BREAK`. A weight
    that is not a number (`(a:1.2.3)`, where A1111 fails with ValueError) is a UserError.
    Neighbouring runs of equal weight are merged; an empty text gives [("", 1.0)].

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []  # [text, weight], weights multiplied in place as groups close
    round_open: list[int] = []  # index in runs where each open group starts
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, _ROUND)
    for start in square_open:
        multiply(start, _SQUARE)

    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(run_text, run_weight) for run_text, run_weight in merged]


# Prompt editing and alternation: a recursive-descent reading of A1111's grammar
#   start:     (prompt | literal "[", "]", "(", ")" or ":")*
#   prompt:    (emphasized | scheduled | alternate | plain)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled: "[" [prompt ":"] prompt ":" NUMBER "]"     (whitespace allowed around NUMBER)
#   alternate: "[" prompt ("|" prompt)+ "]"
# where plain is text without unescaped brackets, ":" or "|". Text that does not fit (a "|" outside
# brackets, a trailing backslash) is used literally at every step. This agrees with A1111's lark parser on
# randomized prompts except where lark itself fails: an edit directly followed by two or more stray
# brackets or colons (`[a:b:2]))`), or a newline after such a run, makes A1111 use the whole prompt
# literally; here the edit still applies.

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*\]")


@dataclass
class _Edit:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: list | None
    after: list
    when: str  # the number as written: with a "." a fraction of the steps, else a step number


@dataclass
class _Alternate:
    """`[a|b|...]`: option (step - 1) % len(options) at step."""

    options: list[list]


def _sequence(text: str, i: int) -> tuple[list, int]:
    """The longest `prompt` from text[i]: (items, end) with items str, _Edit or _Alternate."""
    items: list = []
    while i < len(text):
        plain = _PLAIN.match(text, i)
        if plain:
            items.append(plain.group())
            i = plain.end()
            continue
        group = _group(text, i)
        if group is None:
            break
        node, i = group
        items.extend(node) if isinstance(node, list) else items.append(node)
    return items, i


def _group(text: str, i: int) -> tuple[list | _Edit | _Alternate, int] | None:
    """The bracketed construct opening at text[i] and the index after it, or None when there is none."""
    opener = text[i]
    if opener not in "([":
        return None
    first, j = _sequence(text, i + 1)
    at = text[j : j + 1]
    if opener == "(":
        if at == ")":
            return ["(", *first, ")"], j + 1
        if at == ":":
            weight, k = _sequence(text, j + 1)
            if text[k : k + 1] == ")":
                return ["(", *first, ":", *weight, ")"], k + 1
        return None
    if at == "]":
        return ["[", *first, "]"], j + 1
    if at == ":":
        if when := _WHEN.match(text, j + 1):
            return _Edit(None, first, when.group(1)), when.end()
        second, k = _sequence(text, j + 1)
        if text[k : k + 1] == ":" and (when := _WHEN.match(text, k + 1)):
            return _Edit(first, second, when.group(1)), when.end()
        return None
    if at == "|":
        options = [first]
        while text[j : j + 1] == "|":
            option, j = _sequence(text, j + 1)
            options.append(option)
        if text[j : j + 1] == "]":
            return _Alternate(options), j + 1
    return None


def _parse(prompt: str) -> list | None:
    """The items of `prompt` at the top level (where stray brackets and ":" are literal), or None."""
    items: list = []
    i = 0
    while i < len(prompt):
        sequence, j = _sequence(prompt, i)
        if j > i:
            items += sequence
            i = j
        elif prompt[i] in "[]():":
            items.append(prompt[i])
            i += 1
        else:
            return None
    return items


def _edit_step(when: str, steps: int) -> int:
    """The last step of an edit's first part: `when` with a "." is a fraction of `steps`, else a step."""
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


def _switch_steps(items: list, steps: int) -> set[int]:
    found: set[int] = set()
    for item in items:
        if isinstance(item, _Edit):
            if (step := _edit_step(item.when, steps)) >= 1:
                found.add(step)
            found |= _switch_steps(item.before or [], steps) | _switch_steps(item.after, steps)
        elif isinstance(item, _Alternate):
            found |= set(range(1, steps + 1))
            for option in item.options:
                found |= _switch_steps(option, steps)
    return found


def _text_at(items: list, step: int, steps: int) -> str:
    out = []
    for item in items:
        if isinstance(item, _Edit):
            chosen = item.before or [] if step <= _edit_step(item.when, steps) else item.after
            out.append(_text_at(chosen, step, steps))
        elif isinstance(item, _Alternate):
            out.append(_text_at(item.options[(step - 1) % len(item.options)], step, steps))
        else:
            out.append(item)
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The texts `prompt` stands for over a run of `steps` steps: [(end_step, text), ...], ascending, the
    last end_step being `steps`. Text i applies while the sampler's step index (0-based) is <= end_step i
    and > end_step i - 1, as A1111 compares them (see ScheduledConditioning).

    `[from:to:when]` is `from` up to step `when` and `to` after it, `[to:when]` adds `to` and `[from::when]`
    removes `from` after step `when`; `when` with a decimal point is a fraction of `steps`, else a step
    number. `[a|b]` alternates every step. Editing nests; emphasis brackets pass through unchanged.

    >>> prompt_schedule("a [red:blue:0.5] ball", 10)
    [(5, 'a red ball'), (10, 'a blue ball')]
    """
    items = _parse(prompt)
    if items is None:
        return [(steps, prompt)]
    ends = sorted(_switch_steps(items, steps) | {steps})
    return [(end, _text_at(items, end, steps)) for end in ends]


class ExtraNetwork(NamedTuple):
    """An extra-network tag `<kind:name:arg:...>`, e.g. `<lora:name:0.8>` -> ("lora", "name", ["0.8"])."""

    kind: str
    name: str
    args: list[str]


_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetwork]]:
    """(`text` with its `<kind:name:args>` tags removed, the tags in order of appearance)."""
    found: list[ExtraNetwork] = []

    def take(match: re.Match) -> str:
        name, *args = match.group(2).split(":")
        found.append(ExtraNetwork(match.group(1), name, args))
        return ""

    return _EXTRA_NETWORK.sub(take, text), found


def lora_tags(prompts: list[str]) -> list[tuple[str, float]]:
    """The `<lora:name:weight>` tags of the prompts as (name, weight), each name once (its first weight; 1.0
    when none is given)."""
    found: dict[str, float] = {}
    for prompt in prompts:
        for network in extract_extra_networks(prompt)[1]:
            if network.kind != "lora" or network.name in found:
                continue
            try:
                found[network.name] = float(network.args[0]) if network.args else 1.0
            except ValueError:
                raise UserError(
                    f"<lora:{network.name}:{network.args[0]}>: the weight must be a number, e.g. <lora:{network.name}:0.8>"
                ) from None
    return list(found.items())
