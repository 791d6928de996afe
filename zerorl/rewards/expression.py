"""A safe parser for the arithmetic expressions of the Countdown game.

Countdown answers are things like ``(25-5)*3`` that must reach a target using given numbers. The text
comes from a policy under optimisation, i.e. from an adversary that is paid to find holes, so it is
never handed to Python (no eval/exec/ast): a small tokenizer and a recursive-descent parser accept
exactly this grammar and nothing else::

    expr   := term   (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := INTEGER | "(" expr ")"

Operator spellings: ``+``; ``-`` or ``−`` (U+2212); ``*``, ``x``, ``X``, ``×`` or ``·``; ``/`` or ``÷``.
There are no unary operators, no powers (``**`` is two multiplications in a row: a syntax error), no
names, no calls, no brackets other than parentheses. Length, token count, nesting depth and literal
size are capped before any arithmetic, and arithmetic is exact (``fractions.Fraction``), so ``1/3*3``
is exactly 1 and division by zero is an error rather than a float ``inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

OPERATOR_SPELLINGS = {
    "+": "+",
    "-": "-",
    "\u2212": "-",
    "*": "*",
    "x": "*",
    "X": "*",
    "\u00d7": "*",
    "\u00b7": "*",
    "/": "/",
    "\u00f7": "/",
}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

MAX_EXPRESSION_CHARS = 200
MAX_TOKENS = 64
MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 9


class ExpressionError(ValueError):
    """The text is not an acceptable arithmetic expression (the message says why and where)."""


@dataclass(frozen=True)
class Number:
    value: int


@dataclass(frozen=True)
class BinaryOp:
    op: str  # one of + - * /
    left: Number | BinaryOp
    right: Number | BinaryOp


Node = Number | BinaryOp


class _Token(NamedTuple):
    kind: str  # "num", "op", "(", ")"
    text: str
    position: int


def tokenize(text: str, max_tokens: int = MAX_TOKENS) -> list[_Token]:
    """Split ``text`` into integer literals, operators and parentheses; anything else is an error."""
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in " \t\n\r":
            i += 1
            continue
        if "0" <= char <= "9":  # ASCII only: str.isdigit() would also accept e.g. Arabic-Indic digits
            start = i
            while i < len(text) and "0" <= text[i] <= "9":
                i += 1
            if i - start > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number at position {start} has more than {MAX_LITERAL_DIGITS} digits")
            tokens.append(_Token("num", text[start:i], start))
        elif char in OPERATOR_SPELLINGS:
            tokens.append(_Token("op", OPERATOR_SPELLINGS[char], i))
            i += 1
        elif char in "()":
            tokens.append(_Token(char, char, i))
            i += 1
        else:
            raise ExpressionError(f"unexpected character {char!r} at position {i}")
        if len(tokens) > max_tokens:
            raise ExpressionError(f"more than {max_tokens} tokens")
    return tokens


class _Parser:
    def __init__(self, tokens: list[_Token], max_depth: int):
        self.tokens = tokens
        self.index = 0
        self.max_depth = max_depth

    def peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def parse_expr(self, depth: int) -> Node:
        node = self.parse_term(depth)
        while (token := self.peek()) is not None and token.kind == "op" and token.text in "+-":
            self.index += 1
            node = BinaryOp(token.text, node, self.parse_term(depth))
        return node

    def parse_term(self, depth: int) -> Node:
        node = self.parse_factor(depth)
        while (token := self.peek()) is not None and token.kind == "op" and token.text in "*/":
            self.index += 1
            node = BinaryOp(token.text, node, self.parse_factor(depth))
        return node

    def parse_factor(self, depth: int) -> Node:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends where a number or '(' was expected")
        self.index += 1
        if token.kind == "num":
            return Number(int(token.text))
        if token.kind == "(":
            if depth + 1 > self.max_depth:
                raise ExpressionError(f"parentheses nested deeper than {self.max_depth}")
            node = self.parse_expr(depth + 1)
            closing = self.peek()
            if closing is None or closing.kind != ")":
                raise ExpressionError(f"'(' at position {token.position} is not closed")
            self.index += 1
            return node
        raise ExpressionError(f"expected a number or '(' at position {token.position}, got {token.text!r}")


def parse_expression(
    text: str,
    max_chars: int = MAX_EXPRESSION_CHARS,
    max_tokens: int = MAX_TOKENS,
    max_depth: int = MAX_DEPTH,
) -> Node:
    """Parse ``text`` into a tree of ``Number`` and ``BinaryOp`` nodes, or raise ``ExpressionError``."""
    if len(text) > max_chars:
        raise ExpressionError(f"expression longer than {max_chars} characters ({len(text)})")
    tokens = tokenize(text, max_tokens)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens, max_depth)
    node = parser.parse_expr(depth=0)
    leftover = parser.peek()
    if leftover is not None:
        raise ExpressionError(f"unexpected {leftover.text!r} at position {leftover.position}")
    return node


def evaluate(node: Node) -> Fraction:
    """Exact value of the tree; division by zero raises ``ExpressionError``."""
    if isinstance(node, Number):
        return Fraction(node.value)
    left, right = evaluate(node.left), evaluate(node.right)
    if node.op == "+":
        return left + right
    if node.op == "-":
        return left - right
    if node.op == "*":
        return left * right
    if right == 0:
        raise ExpressionError("division by zero")
    return left / right


def numbers_used(node: Node) -> list[int]:
    """The integer literals of the tree, left to right."""
    if isinstance(node, Number):
        return [node.value]
    return numbers_used(node.left) + numbers_used(node.right)


def render(node: Node) -> str:
    """The tree as text with the fewest parentheses that keep its meaning, e.g. ``(3+5)*7-2``."""
    if isinstance(node, Number):
        return str(node.value)
    precedence = _PRECEDENCE[node.op]
    left = render(node.left)
    if isinstance(node.left, BinaryOp) and _PRECEDENCE[node.left.op] < precedence:
        left = f"({left})"
    right = render(node.right)
    if isinstance(node.right, BinaryOp):
        right_precedence = _PRECEDENCE[node.right.op]
        # a-(b+c) and a/(b*c) need the parentheses; a+(b-c) and a*(b/c) do not (exact arithmetic).
        if right_precedence < precedence or (right_precedence == precedence and node.op in "-/"):
            right = f"({right})"
    return f"{left}{node.op}{right}"


class CountdownVerdict(NamedTuple):
    correct: bool
    reason: str  # "" when correct, otherwise why not (for debugging and tests)


def check_countdown(
    expression: str, numbers: list[int], target: int | Fraction, require_all: bool = True
) -> CountdownVerdict:
    """Does ``expression`` reach ``target`` using each of ``numbers`` at most once (exactly once when
    ``require_all``, as in TinyZero), with + - * / and parentheses only?"""
    try:
        node = parse_expression(expression)
        remaining = list(numbers)
        for value in numbers_used(node):
            if value not in remaining:
                return CountdownVerdict(False, f"uses {value}, which is not an available number")
            remaining.remove(value)
        if require_all and remaining:
            return CountdownVerdict(False, f"does not use {remaining}")
        value = evaluate(node)
    except ExpressionError as error:
        return CountdownVerdict(False, str(error))
    if value != target:
        return CountdownVerdict(False, f"evaluates to {value}, not {target}")
    return CountdownVerdict(True, "")
