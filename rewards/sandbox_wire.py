"""Plain data across the sandbox boundary: the only form in which a program's results reach the judge.

A value crosses as JSON of a fixed set of value types, so what arrives on the other side is built by
the receiver's own decoder and can hold no code of the sender's: no `__eq__` that is always true, no
`__bool__`, no patched method. Everything else crosses as a handle ({"handle": n}), an opaque
reference that the judge can only call, index, iterate or read an attribute of (rewards/sandbox_judge.py).

    None, bool, int, float, str          as themselves (ints past 64 bits as hex: decoding stays linear)
    list                                 [...]
    tuple, set, frozenset, bytes,        {"tuple": [...]}, {"set": [...]}, {"frozenset": [...]},
    complex, dict                        {"bytes": hex}, {"complex": [re, im]}, {"dict": [[k, v], ...]}
    decimal.Decimal, fractions.Fraction  {"decimal": str}, {"fraction": [numerator, denominator]}

The sending side also turns subclasses of these types (IntEnum, namedtuple, OrderedDict, Counter...)
into their base type by the base type's own methods, which a subclass cannot override. Runs inside
the sandbox too (shipped as a code object). JSON text through the C functions of CPython's `_json`:
`import json` pulls in `re` and costs 10-20 ms at every sandbox start-up, `_json` 0.3 ms.
"""

_SCALARS = (type(None), bool, int, float, str)
_BIG_INT = 1 << 64


def encode(value: object, on_object) -> object:
    """`value` as JSON-able data; anything that is not plain data becomes on_object(value): a handle
    ({"handle": n, "type": name}) on the program's side, a reference ({"ref": n}) on the judge's."""
    kind = type(value)
    if kind in _SCALARS:
        return {"int": hex(value)} if kind is int and not -_BIG_INT < value < _BIG_INT else value
    if kind is list:
        return [encode(item, on_object) for item in value]
    if kind is tuple:
        return {"tuple": [encode(item, on_object) for item in value]}
    if kind is dict:
        return {"dict": [[encode(k, on_object), encode(v, on_object)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {kind.__name__: [encode(item, on_object) for item in value]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if (kind.__module__, kind.__name__) in (("decimal", "Decimal"), ("fractions", "Fraction")):
        return {"decimal": str(value)} if kind.__name__ == "Decimal" else \
            {"fraction": [encode(value.numerator, on_object), encode(value.denominator, on_object)]}
    plain = _base_value(value)
    return on_object(value) if plain is None else encode(plain, on_object)


def _base_value(value: object) -> object:
    """A subclass instance of a plain type as its base type (through the base's own methods), else None."""
    for base, convert in ((int, int.__int__), (float, float.__float__), (str, str.__str__), (bytes, bytes),
                          (tuple, lambda v: tuple(tuple.__iter__(v))), (list, lambda v: list(list.__iter__(v))),
                          (dict, lambda v: dict(dict.items(v))), (set, lambda v: set(set.__iter__(v))),
                          (frozenset, lambda v: frozenset(frozenset.__iter__(v)))):
        if isinstance(value, base):
            return convert(value)
    return None


def decode(data: object, resolve) -> object:
    """The value that `encode` described; resolve(tagged dict) -> the object behind a handle or ref.

    Raises ValueError on anything else (so a malformed message fails the test, never the judge)."""
    kind = type(data)
    if kind in _SCALARS:
        return data
    if kind is list:
        return [decode(item, resolve) for item in data]
    if kind is not dict or len(data) not in (1, 2):
        raise ValueError(f"not plain data: {_preview(data)}")
    (tag, body), *_ = data.items()
    if tag == "tuple":
        return tuple(decode(item, resolve) for item in _items(body))
    if tag in ("set", "frozenset"):
        return (set if tag == "set" else frozenset)(decode(item, resolve) for item in _items(body))
    if tag == "dict":
        return {decode(k, resolve): decode(v, resolve) for k, v in (_pair(p) for p in _items(body))}
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(*body)
    if tag == "decimal" and type(body) is str and len(body) < 4096:
        import decimal  # only where one arrives: ~5 ms

        try:
            return decimal.Decimal(body)
        except ArithmeticError:  # decimal.InvalidOperation: not a number
            raise ValueError(f"not a Decimal: {_preview(body)}") from None
    if tag == "fraction" and type(body) is list and len(body) == 2:
        import fractions

        numerator, denominator = (decode(x, resolve) for x in body)
        if type(numerator) is int and type(denominator) is int and denominator > 0:
            return fractions.Fraction(numerator, denominator)
    if tag in ("handle", "ref") and type(body) is int:
        return resolve(data)
    raise ValueError(f"not plain data: {_preview(data)}")


def _items(body: object) -> list:
    if type(body) is not list:
        raise ValueError(f"not plain data: {_preview(body)}")
    return body


def _pair(item: object) -> list:
    if type(item) is not list or len(item) != 2:
        raise ValueError(f"not a dict item: {_preview(item)}")
    return item


def _preview(data: object) -> str:
    text = repr(data)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_codec():
    """(encode: value -> str, scan: (str, index) -> (value, end)), from _json where there is one."""
    try:
        import _json
    except ImportError:  # not CPython: the json module is fine, only slower to import
        import json

        return json.JSONEncoder(separators=(",", ":")).encode, json.JSONDecoder().scan_once

    class Context:  # what _json's scanner reads from json.JSONDecoder
        strict, object_hook, object_pairs_hook, parse_float, parse_int = True, None, None, float, int
        parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__
        memo: dict = {}

    def default(value: object) -> object:
        raise TypeError(f"not JSON: {type(value).__name__}")

    chunks = _json.make_encoder(None, default, _json.encode_basestring_ascii, None, ":", ",", False, False, True)
    return (lambda value: "".join(chunks(value, 0))), _json.make_scanner(Context())


_encode_json, _scan_json = _json_codec()


def dumps(message: dict) -> bytes:
    """One protocol line: ASCII JSON (newlines inside strings are escaped) and a newline."""
    return _encode_json(message).encode() + b"\n"


def loads(line: bytes) -> dict:
    """A protocol line back; ValueError if it is not one JSON object."""
    try:
        text = line.decode("ascii").strip()
        message, end = _scan_json(text, 0)
    except (StopIteration, RecursionError, MemoryError, UnicodeDecodeError, ValueError, SystemError) as e:
        raise ValueError(f"not a protocol message ({type(e).__name__}): {_preview(line)}") from None
    if type(message) is not dict or end != len(text):
        raise ValueError(f"not a protocol message: {_preview(line)}")
    return message
