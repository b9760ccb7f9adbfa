"""The bridge between the tests' process and the program's (assert mode): values
arrive as they left (type, order, in-place changes), objects with their own
equality arrive as stubs that equal no plain value, and the judge lends and
accepts nothing that could run code in it. Both ends run here, the program's in
a thread, over real pipes."""

from __future__ import annotations

import ast
import collections
import datetime
import decimal
import enum
import fractions
import math
import os
import sys
import threading
import types
from pathlib import Path

import pytest

from wmtp.sandbox import bridge
from wmtp.sandbox.bridge import BridgeBroken, Peer, Stub


class Ends:
    """A judge end in this thread and a program end serving `namespace` in another."""

    def __init__(self) -> None:
        judge_read, program_write = os.pipe()
        program_read, judge_write = os.pipe()
        self.fds = [judge_read, program_write, program_read, judge_write]
        self.judge = Peer(judge_read, judge_write, bridge.JUDGE_OPERATIONS, bridge.judge_may_export)
        self.program = Peer(program_read, program_write)
        self.namespace: dict = {}
        self.program.handlers["names"] = lambda names: {n: self.namespace[n] for n in names if n in self.namespace}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.program.serve_forever()
        except BridgeBroken:
            pass

    def fetch(self, value):
        """`value`, defined by the program, as the judge's tests see it."""
        self.namespace["value"] = value
        return self.judge.request("names", ["value"])["value"]

    def echo(self, value):
        """`value` sent by the judge to the program and returned."""
        self.namespace["echo"] = lambda v: v
        return self.judge.request("names", ["echo"])["echo"](value)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.thread.join(5)


def as_tests_define(source: str):
    """A function as the tests' code makes it (only those are lent to the program)."""
    return eval(compile(source, "<tests>", "eval"))


@pytest.fixture
def ends():
    pair = Ends()
    yield pair
    pair.close()


Point = collections.namedtuple("Point", "x y")
PLAIN_VALUES = [
    0, -1, 2**5000, -(2**5000) + 7, 1.5, 1e300, -0.0, math.inf, -math.inf, "é\ud800x", b"\x00\xff",
    bytearray(b"ab"), [1, [2, (3,)]], (1,), (), {1: "a", (1, 2): [3], "k": {"n": None}}, {3, 1, 2},
    frozenset({9, 4}), range(1, 10, 2), 1 + 2j, True, None, collections.Counter("abca"),
    collections.OrderedDict([("b", 1), ("a", 2)]), collections.defaultdict(list, {"a": [1]}),
    collections.deque([1, 2], maxlen=5), decimal.Decimal("1.10"), fractions.Fraction(1, 3),
    datetime.date(2024, 2, 29), datetime.datetime(2024, 1, 2, 3, 4, 5, 6), datetime.time(7, 8),
    datetime.timedelta(days=2, seconds=3),
]


@pytest.mark.parametrize("direction", ["returned", "sent and returned"])
def test_plain_values_arrive_with_their_type_and_value(ends, direction):
    for value in PLAIN_VALUES:
        got = ends.fetch(value) if direction == "returned" else ends.echo(value)
        assert type(got) is type(value) and got == value and repr(got) == repr(value), value
    strings = frozenset({"a", "b", "c"})  # equal, but in an order of its hash table (README: limits)
    got = ends.fetch(strings) if direction == "returned" else ends.echo(strings)
    assert type(got) is frozenset and got == strings
    assert math.isnan(ends.fetch(math.nan)) and math.copysign(1, ends.fetch(-0.0)) == -1
    assert ends.fetch(collections.deque([1], maxlen=5)).maxlen == 5
    assert ends.fetch(collections.defaultdict(list))["new"] == []


def test_dict_views_compare_as_in_plain_python(ends):
    table = {"a": 1, "b": 2}
    assert ends.fetch(table.keys()) == {"a", "b"} and list(ends.fetch(table.keys())) == ["a", "b"]
    assert ends.fetch(table.items()) == {("a", 1), ("b", 2)}


def test_namedtuples_keep_their_fields(ends):
    got = ends.fetch(Point(1, 2))
    assert got == (1, 2) and got.x == 1 and got.y == 2 and type(got).__name__ == "Point"


