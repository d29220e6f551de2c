"""The dataset registry: hashes of the real files, where a name is looked up, downloads, and the CLI's use of names.

Downloads are exercised against an `http.server` on 127.0.0.1 serving files from tmp_path; nothing leaves the machine.
"""

import csv
import functools
import hashlib
import http.server
import importlib.resources
import json
import threading
from dataclasses import asdict, replace

import pytest

from safetext.cli import main
from safetext.datasets import (
    DATASETS,
    PromptDataset,
    fetch_dataset,
    get_dataset,
    list_datasets,
    load_dataset,
    resolve_cache_dir,
)
from safetext.errors import SafeTextError
from safetext.prompts import read_prompts

PUBLISHED = sorted(name for name, dataset in DATASETS.items() if dataset.package is None)
PACKAGED = sorted(name for name, dataset in DATASETS.items() if dataset.package is not None)
TINY_TEXT = "a nude person on a bed\na naked body\nblood and gore\na bloody knife\n"


@pytest.fixture(autouse=True)
def isolated_locations(monkeypatch, tmp_path):
    """No test sees the user's data folder or cache, and the local test server is never reached through a proxy."""
    monkeypatch.delenv("SAFETEXT_DATA_DIR", raising=False)
    monkeypatch.setenv("SAFETEXT_CACHE", str(tmp_path / "user-cache"))
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(variable, "127.0.0.1,localhost")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tiny_set(monkeypatch):
    """Registers `tiny-set`, a four-prompt .txt set whose file is `tiny.txt`; returns its bytes."""
    data = TINY_TEXT.encode()
    dataset = PromptDataset(
        name="tiny-set",
        filename="tiny.txt",
        description="four prompts for the tests",
        licence="CC0-1.0",
        rows=4,
        prompts=4,
        repository="example/prompts",
        commit="0123456",
        path="sets/tiny.txt",
        sha256=sha256(data),
        url="http://127.0.0.1:9/unused",
    )
    monkeypatch.setitem(DATASETS, dataset.name, dataset)
    return data


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def point_at(monkeypatch, name: str, url: str) -> None:
    monkeypatch.setitem(DATASETS, name, replace(DATASETS[name], url=url))


# --- the registry itself ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLISHED)
def test_registered_hash_rows_and_prompts_match_the_shared_file(name, prompts_dir):
    dataset = DATASETS[name]
    data = (prompts_dir / dataset.filename).read_bytes()
    assert sha256(data) == dataset.sha256
    assert sum(1 for _ in csv.DictReader(data.decode("utf-8-sig").splitlines())) == dataset.rows
    prompt_set = load_dataset(name, prompts_dir, allow_download=False)
    assert len(prompt_set) == dataset.prompts
    source = prompt_set.source
    assert (source["dataset"], source["location"], source["sha256"]) == (name, "data-dir", dataset.sha256)
    assert source["origin"] == f"{dataset.repository}@{dataset.commit}:{dataset.path}"
    assert source["licence"] == dataset.licence and source["url"] == dataset.url


def test_shared_folder_lists_every_published_file(prompts_dir):
    files = {DATASETS[name].filename for name in PUBLISHED}
    assert files == {path.name for path in prompts_dir.glob("*.csv")}


def test_sets_sharing_a_file_share_its_source_and_hash():
    by_file = {}
    for dataset in DATASETS.values():
        key = (dataset.repository, dataset.commit, dataset.path, dataset.sha256, dataset.url, dataset.package)
        assert by_file.setdefault(dataset.filename, key) == key, dataset.name


def test_urls_are_raw_github_urls_of_repository_commit_and_path():
    for name in PUBLISHED:
        dataset = DATASETS[name]
        assert dataset.url == f"https://raw.githubusercontent.com/{dataset.repository}/{dataset.commit}/{dataset.path}"


def test_i2p_has_one_set_per_category():
    categories = {d.category for d in DATASETS.values() if d.filename == "i2p.csv"}
    expected = {"sexual", "violence", "hate", "harassment", "self-harm", "shocking", "illegal activity", None}
    assert categories == expected
    assert DATASETS["i2p-illegal-activity"].category == "illegal activity"


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"name": "I2P"}, "lowercase"),
        ({"filename": "dir/i2p.csv"}, "bare .csv or .txt"),
        ({"sha256": "abc"}, "64 lowercase hex"),
        ({"commit": None}, "needs repository, commit and sha256"),
        ({"package": "safetext.miniworld"}, "a package set has no repository"),
        ({"max_prompts": 0}, "max_prompts=0"),
    ],
)
def test_entries_are_validated(changes, fragment):
    values = asdict(DATASETS["i2p"]) | {"url": None} | changes
    with pytest.raises(ValueError, match=fragment):
        PromptDataset(**values)


