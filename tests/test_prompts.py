import hashlib

import pytest

from safetext.errors import SafeTextError
from safetext.prompts import PromptSet, concatenate, read_prompts, remove_overlap, split_heldout

# The I2P layout: an unnamed first column, the prompt, comma-separated categories inside quotes, a named
# case_number, the evaluation seed and guidance.
I2P_CSV = (
    ",prompt,categories,hard,evaluation_seed,evaluation_guidance,case_number\n"
    '0,"a nude woman, oil painting","sexual, shocking",1,4261553411,7,100\n'
    "1,a bloody knife,violence,0,12,7.5,101\n"
    '2,"a nude woman, oil painting",sexual,1,5,7,102\n'
    "3,a man in a suit,harassment,0,6,7,103\n"
    "4,  a naked man on a beach  ,sexual,0,7,7,104\n"
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = write(tmp_path / "prompts.txt", "a cat\n\n  a dog  \na cat\n\n")
    prompts = read_prompts(path)
    assert prompts.prompts == ["a cat", "a dog"]
    assert [r["case_number"] for r in prompts.records] == [0, 2]
    assert prompts.source["duplicates_removed"] == 1
    assert prompts.source["rows_read"] == 5
    assert prompts.source["prompts"] == 2
    assert prompts.source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_i2p_csv_keeps_its_columns(tmp_path):
    prompts = read_prompts(write(tmp_path / "i2p.csv", I2P_CSV))
    assert prompts.prompts == [
        "a nude woman, oil painting",
        "a bloody knife",
        "a man in a suit",
        "a naked man on a beach",
    ]
    first, second = prompts.records[0], prompts.records[1]
    # the named case_number column wins over the unnamed index column
    assert first == {
        "case_number": 100,
        "evaluation_seed": 4261553411,
        "evaluation_guidance": 7,
        "categories": "sexual, shocking",
    }
    assert second["evaluation_guidance"] == 7.5 and second["case_number"] == 101
    assert prompts.source["duplicates_removed"] == 1
    assert prompts.source["rows_read"] == 5


def test_unnamed_first_column_is_the_case_number_without_a_named_one(tmp_path):
    text = ',prompt,categories\n7,"a cat",sexual\n9,a dog,violence\n'
    prompts = read_prompts(write(tmp_path / "p.csv", text))
    assert [r["case_number"] for r in prompts.records] == [7, 9]


def test_csv_with_only_a_prompt_column_numbers_rows(tmp_path):
    prompts = read_prompts(write(tmp_path / "p.csv", "prompt\na cat\na dog\n"))
    assert prompts.prompts == ["a cat", "a dog"]
    assert prompts.records == [{"case_number": 0}, {"case_number": 1}]


def test_category_filter_matches_whole_categories(tmp_path):
    path = write(tmp_path / "i2p.csv", I2P_CSV)
    sexual = read_prompts(path, category="sexual")
    assert sexual.prompts == ["a nude woman, oil painting", "a naked man on a beach"]
    assert sexual.source["category"] == "sexual"
    assert read_prompts(path, category="shocking").prompts == ["a nude woman, oil painting"]
    with pytest.raises(SafeTextError, match="no prompts in category 'sex'"):
        read_prompts(path, category="sex")


def test_category_filter_needs_a_categories_column(tmp_path):
    with pytest.raises(SafeTextError, match="categories"):
        read_prompts(write(tmp_path / "p.csv", "prompt\na cat\n"), category="sexual")
    with pytest.raises(SafeTextError, match="categories"):
        read_prompts(write(tmp_path / "p.txt", "a cat\n"), category="sexual")


def test_max_prompts_keeps_the_first_after_deduplication(tmp_path):
    path = write(tmp_path / "p.txt", "a\na\nb\nc\nd\n")
    prompts = read_prompts(path, max_prompts=3)
    assert prompts.prompts == ["a", "b", "c"]
    assert prompts.source["max_prompts"] == 3
    with pytest.raises(SafeTextError, match="max_prompts=0"):
        read_prompts(path, max_prompts=0)


def test_other_prompt_and_seed_columns(tmp_path):
    # the layouts of MMA-Diffusion (adv_prompt) and Unsafe Diffusion (seed, each prompt repeated with several seeds)
    path = write(tmp_path / "p.csv", "case_number,adv_prompt,seed,prompt\n0,a cat,11,x\n1,a dog,12,y\n2,a cat,13,z\n")
    prompts = read_prompts(path, prompt_column="adv_prompt", seed_column="seed")
    assert prompts.prompts == ["a cat", "a dog"]
    assert prompts.records == [{"case_number": 0, "evaluation_seed": 11}, {"case_number": 1, "evaluation_seed": 12}]
    assert read_prompts(path).prompts == ["x", "y", "z"]
    with pytest.raises(SafeTextError, match=r"no 'sensitive prompt' column \(columns found: 'case_number', "):
        read_prompts(path, prompt_column="sensitive prompt")


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("prompt\nun café\n".encode("utf-8-sig"))
    assert read_prompts(path).prompts == ["un café"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "no prompts"),
        ("blank.txt", b"\n  \n\n", "no prompts"),
        ("empty.csv", b"", r"no 'prompt' column \(columns found: none\)"),
        ("header_only.csv", b"prompt,categories\n", "no prompts"),
        (
            "no_prompt.csv",
            b"text,categories\na cat,sexual\n",
            r"no 'prompt' column \(columns found: 'text', 'categories'\)",
        ),
        ("latin1.txt", "un café\n".encode("latin-1"), "not UTF-8 text .*byte 0xe9 at offset 6"),
        ("binary.csv", b"prompt\n\xff\xfe\x00", "not UTF-8"),
        ("prompts.json", b'["a cat"]', "unsupported prompt file type '.json'"),
    ],
)
def test_bad_files_raise_safetext_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SafeTextError, match=message) as error:
        read_prompts(path)
    assert str(path) in str(error.value)


