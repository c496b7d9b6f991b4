"""machinery/tokenizer.py against Hugging Face `tokenizers` (and transformers), on tokenizer.json files built here.

Each family's tokenizer.json is trained once per module with `tokenizers`' BpeTrainer on a small corpus and saved with
that family's normalizer / pre-tokenizer / decoder / post-processor; the parity tests then require identical ids and
identical decoded text on a unicode stress corpus, a seeded random corpus and (when present) every GSM8K test question
and answer. The real SmolLM2 tokenizer is compared when its folder exists. Parity tests skip without `tokenizers`;
the error and configuration tests use a hand-written tokenizer.json and always run.
"""

import copy
import json
import os
import random
import re
import unicodedata

import pytest

from machinery.tokenizer import Tokenizer, build_decoder, compile_regex, split_pieces

try:
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
except ImportError:
    tokenizers = None


def reference(path):
    """tokenizers' own loading of `path`, the reference of every parity test (which skips without tokenizers)."""
    if tokenizers is None:
        pytest.skip("parity test: tokenizers is not installed")
    return tokenizers.Tokenizer.from_file(str(path))

from conftest import GSM8K_DIR, SMOLLM2_DIR, deadline, has_file

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

STRESS = [
    "Hello world! It's John's. They'LL go; we'VE been; I'ſ odd; don't can't 'S 'T 'RE 'M 'D.",
    "12345 3.5 1,000 1/2 ¾ ²½ ٠١٢٣٤٥٦٧٨٩ ۱۲۳ 10² Ⅻ ⅷ ①",
    "中文测试 一二三 日本語のテキスト 한국어",
    "👨\u200d👩\u200d👧\u200d👦 family 👍🏽 emoji 🇺🇸",
    "café cafe\u0301 e\u0301\u0302 Z̸̢a̷l̶g̵o̴ ñ n\u0303",
    "sep\x1cfile\x1dgroup\x1erecord\x1funit",
    "line1\r\nline2\n\nline3\r",
    "a    b     c\t\t d",
    "trailing spaces   ",
    "nbsp\u00a0here ideographic\u3000space",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|>Hi<|end_of_text|>",
    "end with </s>",
    "<s>start and </s> and <unk> literal",
    "unknown chars: \U0001f9ea ᚠᛇᚻ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
    " leading space", "  two leading", "\n", " ", "x",
    "tabs\tand\u2028line sep\u2029para\u0085nel",
    "mixed123abc456 x1y2",
    "<tool>call</tool> a <tool> b  <tool>  c xyz axyz xyzb xyz.",
    "a <mask> b<mask>c  <mask>  ",
]
# Characters for the seeded random corpus: special-token fragments, contractions, every kind of space, digits of all
# scripts, combining marks, emoji parts, and strings that look like byte tokens.
POOL = [*"abcxyzABCXYZ0123456789'.,!?-_()[]<>|/\\\n\r\t sStTlLdDmM", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
        "<unk>", "<mask>", "<tool>", "xyz", "▁", "   ", "\r\n", "\u00a0", "\u3000", "\u2028", "\x1c", "\x1f", "\x85",
        "ſ", "²", "½", "٣", "一", "中", "é", "e\u0301", "\u0301", "👍", "\u200d", "🏽", "ß", "İ", "K", "Ⅻ", "𝔘",
        "\U0001f9ea", "ᚠ", "<0x41>", "Ġ", "Ċ"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def random_texts(n=300, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def gsm8k_texts(split):
    if not has_file(GSM8K_DIR, f"{split}.jsonl"):
        return []
    path = GSM8K_DIR / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row[key] for row in rows for key in ("question", "answer")]


def train(tok, vocab_size, special_tokens, alphabet=(), limit_alphabet=None):
    corpus = gsm8k_texts("train")[:400] + STRESS + ["Natalia sold clips to 48 of her friends in April."] * 3
    options = {} if limit_alphabet is None else {"limit_alphabet": limit_alphabet}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=list(alphabet), **options)
    tok.train_from_iterator(corpus, trainer)