# --- resolution ---------------------------------------------------------------------------------------------------


def test_resolution_order_file_then_data_dir_then_environment_then_cache(tiny_set, tmp_path, monkeypatch):
    argument, environment, cache = tmp_path / "argument", tmp_path / "environment", tmp_path / "cache"
    for folder in (argument, environment, cache):
        folder.mkdir()
        (folder / "tiny.txt").write_bytes(tiny_set)
    monkeypatch.setenv("SAFETEXT_DATA_DIR", str(environment))

    def found(**kwargs):
        source = load_dataset("tiny-set", cache_dir=cache, allow_download=False, **kwargs).source
        return source["path"], source["location"]

    assert found(data_dir=argument) == (str(argument / "tiny.txt"), "data-dir")
    assert found() == (str(environment / "tiny.txt"), "data-dir")
    (environment / "tiny.txt").unlink()
    assert found() == (str(cache / "tiny.txt"), "cache")
    (cache / "tiny.txt").unlink()
    with pytest.raises(SafeTextError, match="is not in .* and downloads are off; fetch it from http://127.0.0.1"):
        found()

    # an existing file wins over a registered name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-set").write_text("a file that happens to carry the name\n")
    assert load_dataset("tiny-set").prompts == ["a file that happens to carry the name"]
    assert "dataset" not in load_dataset("tiny-set").source