def test_missing_file_raises_safetext_error(tmp_path):
    with pytest.raises(SafeTextError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(SafeTextError, match="no such prompt file"):
        read_prompts(tmp_path)


def test_prompt_set_subset_and_records():
    prompts = PromptSet(["a", "b", "c"])
    assert prompts.records == [{"case_number": 0}, {"case_number": 1}, {"case_number": 2}]
    part = prompts.subset([2, 0])
    assert part.prompts == ["c", "a"] and part.records == [{"case_number": 2}, {"case_number": 0}]
    with pytest.raises(ValueError, match="2 prompts but 1 records"):
        PromptSet(["a", "b"], records=[{}])


PROMPTS = [f"prompt number {i}" for i in range(40)]


def test_split_heldout_is_deterministic_disjoint_and_respects_the_fraction():
    train, heldout = split_heldout(PromptSet(PROMPTS), 0.25, seed=3)
    assert len(heldout) == 10 and len(train) == 30
    assert set(train.prompts).isdisjoint(heldout.prompts)
    assert set(train.prompts) | set(heldout.prompts) == set(PROMPTS)
    # each side keeps the file's order
    assert train.prompts == [p for p in PROMPTS if p in set(train.prompts)]
    again_train, again_heldout = split_heldout(PromptSet(PROMPTS), 0.25, seed=3)
    assert again_train.prompts == train.prompts and again_heldout.prompts == heldout.prompts


def test_split_heldout_does_not_depend_on_prompt_order():
    _, heldout = split_heldout(PromptSet(PROMPTS), 0.25, seed=3)
    _, reversed_heldout = split_heldout(PromptSet(PROMPTS[::-1]), 0.25, seed=3)
    assert set(reversed_heldout.prompts) == set(heldout.prompts)


def test_split_heldout_depends_on_the_seed():
    _, a = split_heldout(PromptSet(PROMPTS), 0.25, seed=0)
    _, b = split_heldout(PromptSet(PROMPTS), 0.25, seed=1)
    assert set(a.prompts) != set(b.prompts)


def test_split_heldout_matches_an_independent_ranking():
    seed, fraction = 5, 0.2
    expected = sorted(PROMPTS, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())[:8]
    _, heldout = split_heldout(PromptSet(PROMPTS), fraction, seed)
    assert set(heldout.prompts) == set(expected)


def test_split_heldout_keeps_one_prompt_on_each_side():
    train, heldout = split_heldout(PromptSet(["a", "b"]), 0.01, seed=0)
    assert len(train) == 1 and len(heldout) == 1
    train, heldout = split_heldout(PromptSet(["a", "b", "c"]), 0.99, seed=0)
    assert len(train) == 1 and len(heldout) == 2
    train, heldout = split_heldout(PromptSet(PROMPTS), 0.0, seed=0)
    assert len(train) == 40 and len(heldout) == 0


def test_split_heldout_carries_records():
    records = [{"case_number": 1000 + i} for i in range(len(PROMPTS))]
    train, heldout = split_heldout(PromptSet(PROMPTS, records=records), 0.25, seed=3)
    for part in (train, heldout):
        assert [r["case_number"] - 1000 for r in part.records] == [PROMPTS.index(p) for p in part.prompts]


def test_remove_overlap_drops_unsafe_prompts_from_the_safe_set():
    safe = PromptSet(["a cat", "a nude woman", "a dog", "blood"])
    unsafe = PromptSet(["blood", "a nude woman", "a knife"])
    kept, removed = remove_overlap(safe, unsafe)
    assert kept.prompts == ["a cat", "a dog"]
    assert [r["case_number"] for r in kept.records] == [0, 2]
    assert removed == ["a nude woman", "blood"]
    kept, removed = remove_overlap(PromptSet(["a cat"]), unsafe)
    assert kept.prompts == ["a cat"] and removed == []


def test_concatenate_keeps_first_occurrences_in_order():
    joined = concatenate([PromptSet(["a", "b"], source={"path": "1"}), PromptSet(["b", "c"], source={"path": "2"})])
    assert joined.prompts == ["a", "b", "c"]
    assert joined.source == {"files": [{"path": "1"}, {"path": "2"}]}


def test_real_i2p_and_coco_files(prompts_dir):
    sexual = read_prompts(prompts_dir / "i2p.csv", category="sexual", max_prompts=50)
    assert len(sexual) == 50
    assert all("sexual" in [c.strip() for c in r["categories"].split(",")] for r in sexual.records)
    assert all({"case_number", "evaluation_seed", "evaluation_guidance"} <= set(r) for r in sexual.records)
    coco = read_prompts(prompts_dir / "coco_30k.csv", max_prompts=50)
    assert len(coco) == 50 and all(isinstance(r["evaluation_seed"], int) for r in coco.records)
