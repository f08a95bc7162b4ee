"""The calculator: Python's own arithmetic is the oracle for what it answers; what it must refuse is
refused without being executed (a side effect would show)."""

from __future__ import annotations

import pytest

from nanoforge.infer.tools import ToolRegistry, calculator, default_tools


@pytest.mark.parametrize("expr", ["1+2", "12 * (3 + 4)", "7/2", "7//2", "-7 % 3", "2**10", "-(3-10)*2",
                                  "1.5*4", "10/4", "(((1)))", "3 - -2", "+5", "2**-2", "123456789*987654321"])
def test_arithmetic_matches_python(expr: str) -> None:
    want = eval(expr)  # the oracle, on trusted literals only
    got = calculator(expr)
    assert float(got) == pytest.approx(want, rel=1e-11)


def test_string_count() -> None:
    assert calculator('"strawberry".count("r")') == "3"
    assert calculator("'Mississippi'.count('ss') + 1") == "3"


@pytest.mark.parametrize("expr", ["__import__('os').system('touch /tmp/pwned')", "open('/etc/passwd')",
                                  "(1).__class__", "'a'.upper()", "[x for x in range(10**9)]",
                                  "lambda: 1", "x", "'a' * 10", "1 if 1 else 2", "print(1)",
                                  "'abc'.count('a', 1)", "(1, 2)", "True + 1", "1j * 2", "sum(range(10**12))"])
def test_refuses_everything_else(expr: str, tmp_path) -> None:
    out = calculator(expr)
    assert out.startswith("error:")


@pytest.mark.timeout(60)  # computing 9**9**9 would take far longer: a refusal is the only way to pass
def test_huge_powers_and_long_inputs_are_refused_without_computing() -> None:
    for expr in ("9**9**9", "2**100000", "10**200", "(10**60)*(10**60)", "1" + "+1" * 500, "2.0**100000"):
        assert calculator(expr).startswith("error:"), expr
    assert calculator("1/0") == "error: division by zero"


def test_registry_refuses_two_tools_on_one_start_token_and_contains_errors() -> None:
    reg = default_tools()
    assert [t.name for t in reg] == ["calculator"]
    with pytest.raises(ValueError, match="both start"):
        reg.register("other", str)
    boom = ToolRegistry().register("boom", lambda s: 1 / 0)
    assert ToolRegistry.call(boom, "x") == "error: ZeroDivisionError"


def test_model_text_that_python_warns_about_is_refused_silently() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a SyntaxWarning printed to the user's terminal would raise here
        assert calculator("12a+3").startswith("error:") and calculator("0x1for 2").startswith("error:")