def test_set_and_dict_iteration_order_survives(ends):
    """tuple(s) of a set the tests pass is what the program computes (MBPP 341's
    reference fails as released because {12, ..., 16} iterates from 16)."""
    for value in ({12, 13, 14, 15, 16}, {6, 7, 8, 9, 10, 11}, set(range(0, 90, 3)), {1, 2, 3, 4, 5}):
        assert list(ends.echo(value)) == list(value)
        assert list(ends.fetch(value)) == list(value)
    ordered = {"z": 1, "a": 2, "m": 3}
    assert list(ends.echo(ordered)) == list(ordered)


class Colour(enum.IntEnum):
    RED = 3


class Text(str):
    pass


class Items(list):
    pass


def test_subclasses_that_keep_the_base_equality_arrive_as_the_base(ends):
    """An IntEnum is an int, a str subclass without its own __eq__ a str: they
    compare as they do in plain Python."""
    for value, base in ((Colour.RED, int), (Text("ab"), str), (Items([1, 2]), list)):
        got = ends.fetch(value)
        assert type(got) is base and got == value


def _always_equal_classes() -> dict[str, object]:
    def equal(self, other):
        return True

    def not_unequal(self, other):
        return False

    made = {"class with __eq__": type("Any", (), {"__eq__": equal, "__hash__": object.__hash__})(),
            "class with __ne__": type("NeverUnequal", (), {"__ne__": not_unequal})()}
    for base, sample in ((int, 0), (float, 0.0), (str, ""), (list, []), (tuple, ()), (dict, {}),
                         (bytes, b""), (set, ())):
        kind = type(f"Equal{base.__name__}", (base,), {"__eq__": equal, "__ne__": not_unequal,
                                                        "__hash__": base.__hash__ or object.__hash__})
        made[f"{base.__name__} subclass"] = kind(sample)
    return made


@pytest.mark.parametrize("name", list(_always_equal_classes()))
def test_an_object_with_its_own_equality_equals_no_plain_value(ends, name):
    got = ends.fetch(_always_equal_classes()[name])
    assert isinstance(got, Stub)
    for expected in (0, 0.0, "", [], (), {}, set(), None, True, 3, "x", [1]):
        assert not got == expected and not expected == got
        assert got != expected and expected != got
    assert got in [got] and got not in [0, "", []]


def test_numbers_that_fake_arithmetic_arrive_as_plain_numbers(ends):
    """A float subclass whose __sub__ returns 0 is a float here: abs(x - y) < 1e-6
    reads its value, not its arithmetic."""
    tricky = type("Near", (float,), {"__sub__": lambda self, other: 0.0, "__abs__": lambda self: 0.0})
    got = ends.fetch(tricky(7.0))
    assert type(got) is float and abs(got - 3.0) == 4.0
    with pytest.raises(TypeError):
        ends.fetch(type("Zero", (), {"__sub__": lambda s, o: 0})()) - 3


def test_arguments_changed_in_place_come_back_into_the_callers_objects(ends):
    ends.namespace["change"] = lambda items, table, seen: (items.sort(), items[0].append(9),
                                                           table.update(b=2), seen.add(5))
    change = ends.judge.request("names", ["change"])["change"]
    inner = [7]
    items, table, seen = [[8], inner, [0]], {"a": 1}, {1}
    change(items, table, seen)
    assert items == [[0, 9], [7], [8]] and items[1] is inner
    assert table == {"a": 1, "b": 2} and seen == {1, 5}


def test_callbacks_and_iteration_cross_both_ways(ends):
    ends.namespace.update(apply=lambda f, xs: [f(x) for x in xs], count=lambda n: (i for i in range(n)))
    found = ends.judge.request("names", ["apply", "count"])
    double = as_tests_define("lambda v: v * 2")
    assert found["apply"](double, iter([1, 2, 3])) == [2, 4, 6]
    assert list(found["count"](4)) == [0, 1, 2, 3] and sum(found["count"](3)) == 3


def test_program_objects_work_through_stubs(ends):
    class Node:
        def __init__(self, value):
            self.value, self.left = value, None

    ends.namespace.update(Node=Node, depth=lambda n: 0 if n is None else 1 + ends.namespace["depth"](n.left))
    found = ends.judge.request("names", ["Node", "depth"])
    root = found["Node"](1)
    root.left = found["Node"](2)
    assert found["depth"](root) == 2 and root.left.value == 2 and root == root


def test_exceptions_arrive_as_the_nearest_builtin_class(ends):
    class Mine(KeyError):
        pass

    def raises(kind):
        if kind == "mine":
            raise Mine("k")
        if kind == "unicode":
            b"\xff".decode()
        raise SystemExit(3)

    ends.namespace["raises"] = raises
    raises_ = ends.judge.request("names", ["raises"])["raises"]
    with pytest.raises(KeyError):
        raises_("mine")
    with pytest.raises(ValueError):  # UnicodeDecodeError cannot be rebuilt from a message
        raises_("unicode")
    with pytest.raises(SystemExit):
        raises_("exit")


