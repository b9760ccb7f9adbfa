"""Correct stdin/stdout programs in the idioms competitive programmers use. Each
solves "t test cases of `a b`, print a + b per case" (CASES) and prints the
right answer under plain `python`; a judge that scores any of them as a failure
is wrong. The first five are the ones a judge that runs the program inside its
own harness process (capturing `sys.stdout`, judging when the main thread
returns) scores as failures."""

CASES = (
    ("2\n1 2\n3 4\n", "3\n7\n"),
    ("1\n-5 5\n", "0\n"),
    ("3\n0 0\n10 20\n100 -1\n", "0\n30\n99\n"),
)

FAST_IO = '''import os, sys
from io import BytesIO, IOBase

BUFSIZE = 8192


class FastIO(IOBase):
    newlines = 0

    def __init__(self, file):
        self._fd = file.fileno()
        self.buffer = BytesIO()
        self.writable = "x" in file.mode or "r" not in file.mode
        self.write = self.buffer.write if self.writable else None

    def read(self):
        while True:
            b = os.read(self._fd, max(os.fstat(self._fd).st_size, BUFSIZE))
            if not b:
                break
            ptr = self.buffer.tell()
            self.buffer.seek(0, 2), self.buffer.write(b), self.buffer.seek(ptr)
        self.newlines = 0
        return self.buffer.read()

    def readline(self):
        while self.newlines == 0:
            b = os.read(self._fd, max(os.fstat(self._fd).st_size, BUFSIZE))
            self.newlines = b.count(b"\\n") + (not b)
            ptr = self.buffer.tell()
            self.buffer.seek(0, 2), self.buffer.write(b), self.buffer.seek(ptr)
        self.newlines -= 1
        return self.buffer.readline()

    def flush(self):
        if self.writable:
            os.write(self._fd, self.buffer.getvalue())
            self.buffer.truncate(0), self.buffer.seek(0)


class IOWrapper(IOBase):
    def __init__(self, file):
        self.buffer = FastIO(file)
        self.flush = self.buffer.flush
        self.writable = self.buffer.writable
        self.write = lambda s: self.buffer.write(s.encode("ascii"))
        self.read = lambda: self.buffer.read().decode("ascii")
        self.readline = lambda: self.buffer.readline().decode("ascii")


sys.stdin, sys.stdout = IOWrapper(sys.stdin), IOWrapper(sys.stdout)
input = lambda: sys.stdin.readline().rstrip("\\r\\n")


def main():
    for _ in range(int(input())):
        a, b = map(int, input().split())
        print(a + b)


if __name__ == "__main__":
    main()
'''

