"""``metagrad data omniglot``: fetch from a (file://) URL, check checksums and decode; any problem
is one line and exit status 2."""

import shutil
from pathlib import Path

import pytest

from metagrad.cli import main
from metagrad.errors import DataError
from metagrad.tasks import omniglot

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
needs_data = pytest.mark.skipif(
    not all((SHARED / name).is_file() for name in omniglot.ZIPS),
    reason=f"the Omniglot zips are not in {SHARED}")


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A folder served as a file:// URL holding links to the shared zips (and their published
    SHA256SUMS: they are re-encodings, see SOURCE.md there); an empty cache folder."""
    source = tmp_path / "mirror"
    source.mkdir()
    for name in (*omniglot.ZIPS, omniglot.SUMS_FILE):
        if (SHARED / name).is_file():
            (source / name).symlink_to(SHARED / name)
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METAGRAD_DATA", raising=False)
    return source


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@needs_data
def test_download_from_a_file_url_checks_and_decodes(mirror, tmp_path, capsys):
    root = tmp_path / "data"
    code, out, err = run(["data", "omniglot", "--root", str(root), "--download",
                          mirror.as_uri()], capsys)
    assert code == 0, err
    assert "1623 classes" in out and "32460 images" in out
    assert f"decoded cache: {tmp_path / 'cache'}" in out
    assert all((root / name).is_file() and not (root / name).is_symlink()
               for name in omniglot.ZIPS)
    assert not [p for p in root.iterdir() if p.suffix == ".part"]
    # checking again (no download) finds the files, the checksums and the decoded cache
    code, again, err = run(["data", "omniglot", "--root", str(root)], capsys)
    assert code == 0, err
    assert again == out


@needs_data
def test_corrupted_zip_is_refused(mirror, tmp_path, capsys):
    (mirror / "images_evaluation.zip").unlink()
    damaged = bytearray((SHARED / "images_evaluation.zip").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (mirror / "images_evaluation.zip").write_bytes(bytes(damaged))
    root = tmp_path / "data"
    code, _, err = run(["data", "omniglot", "--root", str(root), "--download",
                        mirror.as_uri()], capsys)
    assert code == 2
    assert "images_evaluation.zip has md5" in err and "not the official" in err
    assert len(err.strip().splitlines()) == 1
    assert not (root / "images_evaluation.zip").exists()  # nothing half-checked is kept
    # the same damage in a folder checked without downloading
    shutil.copy(mirror / "images_evaluation.zip", root / "images_evaluation.zip")
    code, _, err = run(["data", "omniglot", "--root", str(root)], capsys)
    assert code == 2 and "damaged or not the official archive" in err


def test_problems_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    code, _, err = run(["data", "omniglot", "--root", str(tmp_path / "none")], capsys)
    assert code == 2 and "Omniglot not found" in err
    assert "metagrad data omniglot --root DIR --download" in err  # the fix, as a command
    code, _, err = run(["data", "omniglot", "--root", str(tmp_path / "r"), "--download",
                        (tmp_path / "empty").as_uri()], capsys)
    assert code == 2 and "could not download file://" in err
    code, _, err = run(["data", "omniglot", "--root", str(tmp_path / "r"), "--download",
                        "not a url"], capsys)
    assert code == 2 and "could not download" in err
    code, _, err = run(["data", "cifar"], capsys)
    assert code == 2 and "invalid choice" in err


def test_official_md5_is_accepted_without_published_sums():
    md5 = omniglot.OFFICIAL_MD5["images_background.zip"]
    assert omniglot.checksum_problem("images_background.zip", md5, "x" * 64, {}) == ""
    problem = omniglot.checksum_problem("images_background.zip", "0" * 32, "a" * 64,
                                        {"images_background.zip": "b" * 64})
    assert "not the official" in problem and "SHA256SUMS lists" in problem
    with pytest.raises(DataError, match="is missing"):
        omniglot.check_omniglot(Path("/no/such/folder"))