def build_smollm2(path):
    """Digits(individual) + ByteLevel with the GPT-2 regex, as SmolLM2 ships."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    train(tok, 800, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre_tokenizers.ByteLevel.alphabet())
    tok.save(str(path))


def build_qwen2(path):
    """NFC + Split(regex with \\p{N}) + ByteLevel(use_regex=false), plus added tokens with lstrip/rstrip/single_word."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tok, 800, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre_tokenizers.ByteLevel.alphabet())
    tok.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True, normalized=True),
                    AddedToken("xyz", single_word=True, normalized=False)])
    tok.save(str(path))


def build_llama3(path):
    """Split(regex with \\p{N}{1,3}) + ByteLevel, ignore_merges, and a template that prepends <|begin_of_text|>."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    train(tok, 800, ["<|begin_of_text|>", "<|end_of_text|>"], pre_tokenizers.ByteLevel.alphabet())
    bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                              processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                            special_tokens=[bos])])
    tok.save(str(path))


def build_sentencepiece(path, metaspace=False):
    """Llama-2 style: legacy Prepend+Replace normalizer (or a Metaspace prepend_scheme "first" pre-tokenizer), BPE
    with byte_fallback and fuse_unk, <s> template; a small alphabet so that rare characters fall back to bytes."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    train(tok, 700, ["<unk>", "<s>", "</s>", *BYTE_TOKENS], limit_alphabet=60)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_tokens([AddedToken("<mask>", lstrip=True, normalized=True)])
    tok.save(str(path))
    # Byte tokens live in the model vocabulary only (as in Llama-2), not among the added tokens.
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in BYTE_TOKENS]
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


FAMILIES = {
    "smollm2": build_smollm2,
    "qwen2": build_qwen2,
    "llama3": build_llama3,
    "llama2_legacy": build_sentencepiece,
    "metaspace_first": lambda path: build_sentencepiece(path, metaspace=True),
}


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    if tokenizers is None:
        pytest.skip("parity test: tokenizers is not installed")
    folder = tmp_path_factory.mktemp("families")
    paths = {}
    for name, build in FAMILIES.items():
        paths[name] = folder / f"{name}.json"
        build(paths[name])
    return paths


def tiny_spec(vocab, merges, ignore_merges=False, added=()):
    """A hand-written byte-less BPE tokenizer.json: no normalizer, pre-tokenizer or decoder; `added` special tokens
    get the ids after the vocabulary."""
    added_tokens = [{"id": len(vocab) + i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True} for i, content in enumerate(added)]
    return {"version": "1.0", "added_tokens": added_tokens, "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": {token: i for i, token in enumerate(vocab)},
                      "merges": merges}}


def write_variant(tmp_path, spec, name="variant.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


def assert_parity(ours, ref, texts):
    """Same ids with and without special tokens; same decoded text of those ids with and without skipping special
    tokens; decode(encode(x)) == x wherever tokenizers round-trips x."""
    for text in texts:
        for add_special_tokens in (True, False):
            ids = ref.encode(text, add_special_tokens=add_special_tokens).ids
            assert ours.encode(text, add_special_tokens) == ids, (text, add_special_tokens)
            for skip in (False, True):
                assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (text, ids, skip)
        if ref.decode(ids, skip_special_tokens=False) == text:
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


# ---------------------------------------------------------------------------------------------------------------------
# Unicode classes

@pytest.fixture(scope="module")
def assigned_code_points():
    """Every code point assigned in Python's Unicode (14.0 on 3.11) except surrogates and private use. Unassigned ones
    are left out: Oniguruma's tables are newer, so they may be letters there (version skew)."""
    return "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co"))


@pytest.mark.parametrize("pattern", [r"\p{L}", r"\p{N}", r"\s", r"[^\s\p{L}\p{N}]", r"\P{L}", r"\p{Lu}"])
def test_unicode_classes_match_oniguruma_on_every_assigned_code_point(pattern, assigned_code_points):
    if tokenizers is None:
        pytest.skip("parity test: tokenizers is not installed")
    text = assigned_code_points
    expected = [p for p, _ in pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)]
    assert [p for p, _ in split_pieces(text, True, compile_regex(pattern), "Isolated")] == expected


