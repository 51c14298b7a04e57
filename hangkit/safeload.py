"""Reading files someone else may have written: torch's Flight Recorder dumps (pickle or JSON)
and hang reports, under limits of size, depth and objects, so that no file can make a reader
hang, fill the machine's memory or crash the interpreter. A refusal is Refused, in a few words;
the readers of files (flight_recorder.dumps.read_dump, monitor.report.read_report, the bundle)
make it a UsageError of one line naming the file, which the CLI says before it exits 2.

Each limit answers a way a small file becomes a large load:
- size: read no more than this many bytes, and a file that is larger is not read at all;
- objects: values built, counted as they would be written out as JSON (a value shared N times
  counts N times). A pickle's memo lets 260 bytes hold lists 40 deep, each holding the next
  twice: 2**40 lists written out (json.dumps, as the dump reader once did), never done. Shared
  values are converted once and their cost counted each time they are referred to, so such a
  file is refused after a few dozen steps, while torch's real dumps (whose frames are shared
  by every entry that issued from the same line) are read in time proportional to the file;
- depth: containers inside containers. Python's own readers and renderers recurse, and a
  10,000-deep list is a RecursionError or, hashed as a nested tuple, a crash.

Pickles are read by a reader of our own, not pickle.Unpickler: it knows only the opcodes of
plain data (no class, no callable: nothing to run), keeps its memo in a dict (the C unpickler
sizes an array by an index read from the file: 8 bytes asked it for 2 GB), takes only text
and numbers as dict keys (a key is hashed, and hashing a tuple nested a million deep crashes
the interpreter), and counts what it builds. JSON is read by json.loads after a count of its
separators bounds its values, then checked by a walk with a stack of its own.

A file found in a directory others can write (/tmp) is read only when it is the user's own,
checked on the open file (O_NOFOLLOW: not through a link planted there): NotYours otherwise.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hangkit.errors import HangkitError, UsageError
from hangkit.text import cut


@dataclass(frozen=True)
class Limits:
    bytes: int  # the file's size
    depth: int  # containers inside containers, the outermost counting 1
    objects: int  # values, a shared value counted each time it is referred to


# torch's dump nests 5 deep (dump, entries, entry, input_sizes, a size); 2,000 entries (its
# default buffer) with stacks of 24 frames are 252,000 values written out: 4M is 16 times that.
DUMP_LIMITS = Limits(bytes=256 << 20, depth=32, objects=4_000_000)
# A report's merged stack tree nests two levels a frame: 800 hold stacks of 399 frames, within
# what json.loads reads (about 1,000). A report of a few hundred ranks holds ~1M values.
REPORT_LIMITS = Limits(bytes=256 << 20, depth=800, objects=10_000_000)


class NotYours(HangkitError):
    """A file in a directory others can write that is not the user's own: skipped, not read."""

    def __init__(self, path: Path, uid: int | None):
        why = "a symbolic link" if uid is None else f"owned by uid {uid}, not you"
        super().__init__(f"skipped {path}: {why}")
        self.path, self.uid = path, uid


def shared_directory(directory: Path) -> bool:
    """Whether others may put files in it: writable by its group or by anyone (/tmp)."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def read_bytes(path: Path, limits: Limits, *, owned_only: bool = False) -> bytes:
    """A regular file's bytes, at most limits.bytes of them. owned_only: NotYours unless the
    file (not a link to one) belongs to this user. Never blocks on a FIFO put in its place."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if owned_only else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if owned_only:  # a link (ELOOP), or another user's file we may not open (EACCES)
            info = _lstat(path)
            if info is not None and stat.S_ISLNK(info.st_mode):
                raise NotYours(path, None) from None
            if info is not None and info.st_uid != os.getuid():
                raise NotYours(path, info.st_uid) from None
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if owned_only and info.st_uid != os.getuid():
            raise NotYours(path, info.st_uid)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{path}: not a regular file")
        data = f.read(limits.bytes + 1) if info.st_size <= limits.bytes else b""
    if info.st_size > limits.bytes or len(data) > limits.bytes:
        raise UsageError(f"{path}: over {limits.bytes >> 20} MiB, more than hangkit reads")
    return data


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


