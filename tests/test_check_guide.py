"""benchmarks/check_guide.py: every hunk of the upstream-script guide applies to the cut-down
copies the project keeps (and reverses out of them), and a hunk whose context drifted is
reported by name with a non-zero exit."""

import re
from pathlib import Path

import pytest

from benchmarks import check_guide

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def snippets():
    return check_guide.parse_guide(check_guide.README.read_text())


def test_the_guide_covers_six_scripts(snippets):
    assert [Path(s.upstream).name for s in snippets] == [
        "textual_inversion.py", "train_dreambooth.py", "train_dreambooth_lora.py", "train_custom_diffusion.py",
        "train_dreambooth_lora_sdxl.py", "train_dreambooth_lora_flux.py",
    ]
    assert all(len(s.hunks) == 6 or len(s.hunks) == 7 for s in snippets)


@pytest.mark.parametrize("index", range(6))
def test_every_hunk_reverses_out_of_the_kept_copy_and_applies_back(snippets, index):
    snippet = snippets[index]
    patched = (REPO / snippet.local).read_text().splitlines()
    unpatched, failures = check_guide.apply(patched, snippet.hunks, reverse=True)
    assert failures == []
    assert not [line for line in unpatched if re.search(r"\s# DVAR(:.*)?$", line)]  # every DVAR line is in a hunk
    again, failures = check_guide.apply(unpatched, snippet.hunks)
    assert failures == [] and again == patched


def fake_checkout(root, snippets):
    """A diffusers-shaped tree of the unpatched copies (what upstream looks like, around the hunks)."""
    for snippet in snippets:
        unpatched, _ = check_guide.apply((REPO / snippet.local).read_text().splitlines(), snippet.hunks, reverse=True)
        path = root / snippet.upstream
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(unpatched) + "\n")


def test_cli_passes_on_a_matching_checkout_and_writes_the_patched_scripts(snippets, tmp_path, capsys):
    fake_checkout(tmp_path / "diffusers", snippets)
    assert check_guide.main([str(tmp_path / "diffusers"), "--write", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("OK ") == 6
    for snippet in snippets:
        written = (tmp_path / "out" / snippet.upstream).read_text()
        assert written == (REPO / snippet.local).read_text().rstrip("\n") + "\n"


def test_cli_names_the_hunk_whose_context_drifted(snippets, tmp_path, capsys):
    fake_checkout(tmp_path, snippets)
    script = tmp_path / "examples" / "dreambooth" / "train_dreambooth_lora.py"
    text = script.read_text()
    drifted = "    # Save the lora layers\n"
    assert text.count(drifted) == 1
    script.write_text(text.replace(drifted, "    # Save the LoRA layers\n"))
    assert check_guide.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "examples/dreambooth/train_dreambooth_lora.py: hunk 6 '@@ the end of the epoch loop" in err
    assert "'    # Save the LoRA layers' where the guide has '    # Save the lora layers'" in err
    assert err.count("error:") == 1


@pytest.mark.parametrize("argv, message", [([], "give a diffusers checkout"), (["/"], "has no examples/ folder")])
def test_cli_refuses_a_folder_that_is_not_a_checkout(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_guide.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