def test_white_space_excludes_information_separators_and_numbers_include_no_nl():
    assert compile_regex(r"\s").findall("\x1c\x1d\x1e\x1f\x85\xa0\u3000\t") == ["\x85", "\xa0", "\u3000", "\t"]
    assert compile_regex(r"\p{N}").findall("²½Ⅻ٣一a") == ["²", "½", "Ⅻ", "٣"]
    assert compile_regex(r"(?i:'s)").findall("'s 'S 'ſ") == ["'s", "'S", "'ſ"]


# ---------------------------------------------------------------------------------------------------------------------
# Family parity

@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_tokenizers_on_stress_and_random_text(family, family_files):
    path = family_files[family]
    assert_parity(Tokenizer.from_file(path), reference(path), STRESS + random_texts())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_tokenizers_on_gsm8k_test(family, family_files):
    texts = gsm8k_texts("test")
    if not texts:
        pytest.skip("set LORASB_GSM8K_DIR to GSM8K's folder")
    path = family_files[family]
    ours, ref = Tokenizer.from_file(path), reference(path)
    assert [ours.encode(t) for t in texts] == [e.ids for e in ref.encode_batch(texts)]


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_size_and_token_lookups_match_tokenizers(family, family_files):
    ours, ref = Tokenizer.from_file(family_files[family]), reference(family_files[family])
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for token_id in range(ours.vocab_size):
        assert ours.id_to_token(token_id) == ref.id_to_token(token_id)
        assert ours.token_to_id(ref.id_to_token(token_id)) == ref.token_to_id(ref.id_to_token(token_id))


def test_bos_comes_from_the_template_when_there_is_no_config(family_files):
    llama3 = Tokenizer.from_file(family_files["llama3"])
    assert llama3.bos_id == llama3.token_to_id("<|begin_of_text|>")
    assert llama3.encode("hi")[0] == llama3.bos_id and llama3.encode("hi", add_special_tokens=False)[0] != llama3.bos_id
    assert Tokenizer.from_file(family_files["smollm2"]).bos_id is None


@pytest.mark.parametrize("family", ["smollm2", "llama2_legacy"])
def test_both_merges_serialisations_give_the_same_ids(family, family_files, tmp_path):
    spec = json.loads(family_files[family].read_text(encoding="utf-8"))
    assert isinstance(spec["model"]["merges"][0], list)  # what tokenizers 0.23 writes
    as_strings = copy.deepcopy(spec)
    as_strings["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    path = write_variant(tmp_path, as_strings)
    texts = STRESS + random_texts(100)
    assert_parity(Tokenizer.from_file(path), reference(path), texts)
    original = Tokenizer.from_file(family_files[family])
    assert [Tokenizer.from_file(path).encode(t) for t in texts] == [original.encode(t) for t in texts]


# ---------------------------------------------------------------------------------------------------------------------
# Component variants: the trained files rewritten with each option, compared with tokenizers on the same text.

BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
SPLIT_PATTERNS = [{"Regex": r"\s+"}, {"String": " "}, {"Regex": r"[^\S\r\n]|\P{L}+"}, {"Regex": r"\s*|[ab]"},
                  {"Regex": r"^\p{L}|\p{L}$|\s\Z|\A\s"}]


@pytest.mark.parametrize("behavior", ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"])
@pytest.mark.parametrize("invert", [False, True])
def test_split_behaviors_match_tokenizers(behavior, invert, family_files, tmp_path):
    spec = json.loads(family_files["smollm2"].read_text(encoding="utf-8"))
    texts = STRESS + random_texts(60)
    for pattern in SPLIT_PATTERNS:
        split = {"type": "Split", "pattern": pattern, "behavior": behavior, "invert": invert}
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, BYTE_LEVEL_NO_REGEX]}
        path = write_variant(tmp_path, spec)
        assert_parity(Tokenizer.from_file(path), reference(path), texts)


