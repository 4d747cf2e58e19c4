"""The series selectors in a PromQL expression: which metric names and label matchers it uses.

Enough of PromQL for alert rules and dashboards (selectors, functions, aggregations with their label lists,
binary operators and their matching clauses, ranges, numbers, Grafana's `$variables`); anything else is refused,
so an expression it cannot read fails the test rather than being passed over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<variable>\$\w+)
  | (?P<operator>=~|!~|!=|==|>=|<=|[{}(),=<>+\-*/^%])
    """,
    re.VERBOSE,
)
_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
                 "count_values", "limitk", "limit_ratio"}  # fmt: skip
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


@dataclass
class Selector:
    metric: str
    #: label -> (operator, value) for every matcher in braces
    matchers: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Expression:
    selectors: list[Selector]
    #: labels named in `by (...)`, `on (...)` and the like
    grouping: set[str]


def _tokens(text: str) -> list[tuple[str, str]]:
    found, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"cannot read {text[position : position + 30]!r} in {text!r}")
        if match.lastgroup != "space":
            found.append((str(match.lastgroup), match.group()))
        position = match.end()
    return found


def parse(text: str) -> Expression:
    tokens = _tokens(text)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    index = 0

    def following(offset: int = 1) -> str:
        return tokens[index + offset][1] if index + offset < len(tokens) else ""

    while index < len(tokens):
        kind, value = tokens[index]
        if kind == "operator" and value == "{":
            raise ValueError(f"a selector without a metric name in {text!r}")
        if kind != "name":
            index += 1
            continue
        if value in _LABEL_LISTS:
            if following() == "(":
                end = next(i for i in range(index, len(tokens)) if tokens[i][1] == ")")
                grouping |= {v for k, v in tokens[index + 2 : end] if k == "name"}
                index = end
            index += 1
        elif value in _KEYWORDS or value in _AGGREGATIONS or following() == "(":
            index += 1  # an operator, an aggregation or a function
        else:
            selector = Selector(value)
            index += 1
            if following(0) == "{":
                end = next(i for i in range(index, len(tokens)) if tokens[i][1] == "}")
                matchers = [t for t in tokens[index + 1 : end] if t[1] != ","]
                if len(matchers) % 3:
                    raise ValueError(f"cannot read the matchers of {value} in {text!r}")
                for label, operator, quoted in zip(matchers[::3], matchers[1::3], matchers[2::3], strict=True):
                    if label[0] != "name" or operator[0] != "operator" or quoted[0] != "string":
                        raise ValueError(f"cannot read the matchers of {value} in {text!r}")
                    selector.matchers[label[1]] = (operator[1], quoted[1][1:-1])
                index = end + 1
            selectors.append(selector)
    return Expression(selectors, grouping)
