"""Tools the model calls during generation, and the registry the engine looks them up in.

A tool is triggered by a pair of special tokens around its input (the calculator: `<|python_start|>` …
`<|python_end|>`, as nanochat's chat models are trained); the engine then forces the tool's answer into
the row as `<|output_start|>result<|output_end|>`. Adding a tool is a `registry.register(...)`, not an
engine change.

    calculator("12 * (3 + 4)")            # '84'
    calculator('"strawberry".count("r")') # '3'
    calculator("__import__('os')")        # 'error: only arithmetic and "text".count("x") are allowed'

The calculator never calls `eval`: it walks the `ast` of the expression and evaluates a handful of node
types itself, with limits on the input's length, the size of numbers, powers and time.
"""

from __future__ import annotations

import ast
import math
import operator
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MAX_CHARS = 256           # longer inputs are refused before parsing
MAX_NODES = 128           # ast nodes (bounds the work: there are no loops to run)
MAX_DIGITS = 100          # |integer results| < 10**100
MAX_EXPONENT = 1024       # x ** y: |y| bounded, and the result's size checked before computing it
TIME_LIMIT_S = 0.05

_BINOPS: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                 ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
                                 ast.Mod: operator.mod, ast.Pow: operator.pow}
_REFUSED = 'error: only arithmetic and "text".count("x") are allowed'


class _Refused(Exception):
    pass


def calculator(expr: str) -> str:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses, unary minus) or of
    `"text".count("x")`, as text; anything else, or a result out of bounds, gives a text starting with
    "error:" (the model reads it; nothing is executed)."""
    expr = expr.strip()
    if not expr:
        return "error: empty expression"
    if len(expr) > MAX_CHARS:
        return f"error: expression longer than {MAX_CHARS} characters"
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and the like: the model's text, not ours
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return "error: not a valid expression"
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        return "error: expression too long"
    deadline = time.monotonic() + TIME_LIMIT_S
    try:
        value = _eval(tree.body, deadline)
    except _Refused as e:
        return str(e)
    except ZeroDivisionError:
        return "error: division by zero"
    except (OverflowError, ValueError, TypeError):
        return "error: result out of range"
    return _format(value)


def _format(value: int | float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "error: result out of range"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def _check(value: object) -> object:
    if isinstance(value, int) and abs(value) >= 10 ** MAX_DIGITS:
        raise _Refused(f"error: result has more than {MAX_DIGITS} digits")
    return value


def _eval(node: ast.AST, deadline: float) -> object:
    if time.monotonic() > deadline:
        raise _Refused("error: took too long")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
            raise _Refused(_REFUSED)
        if isinstance(node.value, str):
            return node.value
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _number(_eval(node.operand, deadline))
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _number(_eval(node.left, deadline)), _number(_eval(node.right, deadline))
        if isinstance(node.op, ast.Pow):
            _check_power(a, b)
        return _check(_BINOPS[type(node.op)](a, b))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.func.value.value.count(node.args[0].value)
    raise _Refused(_REFUSED)


def _number(v: object) -> int | float:
    if isinstance(v, str):
        raise _Refused(_REFUSED)
    return v  # type: ignore[return-value]


def _check_power(base: int | float, exp: int | float) -> None:
    if abs(exp) > MAX_EXPONENT:
        raise _Refused(f"error: exponent larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        digits = exp * math.log10(abs(base))
        if digits >= MAX_DIGITS:
            raise _Refused(f"error: result has more than {MAX_DIGITS} digits")


@dataclass(frozen=True)
class Tool:
    """`fn(input text) -> output text`, called when the model closes `start` … `end`; its output is
    forced as `output_start` output `output_end`. `part` names the conversation part of the call
    (its output is `part + "_output"`)."""

    name: str
    fn: Callable[[str], str]
    start: str = "<|python_start|>"
    end: str = "<|python_end|>"
    output_start: str = "<|output_start|>"
    output_end: str = "<|output_end|>"
    part: str = "python"


class ToolRegistry:
    """The tools an engine may run, one per start token."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools or []:
            self.add(t)

    def add(self, tool: Tool) -> None:
        for other in self._tools.values():
            if other.start == tool.start and other.name != tool.name:
                raise ValueError(f"tools {other.name} and {tool.name} both start at {tool.start}")
        self._tools[tool.name] = tool

    def register(self, name: str, fn: Callable[[str], str], **tokens: str) -> Tool:
        """Add `fn` as tool `name` (keywords as in `Tool`: start, end, output_start, output_end, part)."""
        tool = Tool(name, fn, **tokens)
        self.add(tool)
        return tool

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @staticmethod
    def call(tool: Tool, text: str) -> str:
        """The tool's output for `text`; an exception inside the tool becomes an error text."""
        try:
            return str(tool.fn(text))
        except Exception as e:  # a tool must never end the generation of the other rows
            return f"error: {type(e).__name__}"


def default_tools() -> ToolRegistry:
    """The calculator on `<|python_start|>` … `<|python_end|>`."""
    return ToolRegistry([Tool("calculator", calculator)])