def test_modules_arrive_as_the_receivers_own(ends):
    fake = types.ModuleType("math")
    fake.isclose = lambda *a, **k: True
    assert ends.fetch(fake) is math and ends.fetch(types.ModuleType("no_such_module_x")).__class__ is Stub
    assert ends.fetch(math.sqrt) is math.sqrt and ends.fetch(collections.Counter) is collections.Counter


def test_the_judge_lends_nothing_that_reaches_its_state(ends):
    ends.namespace["keep"] = lambda v: v
    keep = ends.judge.request("names", ["keep"])["keep"]
    for refused in (eval, exec, open, getattr, __import__, sys._getframe(0), (lambda: 0).__code__,
                    lambda: 0):  # a function not of the tests' code
        with pytest.raises(TypeError):
            keep(refused)
    assert keep(os) is os  # a module goes by name: the program gets its own, and we ours back
    tests_function = as_tests_define("lambda v: v + 1")
    assert keep(tests_function) is tests_function  # what the tests define is lent (and comes back)


def test_the_program_cannot_read_the_judges_dunders_or_take_eval_by_name(ends):
    def probe(f):
        return f.__globals__

    ends.namespace["probe"] = probe
    probe_ = ends.judge.request("names", ["probe"])["probe"]
    with pytest.raises(AttributeError):
        probe_(as_tests_define("lambda: 0"))
    with pytest.raises(BridgeBroken):
        ends.program.send('["a",{"g":["builtins","eval"]},[]]')
        ends.judge.receive()
    assert ends.judge.broken


def _frame(text: str) -> bytes:
    return len(text).to_bytes(4, "little") + text.encode()


@pytest.mark.parametrize("message", [_frame("[1,2"), _frame('{"x":1}'), _frame('["a",{"s":[8,[[1]]]},[]]'),
                                     _frame('["a",{"zz":1},[]]'), _frame('["a",{"k":99},[]]'),
                                     (2**31 - 1).to_bytes(4, "little")])
def test_a_malformed_message_breaks_the_bridge(ends, message):
    os.write(ends.fds[1], message)
    with pytest.raises(BridgeBroken):
        ends.judge.receive()


def test_bridge_imports_only_the_standard_library():
    """bridge.py runs inside the sandbox, under its interpreter, as inside.py does."""
    tree = ast.parse(Path(bridge.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - set(sys.stdlib_module_names) - {"__future__"} == set()


def test_numpy_values_arrive_as_numpy_where_numpy_is_installed(ends):
    numpy = pytest.importorskip("numpy")
    for value in (numpy.float64(0.1), numpy.int64(3), numpy.bool_(True), numpy.array([[1, 2], [3, 4]])):
        got = ends.fetch(value)
        assert type(got) is type(value) and numpy.array_equal(got, value) and got.dtype == value.dtype
    assert ends.fetch(numpy.float64(0.1)) == 0.1 and ends.fetch(numpy.int64(3)) == 3


def test_the_judge_acts_only_on_objects_it_lent():
    """A request naming a pristine callable (operator.methodcaller) or a module
    must not make the judge call anything: it could reach os.system that way."""
    answers_read, answers_write = os.pipe()
    judge = Peer(answers_read, answers_write, bridge.JUDGE_OPERATIONS, bridge.judge_may_export)
    judge.encode(as_tests_define("lambda v: v"))  # lent: ref 1
    try:
        for request in ('["q","call",{"g":["operator","methodcaller"]},["system","id"],{"d":[]}]',
                        '["q","call",{"g":["builtins","print"]},["x"],{"d":[]}]',
                        '["q","getattr",{"m":["os",1]},"system"]', '["q","len",[1,2]]',
                        '["q","getattr",{"k":1},"__globals__"]'):
            judge.serve(judge.scan(request, 0)[0])
            answer = judge.receive()  # the judge's own answer, read back from its pipe
            assert answer[0] == "e" and ("did not lend" in answer[2] or "not lent" in answer[2]), answer
        judge.serve(judge.scan('["q","call",{"k":1},[5],{"d":[]}]', 0)[0])
        assert judge.receive()[:2] == ["a", 5]
    finally:
        os.close(answers_read)
        os.close(answers_write)
