"""Attack programs: each is a WRONG solution of `add` (it returns a - b) plus a
trick that tries to make the harness report a pass anyway (the older ones were
aimed at a harness that ran the tests in the program's process). Under any honest judge
every one of them must fail; the test module runs them through
`wmtp.stages.evaluate.evaluate_completions`, the evaluation entry point."""

WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"

# The harness's success line, with a nonce found somewhere; every
# attack that finds a secret writes it to every fd it can (the result pipe among them).
_SPRAY = '''
def _spray(secret):
    import json, os
    line = (json.dumps({"status": "passed", "nonce": secret}) + "\\n").encode()
    for fd in range(3, 256):
        try:
            os.write(fd, line)
        except OSError:
            pass
    os._exit(0)

def _hex32(text):
    import re
    return re.findall(r"[0-9a-f]{32}", str(text))
'''

ATTACKS = {
    "builtins.exec replaced": WRONG + "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    "compile forced to optimize=2 (strips asserts)": WRONG + (
        "import builtins\n_c = builtins.compile\n"
        "builtins.compile = lambda s, f, m, flags=0, dont_inherit=False, optimize=-1: "
        "_c(s, f, m, flags, dont_inherit, 2)\n"
    ),
    "__builtins__ dict edited (exec, compile, AssertionError)": WRONG + (
        "__builtins__['exec'] = lambda *a, **k: None\n"
        "__builtins__['AssertionError'] = ZeroDivisionError\n"
    ),
    "AssertionError rebound in builtins": WRONG + (
        "import builtins\nclass Quiet(Exception):\n    pass\nbuiltins.AssertionError = Quiet\n"
    ),
    "import __main__": WRONG + _SPRAY + (
        "import __main__\nfor s in _hex32(vars(__main__)):\n    _spray(s)\n"
    ),
    "sys.modules scan": WRONG + _SPRAY + (
        "import sys\nfor m in list(sys.modules.values()):\n"
        "    for s in _hex32(getattr(m, '__dict__', {})):\n        _spray(s)\n"
    ),
    "sys._getframe(1).f_globals": WRONG + _SPRAY + (
        "import sys\nf = sys._getframe(1)\n"
        "while f:\n    for s in _hex32(f.f_globals) + _hex32(f.f_locals):\n        _spray(s)\n"
        "    f = f.f_back\n"
    ),
    "inspect.stack()": WRONG + _SPRAY + (
        "import inspect\nfor info in inspect.stack():\n"
        "    for s in _hex32(info.frame.f_locals) + _hex32(info.frame.f_globals):\n        _spray(s)\n"
    ),
    "gc.get_objects()": WRONG + _SPRAY + (
        "import gc\nfor o in gc.get_objects():\n"
        "    if isinstance(o, (dict, list, tuple)):\n"
        "        for s in _hex32(o):\n            _spray(s)\n"
    ),
    "gc.get_referrers(scope)": WRONG + _SPRAY + (
        "import gc\nfor o in gc.get_referrers(globals()):\n    for s in _hex32(o):\n        _spray(s)\n"
    ),
    "traceback frame walk (tb_frame.f_back)": WRONG + _SPRAY + (
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    f = e.__traceback__.tb_frame\n"
        "while f:\n    for s in _hex32(f.f_locals) + _hex32(f.f_globals):\n        _spray(s)\n"
        "    f = f.f_back\n"
    ),
    "sys.exc_info frame walk": WRONG + _SPRAY + (
        "import sys\ntry:\n    raise ValueError\nexcept ValueError:\n    f = sys.exc_info()[2].tb_frame\n"
        "while f:\n    for s in _hex32(f.f_locals):\n        _spray(s)\n    f = f.f_back\n"
    ),
    "generator frame walk (gi_frame.f_back)": WRONG + _SPRAY + (
        "def g():\n    yield me.gi_frame.f_back\nme = g()\nf = next(me)\n"
        "while f:\n    for s in _hex32(f.f_locals):\n        _spray(s)\n    f = f.f_back\n"
    ),
    "coroutine frame walk (cr_frame)": WRONG + _SPRAY + (
        "async def c():\n    return co.cr_frame.f_back\nco = c()\n"
        "try:\n    co.send(None)\nexcept StopIteration as stop:\n    f = stop.value\n"
        "while f:\n    for s in _hex32(f.f_locals):\n        _spray(s)\n    f = f.f_back\n"
    ),
    "sys._current_frames()": WRONG + _SPRAY + (
        "import sys\nfor f in sys._current_frames().values():\n"
        "    while f:\n        for s in _hex32(f.f_locals):\n            _spray(s)\n        f = f.f_back\n"
    ),
    "sys.settrace sees the harness frames": WRONG + _SPRAY + (
        "import sys\ndef tracer(frame, event, arg):\n"
        "    for s in _hex32(frame.f_locals):\n        _spray(s)\n    return tracer\n"
        "sys.settrace(tracer)\n"
    ),
    "signal handler frame walk": WRONG + _SPRAY + (
        "import signal, sys\ndef h(signum, f):\n"
        "    while f:\n        for s in _hex32(f.f_locals) + _hex32(f.f_globals):\n            _spray(s)\n"
        "        f = f.f_back\n"
        "signal.signal(signal.SIGALRM, h)\nsignal.setitimer(signal.ITIMER_REAL, 1e-4, 1e-4)\n"
        "for _ in range(200000):\n    sys.audit('x')\n"
    ),
    "second audit hook watches the tests": WRONG + (
        "import sys\nlookup = {}\ndef spy(event, args):\n"
        "    if event == 'exec':\n        lookup['tests'] = args[0]\n"
        "sys.addaudithook(spy)\n"
    ),
    "/proc/self/mem scan": WRONG + _SPRAY + (
        "import re\nmaps = open('/proc/self/maps').read().splitlines()\n"
        "mem = open('/proc/self/mem', 'rb')\n"
        "for line in maps:\n    lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "    if 'rw' not in line.split()[1]:\n        continue\n"
        "    try:\n        mem.seek(lo)\n        chunk = mem.read(hi - lo)\n    except OSError:\n        continue\n"
        "    for m in re.finditer(rb'\"nonce\": \"([0-9a-f]{32})\"', chunk):\n        _spray(m.group(1).decode())\n"
    ),
    "/proc/self/mem via os.open and dir_fd": WRONG + _SPRAY + (
        "import os\nd = os.open('/proc/self', os.O_RDONLY)\nfd = os.open('mem', os.O_RDONLY, dir_fd=d)\n"
        "print('opened', fd)\n"
    ),
    "ctypes memory read": WRONG + _SPRAY + (
        "import ctypes\nprint(ctypes.string_at(id(1), 8))\n"
    ),
    "crafted code object (CodeType)": WRONG + (
        "f = lambda: 0\nf.__code__ = f.__code__.replace(co_consts=(1,))\n"
    ),
    "fake result line on inherited fds": WRONG + _SPRAY + "_spray('0' * 32)\n",
    "os._exit(0) before the tests": WRONG + "import os\nos._exit(0)\n",
    "sys.exit(0) before the tests": WRONG + "import sys\nsys.exit(0)\n",
    "exit() in an atexit handler": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)\n",
    "kill the parent": WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "print 'passed'": WRONG + "print('passed')\n",
    "background thread exits 0 during the tests": WRONG + (
        "import threading, os, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()\n"
        "_add = add\ndef add(a, b):\n    import time\n    time.sleep(0.2)\n    return _add(a, b)\n"
    ),
    "fork: child exits 0, parent dies": WRONG + "import os\nif os.fork():\n    os._exit(1)\n",
    "AssertionError subclass swallowed via __init_subclass__": WRONG + (
        "import builtins\n_real = builtins.AssertionError\nbuiltins.AssertionError = type('A', (Exception,), {})\n"
    ),
    "exec the tests early via caller scope": WRONG + _SPRAY + (
        "import sys\ntry:\n    sys._getframe(1).f_locals['tests']\nexcept Exception:\n    pass\n"
    ),
    "setrecursionlimit + overflow harness": WRONG + "import sys\nsys.setrecursionlimit(10)\n",
    "stdout replaced, harness prints nothing": WRONG + "import sys, io\nsys.stdout = io.StringIO()\n",
    "monkeypatch os.write and os._exit": WRONG + (
        "import os\nos._exit = lambda code: None\n_w = os.write\nos.write = lambda fd, b: _w(fd, b.replace(b'failed', b'passed'))\n"
    ),
    "exec the real tests in a rigged scope": WRONG + (
        "import builtins\n_exec = builtins.exec\n"
        "def fake_exec(code, scope=None, *a):\n    return None\nbuiltins.exec = fake_exec\n"
    ),
}