class Refused(ValueError):
    """Why data was refused, without the file's name (the caller adds it)."""


# --- JSON ---------------------------------------------------------------------------------------

def load_json(data: bytes | str, limits: Limits, *, cut_at: int | None = None) -> Any:
    """JSON within limits. cut_at: strings longer are cut (text.cut) for showing. Refused."""
    if len(data) > limits.bytes:
        raise Refused(f"over {limits.bytes >> 20} MiB")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Every value but the outermost follows a comma or opens a container: an upper bound that
    # costs three passes in C, before anything is built.
    most = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if most > limits.objects:
        raise Refused(f"more than {limits.objects:,} values")
    try:
        value = json.loads(data)
    except RecursionError:
        raise Refused(f"nested too deeply (hangkit reads {limits.depth} levels)") from None
    except (ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise Refused(f"not JSON ({str(e)[:200]})") from None
    _check_json(value, limits, cut_at)
    return value


def _check_json(value: Any, limits: Limits, cut_at: int | None) -> None:
    """Depth and values counted without recursion; long strings cut in place."""
    count = 1
    todo = [(value, 1)] if isinstance(value, dict | list) else []
    while todo:
        node, depth = todo.pop()
        if depth > limits.depth:
            raise Refused(f"nested deeper than {limits.depth} levels")
        count += len(node)
        if count > limits.objects:
            raise Refused(f"more than {limits.objects:,} values")
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in pairs:
            if isinstance(item, dict | list):
                todo.append((item, depth + 1))
            elif isinstance(item, str) and (not item.isascii() or cut_at is not None and (
                    len(item) > cut_at or not item.isprintable())):
                node[key] = _text(item, cut_at)
        if isinstance(node, dict) and not (all(map(str.isascii, node)) and (
                cut_at is None or (max(map(len, node), default=0) <= cut_at
                                   and all(map(str.isprintable, node))))):
            cleaned = {_text(k, cut_at): v for k, v in node.items()}
            node.clear()
            node.update(cleaned)


# --- pickles --------------------------------------------------------------------------------

def load_pickle(data: bytes, limits: Limits) -> Any:
    """A pickle of plain data (dicts, lists, tuples, text, numbers), within limits. Refused."""
    if len(data) > limits.bytes:
        raise Refused(f"over {limits.bytes >> 20} MiB")
    return _PickleReader(data, limits).run()


class _Mark:
    """Where a MARK opcode put its mark on the stack."""


_MARK = _Mark()
_KEY_TYPES = (str, int, float, bool, type(None))  # what JSON writes as a key, as text
_LEAVES = (str, int, float, bool, type(None), bytes)


class _PickleReader:
    """The opcodes of pickle protocols 0-5 that make plain data; any other is refused."""

    def __init__(self, data: bytes, limits: Limits):
        self.data, self.pos, self.limits = data, 0, limits
        self.stack: list = []
        self.memo: dict[int, Any] = {}
        self.built = 0

    def run(self) -> Any:
        ops, stack, memo = _OPS, self.stack, self.memo
        data, size, most = self.data, len(self.data), self.limits.objects
        while self.pos < size:
            code = data[self.pos]
            self.pos += 1
            self.built += 1
            if self.built > most:
                raise Refused(f"more than {most:,} values")
            # The opcodes torch's dumps are mostly made of, without a call each: half the time.
            if code == 0x68 and self.pos < size and data[self.pos] in memo:  # BINGET
                stack.append(memo[data[self.pos]])
                self.pos += 1
                continue
            if code == 0x28:  # MARK
                stack.append(_MARK)
                continue
            if code == 0x5D:  # EMPTY_LIST
                stack.append([])
                continue
            if code == 0x4B and self.pos < size:  # BININT1
                stack.append(data[self.pos])
                self.pos += 1
                continue
            op = ops.get(code)
            if op is None:
                raise Refused(_refusal(code, stack))
            if op(self) is _STOP:
                if len(stack) != 1 or stack[0] is _MARK:
                    raise Refused("a pickle that does not end with one value")
                return stack[0]
        raise Refused("a pickle cut short (no STOP)")

    # reading the argument of an opcode
    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Refused("a pickle cut short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int | float:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise Refused("a pickle cut short")
        out = self.data[self.pos:end]
        self.pos = end + 1
        return out

    def text(self, n: int) -> str:
        return self.take(n).decode("utf-8", "surrogatepass")

    # the stack
    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise Refused("a pickle whose stack runs dry")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise Refused("a pickle whose stack runs dry")
        return self.stack[-1]

    def since_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise Refused("a pickle with no MARK where one belongs")

    def get(self, index: int) -> None:
        if index not in self.memo:
            raise Refused(f"a pickle that refers to memo {index}, never stored")
        self.push(self.memo[index])

    def put(self, index: int) -> None:
        self.memo[index] = self.top()

    def set_items(self, target: Any, items: list) -> None:
        if not isinstance(target, dict) or len(items) % 2:
            raise Refused("a pickle that sets items on what is not a dict")
        for i in range(0, len(items), 2):
            key = items[i]
            if not isinstance(key, _KEY_TYPES):
                raise Refused(f"a dict key that is a {type(key).__name__}, not text")
            target[key] = items[i + 1]

    def append_to(self, target: Any, items: list) -> None:
        if not isinstance(target, list):
            raise Refused("a pickle that appends to what is not a list")
        target.extend(items)

    def add_to(self, target: Any, items: list) -> None:
        if not isinstance(target, set) or not all(isinstance(i, _LEAVES) for i in items):
            raise Refused("a set of what is not text or numbers")
        target.update(items)


_STOP = object()


def _refusal(code: int, stack: list) -> str:
    if code == 0x93 and len(stack) >= 2 and all(isinstance(s, str) for s in stack[-2:]):
        return f"refusing to load {stack[-2]}.{stack[-1]} from a dump"  # STACK_GLOBAL
    names = {0x63: "GLOBAL", 0x52: "REDUCE", 0x62: "BUILD", 0x69: "INST", 0x6f: "OBJ",
             0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
             0x50: "PERSID", 0x51: "BINPERSID", 0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
             0x93: "STACK_GLOBAL"}
    name = names.get(code)
    if name:
        return f"refusing the pickle opcode {name}: a dump holds plain data, not objects"
    return f"not a pickle (byte {code:#04x})"


def _global(r: _PickleReader) -> None:
    module, name = r.line().decode("latin-1"), r.line().decode("latin-1")
    raise Refused(f"refusing to load {module}.{name} from a dump")


def _int_line(r: _PickleReader) -> None:
    text = r.line()
    r.push(text == b"01" if text in (b"00", b"01") else _int(text))  # protocol 0's booleans


def _int(text: bytes) -> int:
    try:
        return int(text.rstrip(b"L"))
    except ValueError:
        raise Refused("a pickle with a malformed number") from None


def _string(r: _PickleReader) -> None:
    text = r.line()
    if len(text) < 2 or text[:1] != text[-1:] or text[:1] not in (b"'", b'"'):
        raise Refused("a pickle with a malformed string")
    try:
        r.push(codecs.escape_decode(text[1:-1])[0].decode("latin-1"))
    except ValueError:
        raise Refused("a pickle with a malformed string") from None


def _unicode_line(r: _PickleReader) -> None:
    try:
        r.push(r.line().decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise Refused("a pickle with a malformed string") from None


def _float_line(r: _PickleReader) -> None:
    try:
        r.push(float(r.line()))
    except ValueError:
        raise Refused("a pickle with a malformed number") from None


def _long(r: _PickleReader, n: int) -> None:
    if n > 64:  # torch's counters and times fit in 64 bits; str() of a huge one raises
        raise Refused(f"a number of {n} bytes")
    r.push(int.from_bytes(r.take(n), "little", signed=True))


def _dict_from_mark(r: _PickleReader) -> None:
    items, out = r.since_mark(), {}
    r.set_items(out, items)
    r.push(out)


def _setitem(r: _PickleReader) -> None:
    value, key = r.pop(), r.pop()
    r.set_items(r.top(), [key, value])


def _setitems(r: _PickleReader) -> None:
    items = r.since_mark()
    r.set_items(r.top(), items)


def _frozenset(r: _PickleReader) -> None:
    items = r.since_mark()
    if not all(isinstance(i, _LEAVES) for i in items):
        raise Refused("a set of what is not text or numbers")
    r.push(frozenset(items))


def _pop_mark(r: _PickleReader) -> None:
    r.since_mark()


def _text_op(fmt: str):
    return lambda r: r.push(r.text(r.unpack(fmt)))


def _bytes_op(fmt: str, kind=bytes):
    return lambda r: r.push(kind(r.take(r.unpack(fmt))))


def _latin1_op(fmt: str):
    return lambda r: r.push(r.take(r.unpack(fmt)).decode("latin-1"))


_OPS = {
    ord("("): lambda r: r.push(_MARK),
    ord("."): lambda r: _STOP,
    ord("0"): lambda r: r.stack.pop() if r.stack else r.pop(),  # a MARK too, as pickle does
    ord("1"): _pop_mark,
    ord("2"): lambda r: r.push(r.top()),
    ord("N"): lambda r: r.push(None),
    0x88: lambda r: r.push(True),
    0x89: lambda r: r.push(False),
    ord("I"): _int_line,
    ord("L"): lambda r: r.push(_int(r.line())),
    ord("J"): lambda r: r.push(r.unpack("<i")),
    ord("K"): lambda r: r.push(r.take(1)[0]),
    ord("M"): lambda r: r.push(r.unpack("<H")),
    0x8A: lambda r: _long(r, r.take(1)[0]),
    0x8B: lambda r: _long(r, r.unpack("<i")),
    ord("F"): _float_line,
    ord("G"): lambda r: r.push(r.unpack(">d")),
    ord("S"): _string,
    ord("T"): _latin1_op("<i"),
    ord("U"): _latin1_op("<B"),
    ord("V"): _unicode_line,
    ord("X"): _text_op("<I"),
    0x8C: _text_op("<B"),
    0x8D: _text_op("<Q"),
    ord("B"): _bytes_op("<I"),
    ord("C"): _bytes_op("<B"),
    0x8E: _bytes_op("<Q"),
    0x96: _bytes_op("<Q", bytearray),
    ord("]"): lambda r: r.push([]),
    ord("}"): lambda r: r.push({}),
    ord(")"): lambda r: r.push(()),
    0x8F: lambda r: r.push(set()),
    ord("l"): lambda r: r.push(r.since_mark()),
    ord("t"): lambda r: r.push(tuple(r.since_mark())),
    0x85: lambda r: r.push((r.pop(),)),
    0x86: lambda r: r.push(tuple(reversed([r.pop(), r.pop()]))),
    0x87: lambda r: r.push(tuple(reversed([r.pop(), r.pop(), r.pop()]))),
    ord("d"): _dict_from_mark,
    0x91: _frozenset,
    ord("a"): lambda r: r.append_to(r.stack[-2] if len(r.stack) > 1 else None, [r.pop()]),
    ord("e"): lambda r: (lambda items: r.append_to(r.top(), items))(r.since_mark()),
    ord("s"): _setitem,
    ord("u"): _setitems,
    0x90: lambda r: (lambda items: r.add_to(r.top(), items))(r.since_mark()),
    ord("g"): lambda r: r.get(_int(r.line())),
    ord("h"): lambda r: r.get(r.take(1)[0]),
    ord("j"): lambda r: r.get(r.unpack("<I")),
    ord("p"): lambda r: r.put(_int(r.line())),
    ord("q"): lambda r: r.put(r.take(1)[0]),
    ord("r"): lambda r: r.put(r.unpack("<I")),
    0x94: lambda r: r.put(len(r.memo)),
    0x80: lambda r: r.take(1),  # PROTO: any of 0-5 reads alike here
    0x95: lambda r: r.take(8),  # FRAME: its bytes are the next opcodes, read as they come
    ord("c"): _global,
}


# --- to plain data --------------------------------------------------------------------------

def plain_data(value: Any, limits: Limits, *, cut_at: int | None = None) -> Any:
    """value (from load_pickle) as JSON carries it: tuples and sets as lists, keys as text
    (numbers as JSON writes them), bytes as their repr. A value referred to from several places
    is converted once and shared; its size counts each time. Refused: cycles, more than
    limits.objects values written out, more than limits.depth levels."""
    done: dict[int, tuple[Any, int]] = {}  # id -> (converted, its size written out)
    on_path: set[int] = set()
    total = 0  # values written out so far
    root: list = []
    # (source, its conversion, [its size written out so far], depth, its items to go)
    todo: list = [(None, root, [0], 0, iter([(0, value)]))]
    while todo:
        source, out, size, depth, items = todo[-1]
        for key, item in items:
            if isinstance(out, dict):
                key = _key(key)
            if not isinstance(item, dict | list | tuple | set | frozenset):
                size[0] += 1
                total += 1
                _store(out, key, _leaf(item, cut_at))
                continue
            known = done.get(id(item))
            if known is not None:  # shared: converted once, counted each time
                size[0] += known[1]
                total += known[1]
                _store(out, key, known[0])
            elif id(item) in on_path:
                raise Refused("a structure that contains itself")
            elif depth >= limits.depth:
                raise Refused(f"nested deeper than {limits.depth} levels")
            else:
                total += 1
                child: dict | list = {} if isinstance(item, dict) else []
                _store(out, key, child)
                on_path.add(id(item))
                pairs = iter(item.items()) if isinstance(item, dict) else enumerate(item)
                todo.append((item, child, [1], depth + 1, pairs))
            if total > limits.objects:
                raise Refused(f"more than {limits.objects:,} values written out")
            if known is None:
                break  # into the child
        else:
            todo.pop()
            if source is not None:
                on_path.discard(id(source))
                done[id(source)] = (out, size[0])
                todo[-1][2][0] += size[0]
        if total > limits.objects:
            raise Refused(f"more than {limits.objects:,} values written out")
    return root[0]


def _store(out: dict | list, key: Any, value: Any) -> None:
    if isinstance(out, dict):
        out[key] = value
    else:
        out.append(value)


# Control characters but tab and newline, as they are shown: written out, not obeyed (an escape
# sequence in a reason would move the cursor, recolour or retitle the user's terminal).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (9, 10)}


def _text(text: str, cut_at: int | None) -> str:
    """Text fit to print: a lone surrogate (JSON's "\\ud800", a pickle's surrogatepass), which
    no terminal takes, written as its escape. cut_at (text to be shown): control characters
    written as escapes too, and cut at cut_at characters."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if cut_at is None:
        return text
    return cut(text if text.isprintable() else text.translate(_CONTROLS), cut_at)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return _text(key, None)
    if isinstance(key, bool) or key is None:
        return json.dumps(key)
    if isinstance(key, int | float):
        return json.dumps(key)
    raise Refused(f"a dict key that is a {type(key).__name__}, not text")


def _leaf(value: Any, cut_at: int | None) -> Any:
    if isinstance(value, str):
        return _text(value, cut_at)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, bytes | bytearray):
        return _leaf(str(bytes(value)), cut_at)
    raise Refused(f"a {type(value).__name__}, not plain data")