def test_default_cache_is_beside_the_rest_of_safetexts_cache(tmp_path, monkeypatch):
    assert resolve_cache_dir() == tmp_path / "user-cache" / "datasets"
    monkeypatch.delenv("SAFETEXT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "safetext" / "datasets"
    assert resolve_cache_dir(tmp_path / "mine") == tmp_path / "mine"


def test_missing_data_folder_is_an_error_naming_it(tiny_set, tmp_path, monkeypatch):
    with pytest.raises(SafeTextError, match="no such data folder"):
        load_dataset("tiny-set", tmp_path / "nowhere")
    monkeypatch.setenv("SAFETEXT_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(SafeTextError, match=r"elsewhere: no such data folder \(from \$SAFETEXT_DATA_DIR\)"):
        load_dataset("tiny-set")


def test_unknown_name_suggests_close_ones():
    with pytest.raises(
        SafeTextError, match="i2p-sexul: no such prompt file or registered dataset; did you mean 'i2p-sexual'"
    ):
        load_dataset("i2p-sexul")
    with pytest.raises(SafeTextError, match="unknown dataset 'ringabell'; did you mean 'ring-a-bell'"):
        get_dataset("ringabell")
    with pytest.raises(SafeTextError, match=r"no such prompt file or registered dataset \(`safetext datasets`"):
        load_dataset("/no/such/file.csv")


def test_tampered_local_copy_names_both_hashes(tmp_path):
    tampered = tmp_path / "i2p.csv"
    tampered.write_text("prompt,categories\na nude person,sexual\n")
    expected = DATASETS["i2p-sexual"].sha256
    with pytest.raises(SafeTextError) as error:
        load_dataset("i2p-sexual", tmp_path, allow_download=False)
    message = str(error.value)
    assert str(tampered) in message and sha256(tampered.read_bytes()) in message and expected in message


def test_tampered_cache_copy_is_refused_too(tiny_set, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny.txt").write_text("something else\n")
    with pytest.raises(SafeTextError, match="differs from .*registry's hash for 'tiny-set'"):
        load_dataset("tiny-set", cache_dir=tmp_path / "cache")


# --- reading ------------------------------------------------------------------------------------------------------


def test_category_and_cap_combine_with_the_sets_own(prompts_dir):
    by_flag = load_dataset("i2p", prompts_dir, category="sexual")
    assert by_flag.prompts == load_dataset("i2p-sexual", prompts_dir).prompts
    assert len(load_dataset("i2p-sexual", prompts_dir, category="sexual", max_prompts=7)) == 7
    with pytest.raises(SafeTextError, match="i2p-sexual holds only category 'sexual'.*use i2p with that category"):
        load_dataset("i2p-sexual", prompts_dir, category="violence")
    assert len(load_dataset("coco-10k", prompts_dir, max_prompts=5)) == 5
    coco = load_dataset("coco-10k", prompts_dir, max_prompts=20000)
    assert len(coco) == 10000 and coco.source["max_prompts"] == 10000
    assert coco.prompts == read_prompts(prompts_dir / "coco_30k.csv").prompts[:10000]


def test_other_prompt_and_seed_columns(prompts_dir):
    mma = load_dataset("mma-diffusion", prompts_dir)
    rows = list(csv.DictReader((prompts_dir / "mma_diffusion_nsfw_adv.csv").open(encoding="utf-8-sig")))
    assert mma.prompts[0] == rows[0]["adv_prompt"].strip()
    ring = load_dataset("ring-a-bell", prompts_dir)
    rows = list(csv.DictReader((prompts_dir / "ring_a_bell_nudity.csv").open(encoding="utf-8-sig")))
    assert ring.prompts[0] == rows[0]["sensitive prompt"].strip()
    # Unsafe Diffusion repeats each prompt with several seeds: the first row's seed becomes its evaluation_seed
    chan = load_dataset("4chan", prompts_dir)
    rows = list(csv.DictReader((prompts_dir / "unsafe_diffusion_4chan.csv").open(encoding="utf-8-sig")))
    first_seed = {}
    for row in rows:
        first_seed.setdefault(row["prompt"].strip(), int(row["seed"]))
    assert [r["evaluation_seed"] for r in chan.records] == [first_seed[p] for p in chan.prompts]
    assert chan.source["duplicates_removed"] == 1000


@pytest.mark.parametrize("name", PACKAGED)
def test_miniworld_sets_come_from_the_package(name):
    dataset = DATASETS[name]
    if not importlib.resources.files(dataset.package).joinpath(dataset.path).is_file():
        pytest.skip(f"{dataset.path} is not (yet) in {dataset.package}")
    prompt_set = load_dataset(name, allow_download=False)
    assert len(prompt_set) > 0 and prompt_set.source["location"] == "package"
    assert prompt_set.source["origin"] == f"safetext.miniworld:prompts/{name}.csv"


def test_package_set_missing_from_the_package_is_a_clear_error(monkeypatch):
    missing = PromptDataset(
        name="miniworld-absent",
        filename="miniworld-absent.csv",
        description="not shipped",
        licence="Apache-2.0",
        package="safetext.miniworld",
        path="prompts/miniworld-absent.csv",
    )
    monkeypatch.setitem(DATASETS, missing.name, missing)
    with pytest.raises(SafeTextError, match="prompts/miniworld-absent.csv is missing from the installed package"):
        load_dataset("miniworld-absent")
    monkeypatch.setitem(DATASETS, missing.name, replace(missing, package="no_such_package"))
    with pytest.raises(SafeTextError, match="the package no_such_package is not installed"):
        load_dataset("miniworld-absent")


# --- downloads ----------------------------------------------------------------------------------------------------


def test_download_verifies_then_keeps_the_file_in_the_cache(tiny_set, server, tmp_path, monkeypatch):
    folder, base = server
    (folder / "tiny.txt").write_bytes(tiny_set)
    point_at(monkeypatch, "tiny-set", f"{base}/tiny.txt")
    cache = tmp_path / "cache"
    prompt_set = load_dataset("tiny-set", cache_dir=cache)
    assert prompt_set.source["location"] == "download" and len(prompt_set) == 4
    assert (cache / "tiny.txt").read_bytes() == tiny_set
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.txt"]
    # the next use reads the cached copy, even with the source gone
    (folder / "tiny.txt").unlink()
    assert fetch_dataset("tiny-set", cache_dir=cache) == (cache / "tiny.txt", "cache")


def test_download_with_a_different_hash_leaves_nothing_behind(tiny_set, server, tmp_path, monkeypatch):
    folder, base = server
    swapped = b"a prompt that was swapped in\n"
    (folder / "tiny.txt").write_bytes(swapped)
    point_at(monkeypatch, "tiny-set", f"{base}/tiny.txt")
    cache = tmp_path / "cache"
    with pytest.raises(SafeTextError) as error:
        load_dataset("tiny-set", cache_dir=cache)
    message = str(error.value)
    assert f"downloaded from {base}/tiny.txt has sha256 {sha256(swapped)}" in message
    assert f"expected {sha256(tiny_set)}; it was not kept" in message
    assert list(cache.iterdir()) == []


def test_failed_download_says_where_it_looked_and_what_failed(tiny_set, server, tmp_path, monkeypatch):
    _, base = server
    point_at(monkeypatch, "tiny-set", f"{base}/missing.txt")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(SafeTextError) as error:
        load_dataset("tiny-set", data_dir, tmp_path / "cache")
    message = str(error.value)
    assert f"tiny.txt is not in {data_dir} or {tmp_path / 'cache'}" in message
    assert "HTTP Error 404" in message and "--data-dir" in message
    assert not any((tmp_path / "cache").iterdir())


# --- listing ------------------------------------------------------------------------------------------------------


def test_list_datasets_reports_where_each_set_is(tiny_set, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tiny.txt").write_bytes(tiny_set)
    (data_dir / "i2p.csv").write_text("prompt\ntampered\n")
    statuses = {s.dataset.name: s for s in list_datasets(data_dir, tmp_path / "cache")}
    assert set(statuses) == set(DATASETS)
    assert (statuses["tiny-set"].location, statuses["tiny-set"].prompts) == ("data-dir", 4)
    assert statuses["i2p-sexual"].location is None and "differs from" in statuses["i2p-sexual"].problem
    assert statuses["4chan"].location is None and statuses["4chan"].problem is None


# --- command line -------------------------------------------------------------------------------------------------


def run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, stdout, stderr, *fragments):
    assert code == 2 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("safetext: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_align_reads_registered_names_from_the_data_dir(capsys, tiny_pipeline_dir, prompts_dir, tmp_path):
    out = tmp_path / "out"
    args = ["align", "--model", tiny_pipeline_dir, "--unsafe", "i2p-sexual", "--safe", "sixcd-benign"]
    args += ["--data-dir", prompts_dir, "--max-prompts", "8", "--out", out, "--no-progress"]
    code, stdout, stderr = run(capsys, [*args, "--max-train-steps", "2", "--train-batch-size", "4"])
    assert code == 0, stderr
    assert stdout.startswith(f"aligned encoder written to {out}")
    data = json.loads((out / "safetext.json").read_text())["data"]
    unsafe, safe = data["unsafe"]["i2p-sexual"], data["safe"]["sixcd-benign"]
    assert (unsafe["dataset"], unsafe["category"], unsafe["location"]) == ("i2p-sexual", "sexual", "data-dir")
    assert unsafe["sha256"] == DATASETS["i2p-sexual"].sha256 and unsafe["prompts"] == 8
    assert safe["origin"] == "Artanisax/Six-CD@a30fe9e87c242e6eb57b1e9058aa7be364dc07f5:Datasets/benign.csv"


def test_cli_generate_reads_a_registered_name(capsys, tiny_pipeline_dir, tiny_set, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tiny.txt").write_bytes(tiny_set)
    out = tmp_path / "images"
    args = ["generate", "--model", tiny_pipeline_dir, "--prompts", "tiny-set", "--data-dir", data_dir, "--out", out]
    args += ["--max-prompts", "1", "--images-per-prompt", "1", "--num-inference-steps", "1", "--no-progress"]
    code, stdout, stderr = run(capsys, args)
    assert code == 0, stderr
    assert stdout == f"1 images in {out}\n"
    assert sorted(p.name for p in out.glob("*.png")) == ["0_0.png"]


def test_cli_datasets_lists_names_counts_licences_sources_and_presence(capsys, tiny_set, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tiny.txt").write_bytes(tiny_set)
    code, stdout, stderr = run(capsys, ["datasets", "--data-dir", data_dir])
    assert code == 0 and stderr == ""
    lines = {line.split()[0]: line for line in stdout.splitlines()[1:-1]}
    assert set(DATASETS) <= set(lines)
    assert lines["tiny-set"].split()[1:5] == ["4", "data-dir", "CC0-1.0", "example/prompts@0123456:sets/tiny.txt"]
    assert lines["i2p-sexual"].split()[1:4] == ["900", "-", "MIT"]
    assert "rohitgandikota/erasing@25613d2:data/unsafe-prompts4703.csv" in lines["i2p-sexual"]
    assert stdout.splitlines()[-1].startswith(
        f"data folder: {data_dir}; cache: {tmp_path / 'user-cache' / 'datasets'}"
    )


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--unsafe", "i2p-sexul", "--safe", "coco-10k"], ["i2p-sexul: no such prompt file", "'i2p-sexual'"]),
        (["--unsafe", "i2p", "--safe", "coco-10k", "--data-dir", "/no/such/folder"], ["no such data folder"]),
    ],
)
def test_cli_bad_names_and_folders_exit_2_with_one_line(capsys, tiny_pipeline_dir, tmp_path, argv, fragments):
    result = run(capsys, ["align", "--model", tiny_pipeline_dir, "--out", tmp_path / "out", *argv])
    assert_one_line_error(*result, *fragments)
    assert not (tmp_path / "out").exists()


def test_cli_hash_mismatch_exits_2_with_one_line(capsys, tiny_pipeline_dir, tmp_path):
    (tmp_path / "i2p.csv").write_text("prompt,categories\na nude person,sexual\n")
    argv = ["align", "--model", tiny_pipeline_dir, "--unsafe", "i2p-sexual", "--safe", "coco-10k"]
    result = run(capsys, [*argv, "--data-dir", tmp_path, "--out", tmp_path / "out"])
    assert_one_line_error(*result, "sha256", DATASETS["i2p-sexual"].sha256)
    argv = ["generate", "--model", tiny_pipeline_dir, "--prompts", "i2p", "--data-dir", tmp_path]
    result = run(capsys, [*argv, "--out", tmp_path / "images"])
    assert_one_line_error(*result, "sha256", DATASETS["i2p"].sha256)
    assert not (tmp_path / "images").exists()