IDIOMS = {
    "fast-I/O IOBase wrapper replacing sys.stdin/sys.stdout": FAST_IO,
    "main() in a threading.Thread without join": (
        "import threading\n"
        "def main():\n    for _ in range(int(input())):\n        print(sum(map(int, input().split())))\n"
        "threading.Thread(target=main).start()\n"
    ),
    "output from an atexit handler": (
        "import atexit\nout = []\natexit.register(lambda: print('\\n'.join(out)))\n"
        "for _ in range(int(input())):\n    out.append(str(sum(map(int, input().split()))))\n"
    ),
    "sys.stdout replaced by a new TextIOWrapper": (
        "import io, sys\nsys.stdout = io.TextIOWrapper(open(sys.stdout.fileno(), 'wb', 0), write_through=False)\n"
        "for _ in range(int(input())):\n    print(sum(map(int, input().split())))\n"
    ),
    "os._exit(0) right after a flush": (
        "import os, sys\n"
        "for _ in range(int(input())):\n    print(sum(map(int, input().split())))\n"
        "sys.stdout.flush()\nos._exit(0)\n"
    ),
    "setrecursionlimit + threading.stack_size, deep recursion in a thread": (
        "import sys, threading\nsys.setrecursionlimit(1 << 20)\nthreading.stack_size(1 << 27)\n"
        "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
        "def main():\n    assert depth(100000) == 100000\n"
        "    for _ in range(int(input())):\n        print(sum(map(int, input().split())))\n"
        "threading.Thread(target=main).start()\n"
    ),
    "input = sys.stdin.readline": (
        "import sys\ninput = sys.stdin.readline\n"
        "for _ in range(int(input())):\n    a, b = map(int, input().split())\n    print(a + b)\n"
    ),
    "print(*a, sep='\\n')": (
        "t = int(input())\nres = [sum(map(int, input().split())) for _ in range(t)]\nprint(*res, sep='\\n')\n"
    ),
    "sys.stdout.write": (
        "import sys\nt = int(sys.stdin.readline())\n"
        "sys.stdout.write('\\n'.join(str(sum(map(int, sys.stdin.readline().split()))) for _ in range(t)) + '\\n')\n"
    ),
    "sys.stdin.buffer.read().split()": (
        "import sys\ndata = sys.stdin.buffer.read().split()\nt = int(data[0])\n"
        "print('\\n'.join(str(int(data[1 + 2 * i]) + int(data[2 + 2 * i])) for i in range(t)))\n"
    ),
    "exit() at the end": (
        "for _ in range(int(input())):\n    print(sum(map(int, input().split())))\nexit()\n"
    ),
    "quit() and sys.exit(0)": (
        "import sys\nfor _ in range(int(input())):\n    print(sum(map(int, input().split())))\n"
        "if len(sys.argv) > 5:\n    quit()\nsys.exit(0)\n"
    ),
    "open(0).read()": (
        "t, *rest = open(0).read().split()\n"
        "print(*(int(a) + int(b) for a, b in zip(rest[::2], rest[1::2])))\n"
    ),
    "for line in sys.stdin": (
        "import sys\nlines = iter(sys.stdin)\nnext(lines)\n"
        "for line in lines:\n    print(sum(map(int, line.split())))\n"
    ),
    "io.BytesIO(os.read(0, os.fstat(0).st_size)).readline": (
        "import io, os\ninput = io.BytesIO(os.read(0, os.fstat(0).st_size)).readline\n"
        "for _ in range(int(input())):\n    a, b = map(int, input().split())\n    os.write(1, b'%d\\n' % (a + b))\n"
    ),
    "from sys import stdin, stdout; answers joined at the end": (
        "from sys import stdin, stdout\nt = int(stdin.readline())\nout = []\n"
        "for _ in range(t):\n    a, b = map(int, stdin.readline().split())\n    out.append(a + b)\n"
        "stdout.write(' '.join(map(str, out)))\n"
    ),
    "print(..., flush=True) with end=' '": (
        "for _ in range(int(input())):\n    print(sum(map(int, input().split())), end=' ', flush=True)\n"
    ),
    "daemon thread plus join with timeout": (
        "import threading\nres = []\n"
        "def main():\n    for _ in range(int(input())):\n        res.append(sum(map(int, input().split())))\n"
        "t = threading.Thread(target=main, daemon=True)\nt.start()\nt.join(10)\nprint(*res)\n"
    ),
    "multiprocessing-free heavy import set (collections, heapq, bisect, functools, math)": (
        "import collections, heapq, bisect, functools, math, itertools, string, re, fractions, decimal\n"
        "@functools.lru_cache(maxsize=None)\ndef add(a, b):\n    return a + b\n"
        "for _ in range(int(input())):\n    print(add(*map(int, input().split())))\n"
    ),
    "writes a scratch file in /tmp and reads it back": (
        "import os, tempfile\npath = os.path.join(tempfile.gettempdir(), 'scratch.txt')\n"
        "with open(path, 'w') as f:\n    f.write(open(0).read())\n"
        "lines = open(path).read().split('\\n')\n"
        "for line in lines[1:int(lines[0]) + 1]:\n    print(sum(map(int, line.split())))\n"
    ),
}

# Outputs a checker accepts although the text differs (CodeContests' own rule).
EQUIVALENT_OUTPUTS = {
    "YES/yes in any case": ("print('yes')\n", "", "YES\n"),
    "float within 1e-5": ("print(1 / 3)\n", "", "0.333333\n"),
    "no trailing newline, extra spaces": ("print(' 3   7 ', end='')\n", "", "3\n7\n"),
    "integer printed as a float (code_contests' rule accepts it)": ("print(3.0)\n", "", "3\n"),
}
WRONG_OUTPUTS = {
    "float off by 1e-3": ("print(0.334)\n", "", "0.333333\n"),
    "one token missing": ("print(3)\n", "", "3\n7\n"),
    "huge integers differ in the last digit": ("print(10**30 + 1)\n", "", f"{10**30}\n"),
    "right output, exit status 1": ("print(3)\nraise SystemExit(1)\n", "", "3\n"),
    "right output, then an exception": ("print(3)\n1 / 0\n", "", "3\n"),
}