def variant_specs(family_files):
    """(name, spec) of one-option rewrites of the trained files."""
    smollm2 = json.loads(family_files["smollm2"].read_text(encoding="utf-8"))
    legacy = json.loads(family_files["llama2_legacy"].read_text(encoding="utf-8"))
    meta = json.loads(family_files["metaspace_first"].read_text(encoding="utf-8"))
    qwen2 = json.loads(family_files["qwen2"].read_text(encoding="utf-8"))
    out = []
    for add_prefix_space in (True, False):
        for use_regex in (True, False):
            spec = copy.deepcopy(smollm2)
            spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True,
                                     "use_regex": use_regex}
            out.append((f"byte_level_{add_prefix_space}_{use_regex}", spec))
    spec = copy.deepcopy(smollm2)  # empty matches must not become pieces that then get a prefix space
    split = {"type": "Split", "pattern": {"Regex": r"\s*|[ab]"}, "behavior": "Isolated", "invert": False}
    prefix_space = {**BYTE_LEVEL_NO_REGEX, "add_prefix_space": True}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, prefix_space]}
    out.append(("empty_matches_then_prefix_space", spec))
    spec = copy.deepcopy(smollm2)
    spec["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    out.append(("digit_runs", spec))
    spec = copy.deepcopy(smollm2)
    spec["decoder"] = None
    out.append(("no_decoder", spec))
    for scheme in ("always", "never", "first"):
        for split in (True, False):
            spec = copy.deepcopy(meta)
            spec["pre_tokenizer"].update(prepend_scheme=scheme, split=split)
            spec["decoder"]["decoders"][1]["prepend_scheme"] = scheme
            out.append((f"metaspace_{scheme}_{split}", spec))
    spec = copy.deepcopy(meta)
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}  # older files
    out.append(("metaspace_add_prefix_space", spec))
    spec = copy.deepcopy(legacy)
    spec["model"]["fuse_unk"] = False
    out.append(("unfused_unk", spec))
    spec = copy.deepcopy(legacy)
    spec["model"]["byte_fallback"] = False
    out.append(("unk_without_byte_fallback", spec))
    spec = copy.deepcopy(legacy)
    spec["model"].update(byte_fallback=False, unk_token=None)
    out.append(("unknown_characters_dropped", spec))
    spec = copy.deepcopy(legacy)
    for b in range(0x80, 0x100):  # only ASCII byte tokens left: other characters mix byte tokens and unk
        spec["model"]["vocab"][f"<0x{b:02X}>gone"] = spec["model"]["vocab"].pop(f"<0x{b:02X}>")
    out.append(("partial_byte_tokens", spec))
    spec = copy.deepcopy(legacy)
    spec["normalizer"]["normalizers"][1] = {"type": "Replace", "pattern": {"Regex": r"\s"}, "content": "▁"}
    out.append(("regex_replace", spec))
    spec = copy.deepcopy(qwen2)
    for token in spec["added_tokens"]:
        if token["content"] == "<tool>":
            token.update(lstrip=False, rstrip=True, single_word=True)
        if token["content"] == "xyz":
            token.update(normalized=True, lstrip=True, rstrip=True)
    out.append(("added_token_options", spec))
    spec = copy.deepcopy(legacy)
    for token in spec["added_tokens"]:
        if token["content"] == "<mask>":
            token.update(normalized=False, rstrip=True, single_word=True)
    out.append(("raw_added_token", spec))
    return out


def test_component_variants_match_tokenizers(family_files, tmp_path):
    texts = STRESS + random_texts(100)
    for name, spec in variant_specs(family_files):
        path = write_variant(tmp_path, spec, f"{name}.json")
        try:
            assert_parity(Tokenizer.from_file(path), reference(path), texts)
        except AssertionError as e:
            raise AssertionError(f"variant {name}: {e}") from None


def tiny_bpe(tmp_path, vocab, merges, ignore_merges=False, added=()):
    path = write_variant(tmp_path, tiny_spec(vocab, merges, ignore_merges, added))
    return Tokenizer.from_file(path), reference(path)


