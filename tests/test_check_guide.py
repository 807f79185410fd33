"""benchmarks/check_guide.py: every hunk of the upstream-script guide (docs/diffusers-scripts.md)
applies to the cut-down copies the project keeps (and reverses out of them), a hunk whose context
drifted is reported by name with a non-zero exit, and the line counts the docs claim are the
guide's."""

import re
from pathlib import Path

import pytest

from benchmarks import check_guide

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def snippets():
    return check_guide.parse_guide(check_guide.GUIDE.read_text())


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
    out = capsys.readouterr().out
    assert out.count("OK ") == 6
    for snippet in snippets:
        assert f"{snippet.upstream}: {len(snippet.hunks)}/{len(snippet.hunks)} hunks apply (+{snippet.added} lines, " \
               f"{snippet.replaced} replaced)" in out
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


def test_every_snippet_acts_on_divergence_before_the_save(snippets):
    """After the loops: exit non-zero on a NaN/inf loss, before the script's own save (the last hunk)."""
    for snippet in snippets:
        added = [text.strip() for hunk in snippet.hunks for op, text in hunk.lines if op == "+"]
        check = added.index("if stopper.diverged:  # DVAR: a NaN/inf loss is a failure: exit non-zero, save nothing")
        assert added[check + 1] == "raise SystemExit(stopper.status_line())"
        assert added.index("stopper.save_history(args.output_dir)  # DVAR: dvar_history.csv/.png, dvar_summary.json") > check


def test_the_line_counts_the_docs_claim_are_the_guides(snippets):
    """README: "adds A-B lines ... and changes C"; the guide's table: one row per script with its counts."""
    added = [s.added for s in snippets]
    replaced = {s.replaced for s in snippets}
    readme = (REPO / "README.md").read_text()
    claim = re.search(r"adds\s+(\d+)-(\d+)\s+lines\s+to\s+each\s+script\s+and\s+changes\s+(\w+)", readme)
    assert claim, "README.md no longer states the guide's line counts"
    assert (int(claim[1]), int(claim[2])) == (min(added), max(added))
    assert replaced == {1} and claim[3] == "one"
    guide = check_guide.GUIDE.read_text()
    for snippet in snippets:
        row = f"| `{Path(snippet.upstream).name}` | {snippet.added} | {snippet.replaced} |"
        assert row in guide, f"the guide's table lacks {row!r}"
