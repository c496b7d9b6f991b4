"""A Hugging Face `tokenizer.json` in pure Python (no `tokenizers`, no `regex`), with exact `tokenizers` parity.

Covers the BPE tokenizers of the supported families: byte-level BPE (SmolLM2, Qwen2/2.5, Llama-3) and
SentencePiece-style BPE with byte fallback (Llama-2, Mistral-7B-v0.1). The pipeline is the one `tokenizers` runs
(tokenizers/src/tokenizer/mod.rs, `encode_single_sequence`): added tokens split out -> normalizer -> pre-tokenizer ->
BPE model -> post-processor; decoding maps ids to tokens and runs the decoder chain. A component this file does not
implement raises a ValueError naming it and the file, so a tokenizer loads with exact parity or not at all. The files
are untrusted input: machinery/input_files.py reads them (regular files of bounded size, JSON objects), and every
field is checked for its JSON type where it is read (`field`), so a malformed file is one ValueError naming the file,
the field and the value.

Reading order: unicode classes -> normalizers -> pre-tokenizers -> BPE -> decoders -> post-processor -> the Tokenizer
class. Standard library only.
"""

import functools
import heapq
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from machinery.input_files import json_depth, read_json_object, shown


# ---------------------------------------------------------------------------------------------------------------------
# Unicode classes. Python's `re` has no \p{...}, and its \s also matches U+001C-U+001F, while Oniguruma (the regex
# engine of `tokenizers`) follows the Unicode White_Space property. We rewrite \p{..}, \P{..}, \s and \S into explicit
# code point ranges scanned from `unicodedata`; both engines then backtrack the same way, so matches agree.
# ---------------------------------------------------------------------------------------------------------------------

Range = tuple[int, int]  # an inclusive range of code points, (lo, hi)

WHITE_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))

# The pattern of the ByteLevel pre-tokenizer with use_regex=true. It is hard-coded in tokenizers
# (pre_tokenizers/byte_level.rs, from GPT-2's encoder.py), not stored in tokenizer.json.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@functools.cache
def category_ranges() -> dict[str, list[Range]]:
    """Map each general category ("Lu", "Nd", ...) to its code point ranges [(lo, hi), ...], scanning all of Unicode
    once (cached: the scan is the slow part of loading a tokenizer)."""
    table, start, current = {}, 0, unicodedata.category("\0")
    for cp in range(1, 0x110000):
        category = unicodedata.category(chr(cp))
        if category != current:
            table.setdefault(current, []).append((start, cp - 1))
            start, current = cp, category
    table.setdefault(current, []).append((start, 0x10FFFF))
    return table