def test_bpe_uses_the_merge_queue_of_word_rs(tmp_path):
    # Ranks that a trainer would never produce: ("bc", "b") outranks ("b", "c"). Merging every ("b", "c") first
    # (the GPT-2 loop) gives [bc, bc]; tokenizers' priority queue merges "bc"+"b" as soon as it appears.
    ours, ref = tiny_bpe(tmp_path, ["b", "c", "bc", "bcb"], [["bc", "b"], ["b", "c"]])
    assert ours.encode("bcbc") == ref.encode("bcbc").ids == [3, 1]


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges_emits_a_word_that_is_in_the_vocabulary(ignore_merges, tmp_path):
    # Merges alone turn "abc" into [a, bc]; with ignore_merges the vocabulary entry "abc" wins.
    ours, ref = tiny_bpe(tmp_path, ["a", "b", "c", "bc", "ab", "abc"], [["b", "c"], ["a", "b"], ["ab", "c"]],
                         ignore_merges)
    expected = [5] if ignore_merges else [0, 3]
    assert ours.encode("abc") == ref.encode("abc").ids == expected


def test_added_tokens_match_leftmost_longest(tmp_path):
    ours, ref = tiny_bpe(tmp_path, ["<", ">", "a", "b"], [], added=["<a>", "<a><b>", "b>"])
    for text in ["<a><b>", "<a><b><a>b>", "<<a><a><b"]:
        assert ours.encode(text) == ref.encode(text).ids, text
    assert ours.encode("<a><b>") == [5]


DECODERS = [{"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            {"type": "Strip", "content": " ", "start": 2, "stop": 2},
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": True},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}]


@pytest.mark.parametrize("decoder", DECODERS, ids=json.dumps)
def test_decoders_match_tokenizers(decoder, tmp_path):
    ours = build_decoder(decoder, "test")
    ref = reference(write_variant(tmp_path, {**tiny_spec(["a"], []), "decoder": decoder})).decoder
    pool = ["  a  ", " b ", "c  ", "▁x▁", "▁", "<0xE4>", "<0xB8>", "<0x80>", "<0x41>", "<0xe4>", "Ġhi", "Ċ", "ä¸Ģ", "é",
            "<s>"]
    rng = random.Random(2)
    for _ in range(300):
        tokens = [rng.choice(pool) for _ in range(rng.randint(0, 6))]
        assert "".join(ours(tokens)) == ref.decode(tokens), tokens


@pytest.mark.parametrize("family", ["smollm2", "llama2_legacy"])
def test_decoding_incomplete_utf8_matches_tokenizers(family, family_files):
    ours, ref = Tokenizer.from_file(family_files[family]), reference(family_files[family])
    rng = random.Random(1)
    for text in ["👨\u200d👩\u200d👧", "中文 ᚠᛇᚻ 🧪", "é ñ"]:
        ids = ref.encode(text, add_special_tokens=False).ids
        for _ in range(30):  # arbitrary slices and shuffles cut multi-byte sequences anywhere
            a, b = sorted(rng.sample(range(len(ids) + 1), 2))
            part = rng.sample(ids[a:b], b - a) if rng.random() < 0.5 else ids[a:b]
            assert ours.decode(part) == ref.decode(part, skip_special_tokens=False), part


# ---------------------------------------------------------------------------------------------------------------------
# Errors and special-token configuration

@pytest.mark.parametrize("key, value, message", [
    ("pre_tokenizer", {"type": "Whitespace"}, "Whitespace"),
    ("normalizer", {"type": "Lowercase"}, "Lowercase"),
    ("decoder", {"type": "WordPiece", "prefix": "##", "cleanup": True}, "WordPiece"),
    ("post_processor", {"type": "RobertaProcessing"}, "RobertaProcessing"),
    ("model", {"type": "WordPiece", "vocab": {}}, "WordPiece"),
    ("model.dropout", 0.1, "dropout"),
    ("model.continuing_subword_prefix", "##", "continuing_subword_prefix"),
    ("model.end_of_word_suffix", "</w>", "end_of_word_suffix"),
    ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False}, r"\\w"),
])
def test_unsupported_component_raises_naming_it_and_the_file(key, value, message, tmp_path):
    spec = tiny_spec(["a", "b", "ab"], [["a", "b"]])
    if key.startswith("model."):
        spec["model"][key.split(".")[1]] = value
    else:
        spec[key] = value
    path = write_variant(tmp_path, spec, "broken.json")
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_file(path)
    assert "broken.json" in str(error.value)