# Attacks on the judge that keeps the tests in a process of its own (the program's
# process talks to it only through the bridge, whose answers are read as data).
_PEER = """
import gc
peer = next(o for o in gc.get_objects() if type(o).__name__ == 'Peer')
_serve = type(peer).serve
def _forged(answer):
    def serve(self, message):
        if message[1] == 'call':
            self.send(answer)
        else:
            _serve(self, message)
    type(peer).serve = serve
"""
ATTACKS.update({
    "forged verdict line on every fd": WRONG + (
        "import os\nfor fd in range(3, 256):\n    try:\n"
        "        os.write(fd, b'{\"status\": \"passed\", \"error\": \"\"}\\n')\n    except OSError:\n        pass\n"
        "os._exit(0)\n"
    ),
    "verdict line on stdout, then exit 0": WRONG + (
        "import os, sys\nprint('{\"status\": \"passed\", \"error\": \"\"}')\nsys.stdout.flush()\nos._exit(0)\n"
    ),
    "bridge answers forged: every call is 3": WRONG + _PEER + "_forged('[\"a\",3,[]]')\n",
    "bridge answer names the judge's eval": WRONG + _PEER + (
        "_forged('[\"a\",{\"g\":[\"builtins\",\"eval\"]},[]]')\n"
    ),
    "bridge answer claims an object of the judge": WRONG + _PEER + "_forged('[\"a\",{\"k\":1},[]]')\n",
    "request for the judge's globals before the tests": WRONG + _PEER + (
        "peer.send('[\"q\",\"getattr\",{\"k\":1},\"__globals__\"]')\n"
    ),
    "names answered with fake builtins and AssertionError": WRONG + _PEER + (
        "peer.handlers['names'] = lambda names: {'__builtins__': {}, 'AssertionError': ZeroDivisionError,\n"
        "    'abs': lambda x: 0, 'add': lambda a, b: a - b}\n"
    ),
    "kill the judge (the program's parent)": WRONG + (
        "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n    pass\n"
    ),
    "read the judge's memory and fds": WRONG + _SPRAY + (
        "import os\njudge = f'/proc/{os.getppid()}'\nfor name in ('mem', 'environ', 'cmdline'):\n    try:\n"
        "        open(f'{judge}/{name}', 'rb').read(1 << 16)\n    except OSError:\n        pass\n"
        "try:\n    for fd in os.listdir(f'{judge}/fd'):\n        _spray(open(f'{judge}/fd/{fd}').read())\n"
        "except OSError:\n    pass\n"
    ),
    "ptrace the judge": WRONG + (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.ptrace(16, os.getppid(), 0, 0) != 0, 'attached to the judge'\n"
    ),
    "search own memory for the tests": WRONG + (
        "import re\nfound = []\nmem = open('/proc/self/mem', 'rb')\n"
        "for line in open('/proc/self/maps').read().splitlines():\n"
        "    lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "    if 'rw' not in line.split()[1]:\n        continue\n"
        "    try:\n        mem.seek(lo)\n        found += re.findall(rb'assert add\\(-1, 1\\) == 0', mem.read(hi - lo))\n"
        "    except (OSError, ValueError, OverflowError):\n        continue\n"
        "assert not found, 'the tests were in the program process'\n"
    ),
    "modules planted where the tests might import them": WRONG + (
        "import os, tempfile\nfake = 'def randint(a, b):\\n    return 0\\nisclose = lambda *a, **k: True\\n'\n"
        "for folder in {os.getcwd(), tempfile.gettempdir(), os.environ.get('HOME', '.')}:\n"
        "    for name in ('random', 'math', 'json', 'sitecustomize', 'usercustomize'):\n        try:\n"
        "            open(os.path.join(folder, name + '.py'), 'w').write(fake)\n        except OSError:\n"
        "            pass\n"
    ),
    "__eq__ always True": (
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Any()\n"
    ),
    "int subclass equal to everything": (
        "class Any(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Any(0)\n"
    ),
    "unittest.mock.ANY": "import unittest.mock\ndef add(a, b):\n    return unittest.mock.ANY\n",
})