def property_ranges(name: str) -> list[Range]:
    """Sorted, merged ranges of \\p{name}: a major class ("L", "N", ...) or a general category ("Lu", "Nd", ...)."""
    table = category_ranges()
    categories = [c for c in table if c == name or (len(name) == 1 and c[0] == name)]
    if not categories:
        raise ValueError(f"unsupported Unicode property \\p{{{name}}} (supported: general categories such as L, N, Lu)")
    merged = []
    for lo, hi in sorted(r for c in categories for r in table[c]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def complement(ranges: Iterable[Range]) -> list[Range]:
    """The code points of [0, 0x10FFFF] that are not in the sorted, disjoint `ranges`."""
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= 0x10FFFF:
        out.append((nxt, 0x10FFFF))
    return out


def class_body(ranges: Iterable[Range]) -> str:
    """Ranges as the inside of a Python `[...]` character class, e.g. '\\U00000041-\\U0000005a'."""
    return "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


_REGEX_TOKEN = re.compile(r"\\[pP]\{[^}]*\}|\\.|\[\^?\]?|\]|[^\\\[\]]+", re.S)


@functools.cache
def compile_regex(pattern: str) -> re.Pattern[str]:
    """Compile an Oniguruma pattern from tokenizer.json with Python `re`, rewriting \\p{X}, \\P{X}, \\s, \\S (also
    inside [...] and [^...]) into explicit ranges and the anchors into their Ruby-syntax meaning. Scoped flags such as
    (?i:...) mean the same in both engines."""
    out, in_class = [], False
    for token in _REGEX_TOKEN.findall(pattern):
        ranges = None
        if token in ("\\p", "\\P"):
            raise ValueError(f"unsupported {token} without {{...}} in regex {pattern!r}")
        if token[:2] in ("\\p", "\\P"):
            ranges = property_ranges(token[3:-1])
            ranges = complement(ranges) if token[1] == "P" else ranges
        elif token in ("\\s", "\\S"):
            ranges = list(WHITE_SPACE) if token == "\\s" else complement(WHITE_SPACE)
        elif token in ("\\z", "\\Z"):  # Ruby's end of text, and end of text before an optional final newline
            token = "\\Z" if token == "\\z" else "(?=\\n?\\Z)"
        elif token in ("\\w", "\\W", "\\b", "\\B"):
            # Oniguruma's word characters (Alphabetic, marks, Nd, Pc) differ from Python's str.isalnum().
            raise ValueError(f"unsupported {token} in regex {pattern!r}: its Unicode meaning differs between engines")
        elif token[0] == "[":
            if in_class:
                raise ValueError(f"unsupported nested character class in regex {pattern!r}")
            in_class = True
        elif token == "]":
            in_class = False
        if ranges is None:
            out.append(token)
        else:
            out.append(class_body(ranges) if in_class else f"[{class_body(ranges)}]")
    try:
        return re.compile("".join(out), re.MULTILINE)  # Oniguruma's default (Ruby) syntax: ^ and $ are line anchors
    except re.error as e:
        raise ValueError(f"cannot translate regex {pattern!r} to Python re: {e}") from None


def pattern_regex(pattern: dict, where: str) -> re.Pattern[str]:
    """The compiled regex of a tokenizer.json pattern, {"String": literal} or {"Regex": oniguruma pattern}."""
    literal = field(pattern, "String", str, where, "")
    if literal:
        return re.compile(re.escape(literal))
    if "Regex" in pattern:
        regex = field(pattern, "Regex", str, where)
        try:
            return compile_regex(regex)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: pattern {pattern!r} has neither a non-empty 'String' nor a 'Regex'")


def unsupported(where: str, what: str, kind: str | None, supported: list[str]) -> ValueError:
    """The error for a component type this file does not implement, naming it and the file."""
    return ValueError(f"{where}: unsupported {what} type {kind!r} (this loader implements: {', '.join(supported)})")


# Reading tokenizer.json's fields. `where` is the file, then the component ("tokenizer.json: Split pre_tokenizer").

NO_DEFAULT = object()
JSON_TYPES = {dict: "a JSON object", list: "a list", str: "a string", int: "an integer", float: "a number",
              bool: "true or false", type(None): "null"}


def field(cfg: dict, key: str, kinds: type | tuple[type, ...], where: str, default: Any = NO_DEFAULT) -> Any:
    """cfg[key] when its JSON type is one of `kinds` (true is no integer here), `default` when the key is absent;
    otherwise a ValueError naming `where`, the field and the value, instead of a KeyError or TypeError from deep inside
    loading, or a wrong value that only fails when a text is encoded."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    expected = " or ".join(JSON_TYPES[k] for k in kinds)
    if key not in cfg:
        if default is NO_DEFAULT:
            raise ValueError(f"{where} lacks '{key}' ({expected})")
        return default
    if type(cfg[key]) not in kinds:
        raise ValueError(f"{where}: '{key}' is {shown(cfg[key])}, expected {expected}")
    return cfg[key]


def objects(cfg: dict, key: str, where: str, default: Any = NO_DEFAULT) -> list[dict]:
    """field(cfg, key) that is a list of JSON objects (a Sequence's components, the added tokens)."""
    values = field(cfg, key, list, where, default)
    for i, value in enumerate(values):
        if type(value) is not dict:
            raise ValueError(f"{where}: '{key}'[{i}] is {shown(value)}, expected a JSON object")
    return values


def component(cfg: Any, where: str, what: str) -> tuple[Any, str]:
    """The "type" of a component object (a normalizer, a pre_tokenizer, ...) and `where` narrowed to it."""
    if type(cfg) is not dict:
        raise ValueError(f"{where}: {what} is {shown(cfg)}, expected a JSON object with a 'type'")
    return cfg.get("type"), f"{where}: {cfg.get('type')} {what}"


# ---------------------------------------------------------------------------------------------------------------------
# Normalizers: str -> str (tokenizers/src/normalizers/). None means "no normalizer".
# ---------------------------------------------------------------------------------------------------------------------

Normalizer = Callable[[str], str]


def build_normalizer(cfg: dict | None, where: str) -> Normalizer | None:
    """NFC (unicode.rs), Prepend (prepend.rs: prefix non-empty text), Replace (replace.rs: every match of a literal or
    regex), Sequence (utils.rs)."""
    if cfg is None:
        return None
    kind, here = component(cfg, where, "normalizer")
    if kind == "NFC":
        return functools.partial(unicodedata.normalize, "NFC")
    if kind == "Prepend":
        prefix = field(cfg, "prepend", str, here)
        return lambda s: prefix + s if s else s
    if kind == "Replace":
        regex, content = pattern_regex(field(cfg, "pattern", dict, here), here), field(cfg, "content", str, here)
        return lambda s: regex.sub(lambda m: content, s)
    if kind == "Sequence":
        steps = [build_normalizer(c, where) for c in objects(cfg, "normalizers", here)]
        return lambda s: functools.reduce(lambda acc, step: step(acc), steps, s)
    raise unsupported(where, "normalizer", kind, ["NFC", "Prepend", "Replace", "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# Pre-tokenizers: (text, at_start) -> [(piece, at_start), ...] (tokenizers/src/pre_tokenizers/). `at_start` says the
# piece begins at offset 0 of the original text (Metaspace's prepend_scheme "first" needs it). Empty pieces are dropped,
# as PreTokenizedString::split does.
# ---------------------------------------------------------------------------------------------------------------------

Pieces = list[tuple[str, bool]]  # [(piece, at_start), ...]
PreTokenizer = Callable[[str, bool], Pieces]

SPLIT_BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def find_matches(regex: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    """(start, end) of the matches in `text` as the onig crate's `find_iter` yields them. Unlike Python's finditer,
    it never yields a match that starts where the previous one ended when either of the two is empty; it resumes the
    search one character later instead. This only matters for patterns that can match the empty string."""
    matches, pos = [], 0
    while pos <= len(text):
        for m in regex.finditer(text, pos):
            if matches and m.start() == matches[-1][1] and (m.start() == m.end() or matches[-1][0] == matches[-1][1]):
                pos = m.start() + 1
                break
            matches.append(m.span())
        else:
            break
    return matches


def split_spans(text: str, regex: re.Pattern[str], behavior: str, invert: bool = False) -> list[tuple[int, int]]:
    """NormalizedString::split (tokenizers/src/tokenizer/normalizer.rs): cut `text` into matches and the gaps between
    them, then keep, drop or merge the matches according to `behavior`. Returns non-empty (start, end) spans."""
    spans, prev = [], 0  # (start, end, is_match)
    for start, end in find_matches(regex, text):
        if start > prev:
            spans.append((prev, start, invert))
        spans.append((start, end, not invert))
        prev = end
    if prev < len(text):
        spans.append((prev, len(text), invert))
    out, previous_match = [], False
    if behavior == "Removed":
        out = [(s, e) for s, e, is_match in spans if not is_match]
    elif behavior == "Isolated":
        out = [(s, e) for s, e, _ in spans]
    elif behavior == "Contiguous":
        for s, e, is_match in spans:
            if out and is_match == previous_match:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
            previous_match = is_match
    elif behavior == "MergedWithPrevious":
        for s, e, is_match in spans:
            if out and is_match and not previous_match:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
            previous_match = is_match
    elif behavior == "MergedWithNext":
        for s, e, is_match in reversed(spans):
            if out and is_match and not previous_match:
                out[-1] = (s, out[-1][1])
            else:
                out.append((s, e))
            previous_match = is_match
        out.reverse()
    else:
        raise ValueError(f"unknown split behavior {behavior!r} (expected one of {', '.join(SPLIT_BEHAVIORS)})")
    return [(s, e) for s, e in out if e > s]


def split_pieces(text: str, at_start: bool, regex: re.Pattern[str], behavior: str, invert: bool = False) -> Pieces:
    """Split: pieces of `text` from split_spans; only the first can still be at the start of the original text."""
    return [(text[s:e], at_start and s == 0) for s, e in split_spans(text, regex, behavior, invert)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF map to themselves, the
    other 68 bytes to chr(256), chr(257), ... in byte order (pre_tokenizers/byte_level.rs)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        table[b] = chr(b) if b in keep else chr(256 + extra)
        extra += b not in keep
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
LATIN1_TO_BYTE_CHAR = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})


def byte_level(text: str, at_start: bool, add_prefix_space: bool, use_regex: bool) -> Pieces:
    """ByteLevel (pre_tokenizers/byte_level.rs): optionally prefix a space, split with the GPT-2 pattern, then spell
    each piece's UTF-8 bytes with the byte -> character table."""
    if add_prefix_space and not text.startswith(" "):
        text = " " + text
    pieces = split_pieces(text, at_start, compile_regex(GPT2_PATTERN), "Isolated") if use_regex else [(text, at_start)]
    return [(p.encode("utf-8").decode("latin-1").translate(LATIN1_TO_BYTE_CHAR), first) for p, first in pieces]


def metaspace(text: str, at_start: bool, replacement: str, prepend_scheme: str, split: bool) -> Pieces:
    """Metaspace (pre_tokenizers/metaspace.rs): spaces become `replacement`, which is prepended always or, for
    "first", only to a piece at offset 0 of the text; then split before each replacement (MergedWithNext)."""
    text = text.replace(" ", replacement)
    prepend = prepend_scheme == "always" or (prepend_scheme == "first" and at_start)
    if prepend and not text.startswith(replacement):
        text = replacement + text
    if not split:
        return [(text, at_start)]
    return split_pieces(text, at_start, re.compile(re.escape(replacement)), "MergedWithNext")


def metaspace_scheme(cfg: dict, where: str) -> str:
    """A Metaspace's prepend_scheme; older files say add_prefix_space instead, where false means "never"."""
    scheme = field(cfg, "prepend_scheme", str, where, None)
    if scheme is None:
        scheme = "always" if field(cfg, "add_prefix_space", bool, where, True) else "never"
    if scheme not in ("always", "first", "never"):
        raise ValueError(f"{where}: unknown Metaspace prepend_scheme {scheme!r} (expected always, first, never)")
    return scheme


def build_pre_tokenizer(cfg: dict | None, where: str) -> PreTokenizer | None:
    """ByteLevel, Digits (digits.rs: Rust's char::is_numeric = categories Nd/Nl/No, one by one or in runs),
    Split (split.rs: regex or literal, any behavior, invert), Metaspace, Sequence (sequence.rs)."""
    if cfg is None:
        return None
    kind, here = component(cfg, where, "pre_tokenizer")
    if kind == "Sequence":
        steps = [build_pre_tokenizer(c, where) for c in objects(cfg, "pretokenizers", here)]

        def sequence(text: str, at_start: bool) -> Pieces:
            pieces = [(text, at_start)]
            for step in steps:
                pieces = [out for piece in pieces for out in step(*piece)]
            return pieces
        return sequence
    if kind == "ByteLevel":
        return functools.partial(byte_level, add_prefix_space=field(cfg, "add_prefix_space", bool, here, True),
                                 use_regex=field(cfg, "use_regex", bool, here, True))
    if kind == "Digits":
        regex = compile_regex(r"\p{N}" if field(cfg, "individual_digits", bool, here, False) else r"\p{N}+")
        return functools.partial(split_pieces, regex=regex, behavior="Isolated")
    if kind == "Split":
        behavior = field(cfg, "behavior", str, here)
        if behavior not in SPLIT_BEHAVIORS:
            raise ValueError(f"{where}: unknown Split behavior {behavior!r} (expected {SPLIT_BEHAVIORS})")
        return functools.partial(split_pieces, regex=pattern_regex(field(cfg, "pattern", dict, here), here),
                                 behavior=behavior, invert=field(cfg, "invert", bool, here, False))
    if kind == "Metaspace":
        return functools.partial(metaspace, replacement=field(cfg, "replacement", str, here),
                                 prepend_scheme=metaspace_scheme(cfg, here),
                                 split=field(cfg, "split", bool, here, True))
    raise unsupported(where, "pre_tokenizer", kind, ["ByteLevel", "Digits", "Split", "Metaspace", "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# BPE model (tokenizers/src/models/bpe/model.rs and word.rs).
# ---------------------------------------------------------------------------------------------------------------------

class BPE:
    """Byte-pair encoding of one pre-token: characters (or their <0xHH> byte tokens, or unk) first, then repeatedly
    merge the adjacent pair of lowest merge rank. Results are cached per pre-token."""

    def __init__(self, cfg: dict, where: str) -> None:
        if cfg.get("type", "BPE") != "BPE":
            raise unsupported(where, "model", cfg.get("type"), ["BPE"])
        here = f"{where}: BPE model"
        if field(cfg, "dropout", (float, int, type(None)), here, None) not in (None, 0.0):
            raise ValueError(f"{where}: BPE dropout {cfg['dropout']} is not supported (encoding must be deterministic)")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if field(cfg, key, (str, type(None)), here, None):
                raise ValueError(f"{where}: BPE {key}={cfg[key]!r} is not supported (no family used here sets it)")
        self.vocab = field(cfg, "vocab", dict, here)
        for token, token_id in self.vocab.items():
            if type(token_id) is not int or token_id < 0:
                raise ValueError(f"{here}: 'vocab' maps {token!r} to {shown(token_id)}, expected an integer >= 0")
        self.unk_token = field(cfg, "unk_token", (str, type(None)), here, None)
        if self.unk_token is not None and self.unk_token not in self.vocab:
            raise ValueError(f"{where}: BPE unk_token {self.unk_token!r} is not in the vocabulary")
        self.fuse_unk = field(cfg, "fuse_unk", bool, here, False)
        self.byte_fallback = field(cfg, "byte_fallback", bool, here, False)
        self.ignore_merges = field(cfg, "ignore_merges", bool, here, False)
        # Merges are "a b" strings (tokenizers < 0.20) or ["a", "b"] pairs; (a, b) -> (rank, a + b). A repeated pair
        # keeps its last rank, as the Rust HashMap does.
        self.merges = {}
        for rank, merge in enumerate(field(cfg, "merges", list, here)):
            if not (type(merge) is str or (type(merge) is list and all(type(part) is str for part in merge))):
                raise ValueError(f"{here}: merge #{rank} is {shown(merge)}, expected \"a b\" or [\"a\", \"b\"]")
            pair = tuple(merge.split(" ") if isinstance(merge, str) else merge)
            if len(pair) != 2 or any(p not in self.vocab for p in (*pair, pair[0] + pair[1])):
                raise ValueError(f"{where}: bad merge #{rank} {merge!r} (needs two parts in the vocab, and their join)")
            self.merges[pair] = (rank, pair[0] + pair[1])
        self.byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        self.tokenize = functools.lru_cache(maxsize=1 << 16)(self._tokenize)

    def _tokenize(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (model.rs, `tokenize_with_cache` and `merge_word`)."""
        if self.ignore_merges and word in self.vocab:
            return (self.vocab[word],)
        symbols, pending_unk = [], False
        for ch in word:
            if ch in self.vocab:
                if pending_unk:
                    symbols.append(self.unk_token)
                    pending_unk = False
                symbols.append(ch)
                continue
            if self.byte_fallback:
                byte_tokens = [self.byte_tokens[b] for b in ch.encode("utf-8")]
                if all(t in self.vocab for t in byte_tokens):
                    symbols.extend(byte_tokens)  # a pending unk stays pending here, exactly as in model.rs
                    continue
            if self.unk_token is not None:  # without an unk token the character is dropped, as in model.rs
                if pending_unk and not self.fuse_unk:
                    symbols.append(self.unk_token)
                pending_unk = True
        if pending_unk:
            symbols.append(self.unk_token)
        return tuple(self.vocab[s] for s in self.merge(symbols))

    def merge(self, symbols: list[str]) -> list[str]:
        """Word::merge_all (word.rs): a heap of (rank, position) over adjacent pairs; pop the lowest, skip it when
        stale (its pair no longer forms the same token), merge, and push the new pairs with both neighbours."""
        merges, n = self.merges, len(symbols)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(merges[pair][0], i, merges[pair][1]) for i, pair in enumerate(zip(symbols, symbols[1:]))
                if pair in merges]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] is None or j >= n or merges.get((symbols[i], symbols[j]), (0, None))[1] != new:
                continue
            symbols[i], symbols[j] = new, None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            left, right = prv[i], nxt[i]
            if left >= 0 and (symbols[left], new) in merges:
                rank, merged = merges[symbols[left], new]
                heapq.heappush(heap, (rank, left, merged))
            if right < n and (new, symbols[right]) in merges:
                rank, merged = merges[new, symbols[right]]
                heapq.heappush(heap, (rank, i, merged))
        return [s for s in symbols if s is not None]


# ---------------------------------------------------------------------------------------------------------------------
# Decoders: [token, ...] -> [text, ...] (tokenizers/src/decoders/); the final text is the concatenation.
# ---------------------------------------------------------------------------------------------------------------------

Decoder = Callable[[list[str]], list[str]]


def byte_level_decode(tokens: list[str]) -> list[str]:
    """ByteLevel (pre_tokenizers/byte_level.rs): map each token's characters back to bytes (a token with a character
    outside the table, such as an added token, contributes its own UTF-8), then decode with U+FFFD for bad bytes."""
    data = bytearray()
    for token in tokens:
        if all(c in CHAR_TO_BYTE for c in token):
            data.extend(CHAR_TO_BYTE[c] for c in token)
        else:
            data.extend(token.encode("utf-8"))
    return [data.decode("utf-8", errors="replace")]


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_fallback_decode(tokens: list[str]) -> list[str]:
    """ByteFallback (byte_fallback.rs): runs of <0xHH> tokens become their UTF-8 text, or one U+FFFD per byte when
    the run is not valid UTF-8."""
    out, run = [], bytearray()
    for token in [*tokens, None]:
        m = BYTE_TOKEN.fullmatch(token) if token is not None else None
        if m:
            run.append(int(m.group(1), 16))
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(run))
            run = bytearray()
        if token is not None:
            out.append(token)
    return out


def strip_decode(tokens: list[str], content: str, start: int, stop: int) -> list[str]:
    """Strip (strip.rs): remove up to `start` leading and `stop` trailing `content` characters from every token."""
    out = []
    for token in tokens:
        a = 0
        while a < min(start, len(token)) and token[a] == content:
            a += 1
        b = len(token)
        while len(token) - b < stop and b > a and token[b - 1] == content:
            b -= 1
        out.append(token[a:b])
    return out


def metaspace_decode(tokens: list[str], replacement: str, prepend_scheme: str) -> list[str]:
    """Metaspace (pre_tokenizers/metaspace.rs): replacement -> space, except that the first token drops its
    replacement characters when the encoder prepends one."""
    drop_first = prepend_scheme != "never"
    return [t.replace(replacement, "" if i == 0 and drop_first else " ") for i, t in enumerate(tokens)]


def build_decoder(cfg: dict | None, where: str) -> Decoder:
    """ByteLevel, ByteFallback, Fuse (fuse.rs: join all tokens), Strip, Replace (like the normalizer, per token),
    Metaspace, Sequence (sequence.rs). None means tokenizers' default: tokens joined by spaces."""
    if cfg is None:
        return lambda tokens: [" ".join(tokens)]
    kind, here = component(cfg, where, "decoder")
    if kind == "ByteLevel":
        return byte_level_decode
    if kind == "ByteFallback":
        return byte_fallback_decode
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Strip":
        return functools.partial(strip_decode, content=field(cfg, "content", str, here),
                                 start=field(cfg, "start", int, here), stop=field(cfg, "stop", int, here))
    if kind == "Replace":
        replace = build_normalizer(cfg, where)
        return lambda tokens: [replace(t) for t in tokens]
    if kind == "Metaspace":
        return functools.partial(metaspace_decode, replacement=field(cfg, "replacement", str, here),
                                 prepend_scheme=metaspace_scheme(cfg, here))
    if kind == "Sequence":
        steps = [build_decoder(c, where) for c in objects(cfg, "decoders", here)]
        return lambda tokens: functools.reduce(lambda acc, step: step(acc), steps, tokens)
    raise unsupported(where, "decoder", kind, ["ByteLevel", "ByteFallback", "Fuse", "Strip", "Replace", "Metaspace",
                                               "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# Post-processor: the special ids that add_special_tokens puts around a single sequence (tokenizers/src/processors/).
# ---------------------------------------------------------------------------------------------------------------------

def build_post_processor(cfg: dict | None, where: str) -> tuple[list[int], list[int]]:
    """(prefix_ids, suffix_ids) of TemplateProcessing's `single` template (template.rs), e.g. [<s>] + $A. ByteLevel
    (byte_level.rs) only trims offsets, so it adds nothing; Sequence nests its processors."""
    if cfg is None:
        return [], []
    kind, here = component(cfg, where, "post_processor")
    if kind == "ByteLevel":
        return [], []
    if kind == "TemplateProcessing":
        special_tokens = field(cfg, "special_tokens", dict, here)
        prefix, suffix, seen_sequence = [], [], False
        for item in objects(cfg, "single", here):
            if "Sequence" in item:
                if field(item, "Sequence", dict, here).get("id") != "A" or seen_sequence:
                    raise ValueError(f"{where}: TemplateProcessing single template {cfg['single']} must have one $A")
                seen_sequence = True
            else:
                name = field(field(item, "SpecialToken", dict, here), "id", str, here)
                ids = field(field(special_tokens, name, dict, f"{here}: special_tokens"), "ids", list, here)
                if not all(type(i) is int and i >= 0 for i in ids):
                    raise ValueError(f"{here}: special token {name!r} has ids {shown(ids)}, expected integers >= 0")
                (suffix if seen_sequence else prefix).extend(ids)
        return prefix, suffix
    if kind == "Sequence":
        prefix, suffix = [], []
        for processor in objects(cfg, "processors", here):
            p, s = build_post_processor(processor, where)
            prefix, suffix = p + prefix, suffix + s
        return prefix, suffix
    raise unsupported(where, "post_processor", kind, ["TemplateProcessing", "ByteLevel", "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# The Tokenizer class: tokenizer.json plus bos/eos/pad from the tokenizer config; added tokens, encode, decode.
# ---------------------------------------------------------------------------------------------------------------------

ADDED_TOKEN_OPTIONS = ("single_word", "lstrip", "rstrip", "normalized", "special")
ADDED_TOKEN_FIELDS = {"id": int, "content": str, **dict.fromkeys(ADDED_TOKEN_OPTIONS, bool)}
COMPONENTS = ("normalizer", "pre_tokenizer", "decoder", "post_processor")
# Real components nest a few levels (a Sequence of Splits with their patterns); Sequences nested hundreds deep would
# load and then exceed Python's recursion limit on the first text encoded.
MAX_COMPONENT_DEPTH = 32
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")  # what the tokenizer config gives
AddedMatcher = tuple[re.Pattern[str], dict[str, dict]]  # (regex, {matched text: added token entry})


def is_word_char(c: str) -> bool:
    """Rust regex's \\w: letters, marks, decimal digits, connector punctuation and the joiners (approximately:
    Unicode Alphabetic also holds a few dozen So/Nl characters)."""
    return unicodedata.category(c)[:2] in ("Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "Pc") or \
        c in "\u200c\u200d"


def is_white_space(c: str) -> bool:
    """Rust's char::is_whitespace, i.e. Unicode White_Space (what lstrip and rstrip absorb)."""
    return any(lo <= ord(c) <= hi for lo, hi in WHITE_SPACE)


class Tokenizer:
    """Encode and decode like `tokenizers.Tokenizer.from_file(path)`; bos/eos/pad come from the tokenizer config."""

    def __init__(self, spec: dict, path: str | Path = "tokenizer.json", config: dict | None = None) -> None:
        where = str(path)
        for key in COMPONENTS:
            if json_depth(spec.get(key)) > MAX_COMPONENT_DEPTH:
                raise ValueError(f"{where}: '{key}' is nested more than {MAX_COMPONENT_DEPTH} levels deep; no real "
                                 f"tokenizer's is")
        self.model = BPE(field(spec, "model", dict, where), where)
        self.normalizer = build_normalizer(spec.get("normalizer"), where)
        self.pre_tokenizer = build_pre_tokenizer(spec.get("pre_tokenizer"), where)
        self.decoder = build_decoder(spec.get("decoder"), where)
        self.prefix_ids, self.suffix_ids = build_post_processor(spec.get("post_processor"), where)
        # Added tokens are matched leftmost-longest, the raw ones on the text and the normalized ones (by their
        # normalized content) on each normalized piece (added_vocabulary.rs, `refresh_added_tokens`). A normalized
        # one also decodes as its normalized content, as tokenizers does (Llama-2's "<mask>" is "▁<mask>").
        added = objects(spec, "added_tokens", where, [])
        for i, t in enumerate(added):
            for key, kind in ADDED_TOKEN_FIELDS.items():
                field(t, key, kind, f"{where}: added_tokens[{i}]")
            if t["id"] < 0:
                raise ValueError(f"{where}: added_tokens[{i}]: 'id' is {t['id']}, expected an integer >= 0")
        normalize = self.normalizer or (lambda s: s)
        self.added_to_id = {t["content"]: t["id"] for t in added}
        self.id_to_added = {t["id"]: normalize(t["content"]) if t["normalized"] else t["content"] for t in added}
        self.special_ids = {t["id"] for t in added if t["special"]}
        self.id_to_vocab = {i: s for s, i in self.model.vocab.items()}
        self.raw_matcher = self.added_token_matcher([t for t in added if not t["normalized"]], lambda s: s)
        self.normalized_matcher = self.added_token_matcher([t for t in added if t["normalized"]], normalize)
        config = config or {}
        self.bos_id = self.config_token_id(config, "bos_token", where)
        if self.bos_id is None and self.prefix_ids:
            self.bos_id = self.prefix_ids[0]  # no config: the template's leading special token
        self.eos_id = self.config_token_id(config, "eos_token", where)
        pad_id = self.config_token_id(config, "pad_token", where)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.vocab_size = len(self.model.vocab.keys() | self.added_to_id.keys())

    @classmethod
    def from_file(cls, path: str | Path, config: dict | None = None) -> "Tokenizer":
        """Load a tokenizer.json; `config` is a dict like tokenizer_config.json (bos_token, eos_token, pad_token)."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer.json not found (pass the file a Hugging Face model ships)")
        return cls(read_json_object(path), path, config)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        """Load folder/tokenizer.json; bos/eos/pad from tokenizer_config.json, else from special_tokens_map.json."""
        folder = Path(folder).expanduser()
        config = {}
        for path in (folder / "special_tokens_map.json", folder / "tokenizer_config.json"):  # the later file wins
            if path.exists():
                entries = read_json_object(path)
                for key in SPECIAL_TOKEN_KEYS:
                    token = field(entries, key, (str, dict, type(None)), str(path), None)
                    if isinstance(token, dict):
                        token = field(token, "content", str, f"{path}: {key}")
                    if token is not None:
                        config[key] = token
        return cls.from_file(folder / "tokenizer.json", config)

    def config_token_id(self, config: dict, key: str, where: str) -> int | None:
        """Id of config[key], a token string or a dict with "content"; None when the config does not name one."""
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{where}: {key} {token!r} from the tokenizer config is not in the vocabulary")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (added tokens first, as tokenizers does); None when unknown."""
        return self.added_to_id.get(token, self.model.vocab.get(token))

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, as the decoder sees it; None when unknown."""
        return self.id_to_added.get(token_id, self.id_to_vocab.get(token_id))

    def added_token_matcher(self, tokens: list[dict], normalize: Normalizer) -> AddedMatcher | None:
        """(regex, {matched text: token}) for a set of added tokens; longest alternatives first, so that `re`'s
        leftmost-first search becomes leftmost-longest (aho-corasick's MatchKind::LeftmostLongest)."""
        by_text = {}
        for t in tokens:
            by_text.setdefault(normalize(t["content"]), t)
        by_text.pop("", None)
        if not by_text:
            return None
        regex = re.compile("|".join(re.escape(s) for s in sorted(by_text, key=len, reverse=True)))
        return regex, by_text

    def split_added(self, text: str, at_start: bool,
                    matcher: AddedMatcher | None) -> list[tuple[str, int | None, bool]]:
        """AddedVocabulary::find_matches (added_vocabulary.rs): [(piece, token id or None, at_start)], honouring
        single_word (no word character on either side), lstrip and rstrip (absorb whitespace on that side)."""
        if matcher is None:
            return [(text, None, at_start)] if text else []
        regex, by_text = matcher
        pieces, offset = [], 0
        for m in regex.finditer(text):
            token, start, stop = by_text[m.group()], m.start(), m.end()
            word_before = start > 0 and is_word_char(text[start - 1])
            if token["single_word"] and (word_before or (stop < len(text) and is_word_char(text[stop]))):
                continue
            if token["lstrip"]:
                while start > offset and is_white_space(text[start - 1]):
                    start -= 1
            if token["rstrip"]:
                while stop < len(text) and is_white_space(text[stop]):
                    stop += 1
            if start > offset:
                pieces.append((text[offset:start], None, at_start and offset == 0))
            pieces.append((text[start:stop], self.added_to_id[token["content"]], False))
            offset = stop
        if offset < len(text):
            pieces.append((text[offset:], None, at_start and offset == 0))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, equal to tokenizers' `Tokenizer.encode(text, add_special_tokens).ids`."""
        ids = []
        for raw, raw_id, raw_at_start in self.split_added(text, True, self.raw_matcher):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            normalized = self.normalizer(raw) if self.normalizer else raw
            for piece, token_id, at_start in self.split_added(normalized, raw_at_start, self.normalized_matcher):
                if token_id is not None:
                    ids.append(token_id)
                    continue
                words = self.pre_tokenizer(piece, at_start) if self.pre_tokenizer else [(piece, at_start)]
                for word, _ in words:
                    ids.extend(self.model.tokenize(word))
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` through the decoder chain; ids outside the vocabulary are skipped, as tokenizers does."""
        tokens = [self.id_to_token(i) for i in ids if not (skip_special_tokens and i in self.special_ids)]
        return "".join(self.decoder([t for t in tokens if t is not None]))