def test_missing_tokenizer_json_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_bos_eos_pad_from_tokenizer_config_and_special_tokens_map(tmp_path):
    spec = tiny_spec(["a", "b"], [], added=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # ids 2, 3, 4
    write_variant(tmp_path, spec, "tokenizer.json")
    # tokenizer_config.json wins; a dict with "content" works; no pad_token means pad = eos.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>", "lstrip": False}, "eos_token": "<|im_end|>", "pad_token": None}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 4, 4)
    # special_tokens_map.json fills what tokenizer_config.json lacks.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, 2)
    assert tok.vocab_size == 5 and tok.id_to_token(4) == "<|im_end|>" and tok.token_to_id("b") == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_a_token|>"}))
    with pytest.raises(ValueError, match=re.escape("eos_token '<|not_a_token|>'")):
        Tokenizer.from_dir(tmp_path)


def tokenizer_folder(tmp_path):
    """tokenizer.json (vocabulary a, b, ab; added <|endoftext|>, id 3), tokenizer_config.json and
    special_tokens_map.json, both naming <|endoftext|> as EOS."""
    write_variant(tmp_path, tiny_spec(["a", "b", "ab"], [["a", "b"]], added=["<|endoftext|>"]), "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return tmp_path


def edit(*keys, value):
    """A change of tokenizer.json: the field at keys (e.g. "model", "vocab") set to `value`."""
    def change(spec):
        for key in keys[:-1]:
            spec = spec[key]
        spec[keys[-1]] = value
    return change


DEEP = "[" * 100_000 + "]" * 100_000


def nested_sequences(depth):
    """A normalizer of `depth` Sequences one in the other: it loaded, then failed the first encode (RecursionError)."""
    normalizer = {"type": "NFC"}
    for _ in range(depth):
        normalizer = {"type": "Sequence", "normalizers": [normalizer]}
    return normalizer


MALFORMED = [pytest.param(name, text, error, id=f"{name} {what}") for name in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
             for what, text, error in (("not JSON", "{oops", "not valid JSON"),
                                       ("a list", "[1]", "a JSON list, where a JSON object"),
                                       ("nested 100k deep", DEEP, "JSON nested too deeply"))] + [
    pytest.param("tokenizer_config.json", {"eos_token": 3}, "'eos_token' is 3, expected a string", id="eos id"),
    pytest.param("special_tokens_map.json", {"eos_token": ["<|endoftext|>"]}, "'eos_token' is \\[", id="eos list"),
    pytest.param("tokenizer_config.json", {"eos_token": {"id": 3}}, "eos_token lacks 'content'", id="eos no content"),
    pytest.param("tokenizer.json", edit("model", "vocab", value=["a", "b", "ab"]),
                 "BPE model: 'vocab' is \\[\"a\", \"b\", \"ab\"\\], expected a JSON object", id="vocab list"),
    pytest.param("tokenizer.json", edit("model", "vocab", "b", value="1"),
                 "BPE model: 'vocab' maps 'b' to \"1\", expected an integer >= 0", id="vocab id string"),
    pytest.param("tokenizer.json", edit("model", "merges", value=[1, 2]),
                 "BPE model: merge #0 is 1, expected \"a b\" or", id="merges integers"),
    pytest.param("tokenizer.json", edit("model", "byte_fallback", value="false"),
                 "BPE model: 'byte_fallback' is \"false\", expected true or false", id="byte_fallback string"),
    pytest.param("tokenizer.json", edit("added_tokens", 0, "id", value="3"),
                 "added_tokens\\[0\\]: 'id' is \"3\", expected an integer", id="added id string"),
    pytest.param("tokenizer.json", edit("added_tokens", 0, "content", value=3),
                 "added_tokens\\[0\\]: 'content' is 3, expected a string", id="added content integer"),
    pytest.param("tokenizer.json", edit("added_tokens", 0, "special", value="yes"),
                 "added_tokens\\[0\\]: 'special' is \"yes\", expected true or false", id="added special string"),
    pytest.param("tokenizer.json", edit("added_tokens", value={"<|endoftext|>": 3}),
                 "'added_tokens' is \\{.*, expected a list", id="added tokens object"),
    pytest.param("tokenizer.json", edit("model", value=[1]), "'model' is \\[1\\], expected a JSON object",
                 id="model list"),
    pytest.param("tokenizer.json", edit("pre_tokenizer", value={"type": "ByteLevel", "add_prefix_space": "false"}),
                 "ByteLevel pre_tokenizer: 'add_prefix_space' is \"false\", expected true or false",
                 id="pre_tokenizer option string"),
    pytest.param("tokenizer.json", edit("decoder", value="ByteLevel"),
                 "decoder is \"ByteLevel\", expected a JSON object", id="decoder string"),
    pytest.param("tokenizer.json", edit("normalizer", value=nested_sequences(400)),
                 "'normalizer' is nested more than 32 levels deep", id="normalizer 400 sequences deep"),
]


@pytest.mark.parametrize("name, content, error", MALFORMED)
def test_a_malformed_tokenizer_file_is_one_value_error_naming_the_file_and_the_field(tmp_path, name, content, error):
    folder = tokenizer_folder(tmp_path)
    if callable(content):
        spec = json.loads((folder / name).read_text())
        content(spec)
        content = spec
    (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / name))}: {error}"):
        Tokenizer.from_dir(folder)


