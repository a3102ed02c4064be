"""The condition language shared by route `WHERE` clauses and twin queries (pure).

Comparisons (`=`, `!=`, `<>`, `<`, `>`, `<=`, `>=`), `IN` / `NIN` a list (`[...]` or `(...)`),
`AND`, `OR`, `NOT`, parentheses, string (`'x'` or `"x"`), number, `true`/`false`/`null`
literals (`true` alone is a condition), `IS_DEFINED(name)`, `STARTSWITH(name, 'x')` and
`ENDSWITH(name, 'x')`. A name segment that is not an identifier is quoted as `[[...]]`
(`configurations.[[ring-1]].status`). A name the message or twin does not have is undefined:
comparisons with it are undefined, and an undefined condition does not match (three-valued
logic, as IoT Hub's query language has it).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Value = str | float | int | bool | None


class ExpressionError(ValueError):
    """The condition does not parse."""


class _Undefined:
    """A name that resolves to nothing (distinct from JSON null)."""

    def __repr__(self) -> str:
        return "UNDEFINED"


class _Composite(_Undefined):
    """An object or array: defined (for IS_DEFINED), yet never compared with a value."""

    def __repr__(self) -> str:
        return "COMPOSITE"


UNDEFINED = _Undefined()
COMPOSITE = _Composite()
Lookup = Callable[[str], "Value | _Undefined"]

COMPARISONS = ("=", "!=", "<>", "<", ">", "<=", ">=")


@dataclass(frozen=True)
class Literal:
    value: Value


@dataclass(frozen=True)
class Name:
    path: str


@dataclass(frozen=True)
class Compare:
    op: str
    left: Literal | Name
    right: Literal | Name


@dataclass(frozen=True)
class IsDefined:
    name: Name


@dataclass(frozen=True)
class In:
    operand: Literal | Name
    choices: tuple[Literal | Name, ...]
    negated: bool = False  # NIN


@dataclass(frozen=True)
class StringTest:
    function: str  # STARTSWITH or ENDSWITH
    operand: Literal | Name
    affix: Literal | Name


@dataclass(frozen=True)
class Constant:
    value: bool


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class And:
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Or:
    left: Expr
    right: Expr


Expr = Compare | IsDefined | In | StringTest | Constant | Not | And | Or


# ---------------------------------------------------------------- tokens

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*'|"(?:[^"]|"")*")
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>(?:\[\[[^\]]+\]\]|[$A-Za-z_][$A-Za-z0-9_\-]*)
             (?:\.(?:\[\[[^\]]+\]\]|[$A-Za-z0-9_\-]+))*)
  | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|\[|\]|,)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"AND", "OR", "NOT", "TRUE", "FALSE", "NULL", "IS_DEFINED", "IN", "NIN"}
_STRING_FUNCTIONS = {"STARTSWITH", "ENDSWITH"}
_SEGMENT = re.compile(r"\[\[([^\]]+)\]\]|([^.\[]+)")


@functools.lru_cache(maxsize=4096)  # queries over a fleet split the same few paths again
def split_path(path: str) -> tuple[str, ...]:
    """`a.[[b.c]].d` -> ('a', 'b.c', 'd'): the segments of a property name."""
    return tuple(quoted or plain for quoted, plain in _SEGMENT.findall(path))


@dataclass(frozen=True)
class _Token:
    kind: str  # "string", "number", "op", "name", "keyword", "end"
    text: str


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExpressionError(f"unexpected character at {pos}: {text[pos]!r}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None  # one named group always matches
        value = match.group()
        if kind == "space":
            continue
        if kind == "name" and value.upper() in _KEYWORDS | _STRING_FUNCTIONS:
            tokens.append(_Token("keyword", value.upper()))
        else:
            tokens.append(_Token(kind, value))
    tokens.append(_Token("end", ""))
    return tokens


# ---------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokenize(text)
        self._pos = 0

    def _peek(self) -> _Token:
        return self._tokens[self._pos]

    def _next(self) -> _Token:
        token = self._tokens[self._pos]
        self._pos += 1
        return token

    def _accept(self, kind: str, text: str) -> bool:
        token = self._peek()
        if token.kind == kind and token.text == text:
            self._pos += 1
            return True
        return False

    def _expect(self, kind: str, text: str) -> None:
        if not self._accept(kind, text):
            raise ExpressionError(f"expected {text!r}, found {self._peek().text!r}")

    def parse(self) -> Expr:
        expr = self._or()
        if self._peek().kind != "end":
            raise ExpressionError(f"unexpected {self._peek().text!r}")
        return expr

    def _or(self) -> Expr:
        expr = self._and()
        while self._accept("keyword", "OR"):
            expr = Or(expr, self._and())
        return expr

    def _and(self) -> Expr:
        expr = self._not()
        while self._accept("keyword", "AND"):
            expr = And(expr, self._not())
        return expr

    def _not(self) -> Expr:
        if self._accept("keyword", "NOT"):
            return Not(self._not())
        if self._accept("op", "("):
            expr = self._or()
            self._expect("op", ")")
            return expr
        function = self._peek()
        if function.kind == "keyword" and function.text in ("IS_DEFINED", *_STRING_FUNCTIONS):
            self._next()
            return self._function(function.text)
        left = self._operand()
        if isinstance(left, Literal) and isinstance(left.value, bool) and self._ends_term():
            return Constant(left.value)  # `true` alone: a route that takes every message
        if self._peek().kind == "keyword" and self._peek().text in ("IN", "NIN"):
            return self._membership(left)
        op = self._next()
        if op.kind != "op" or op.text not in COMPARISONS:
            raise ExpressionError(f"expected a comparison, found {op.text!r}")
        return Compare(op.text, left, self._operand())

    def _function(self, name: str) -> Expr:
        self._expect("op", "(")
        operand = self._operand()
        if name == "IS_DEFINED":
            self._expect("op", ")")
            if not isinstance(operand, Name):
                raise ExpressionError("IS_DEFINED takes a property name")
            return IsDefined(operand)
        self._expect("op", ",")
        affix = self._operand()
        self._expect("op", ")")
        return StringTest(name, operand, affix)

    def _membership(self, left: Literal | Name) -> Expr:
        negated = self._next().text == "NIN"
        closing = "]" if self._accept("op", "[") else ")"
        if closing == ")":
            self._expect("op", "(")
        choices = [self._operand()]
        while self._accept("op", ","):
            choices.append(self._operand())
        self._expect("op", closing)
        return In(left, tuple(choices), negated)

    def _ends_term(self) -> bool:
        token = self._peek()
        return token.kind == "end" or token.text in (")", "AND", "OR")

    def _operand(self) -> Literal | Name:
        token = self._next()
        if token.kind == "name":
            return Name(token.text)
        if token.kind == "string":
            quote = token.text[0]
            return Literal(token.text[1:-1].replace(quote * 2, quote))
        if token.kind == "number":
            number = float(token.text)
            return Literal(int(number) if number.is_integer() and "." not in token.text else number)
        if token.kind == "keyword" and token.text in {"TRUE", "FALSE", "NULL"}:
            return Literal({"TRUE": True, "FALSE": False, "NULL": None}[token.text])
        raise ExpressionError(f"expected a name or a literal, found {token.text!r}")


def parse(text: str) -> Expr:
    if not text.strip():
        raise ExpressionError("empty condition")
    return _Parser(text).parse()


# ---------------------------------------------------------------- evaluation


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<>": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
    "<=": operator.le,
    ">=": operator.ge,
}


def _compare(op: str, left: Value, right: Value) -> bool | None:
    """None when the two values are not comparable (undefined in the query language)."""
    if isinstance(left, str) and isinstance(right, str):
        return bool(_OPERATORS[op](left, right))
    if isinstance(left, bool) or isinstance(right, bool) or left is None or right is None:
        if op not in ("=", "!=", "<>"):
            return None
        same = type(left) is type(right) and left == right
        return same if op == "=" else not same
    # Application properties are strings on the wire; compared with a number they count as
    # numbers when they parse as one.
    left_number, right_number = _number(left), _number(right)
    if left_number is None or right_number is None:
        return None
    return bool(_OPERATORS[op](left_number, right_number))


def _resolve(operand: Literal | Name, lookup: Lookup) -> Value | _Undefined:
    return operand.value if isinstance(operand, Literal) else lookup(operand.path)


def _leaf(expr: Compare | IsDefined | In | StringTest, lookup: Lookup) -> bool | None:  # noqa: PLR0911  # one return per case of three-valued logic
    """A comparison or a function: None when undefined (a name missing, types that differ)."""
    match expr:
        case Compare(op, left, right):
            a, b = _resolve(left, lookup), _resolve(right, lookup)
            if isinstance(a, _Undefined) or isinstance(b, _Undefined):
                return None
            return _compare(op, a, b)
        case IsDefined(name):
            found = lookup(name.path)
            return isinstance(found, _Composite) or not isinstance(found, _Undefined)
        case In(operand, choices, negated):
            subject = _resolve(operand, lookup)
            if isinstance(subject, _Undefined):
                return None
            options = [_resolve(choice, lookup) for choice in choices]
            member = any(
                not isinstance(option, _Undefined) and _compare("=", subject, option)
                for option in options
            )
            return member != negated
        case StringTest(function, operand, affix):
            text, part = _resolve(operand, lookup), _resolve(affix, lookup)
            if not isinstance(text, str) or not isinstance(part, str):
                return None
            return text.startswith(part) if function == "STARTSWITH" else text.endswith(part)
    raise AssertionError(f"unknown expression {expr!r}")


def _evaluate(expr: Expr, lookup: Lookup) -> bool | None:  # noqa: PLR0911  # one return per case of three-valued logic
    match expr:
        case Constant(constant):
            return constant
        case Not(operand):
            inner = _evaluate(operand, lookup)
            return None if inner is None else not inner
        case And(left, right):
            a, b = _evaluate(left, lookup), _evaluate(right, lookup)
            if a is False or b is False:
                return False
            return None if a is None or b is None else True
        case Or(left, right):
            a, b = _evaluate(left, lookup), _evaluate(right, lookup)
            if a is True or b is True:
                return True
            return None if a is None or b is None else False
    return _leaf(expr, lookup)


def matches(expr: Expr, lookup: Lookup) -> bool:
    return _evaluate(expr, lookup) is True