def test_an_oversized_tokenizer_json_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from machinery import input_files
    folder = tokenizer_folder(tmp_path)
    size = (folder / "tokenizer.json").stat().st_size
    monkeypatch.setattr(input_files, "MAX_JSON_BYTES", size - 1)
    monkeypatch.setattr(input_files, "open", lambda *args: pytest.fail("opened"), raising=False)
    with pytest.raises(ValueError, match=f"tokenizer.json holds {size} bytes, more than the {size - 1}"):
        Tokenizer.from_file(folder / "tokenizer.json")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_a_fifo_in_place_of_a_tokenizer_file_is_refused_without_blocking(tmp_path, name):
    folder = tokenizer_folder(tmp_path)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with deadline(5), pytest.raises(ValueError, match=f"{re.escape(str(folder / name))} is a FIFO"):
        Tokenizer.from_dir(folder)


# ---------------------------------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer

@pytest.fixture(scope="module")
def smollm2_dir():
    if not has_file(SMOLLM2_DIR, "tokenizer.json"):
        pytest.skip("set LORASB_SMOLLM2_DIR to the SmolLM2-135M-Instruct folder")
    return SMOLLM2_DIR


def test_real_smollm2_matches_tokenizers(smollm2_dir):
    ours = Tokenizer.from_dir(smollm2_dir)
    ref = reference(smollm2_dir / "tokenizer.json")
    assert_parity(ours, ref, STRESS + random_texts(100))
    texts = gsm8k_texts("test")
    expected = [e.ids for e in ref.encode_batch(texts)]
    assert [ours.encode(t) for t in texts] == expected
    assert [ours.decode(ids) for ids in expected] == ref.decode_batch(expected, skip_special_tokens=False)
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # <|im_start|>, <|im_end|>, <|im_end|>


def test_real_smollm2_matches_transformers(smollm2_dir):
    if tokenizers is None:  # transformers' fast tokenizer is built on it
        pytest.skip("parity test: tokenizers is not installed")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    ours = Tokenizer.from_dir(smollm2_dir)
    texts = STRESS + gsm8k_texts("test")[:400]
    assert [ours.encode(t) for t in texts] == [hf.encode(t, add_special_tokens=True) for t in texts]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    ids = ours.encode(STRESS[10])
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
