"""The forty-fifth new-user walk: a fresh machine, README.md and docs/ alone. A user points locod at GGUF
files of their own, one under another name and directory, one a text file named .gguf, one cut short: each
refusal must name the file, the problem and what to do about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .conftest import start_daemon


def own_models(tmp_path: Path, model_path: Path) -> dict[str, Path]:
    """The embedded GGUF copied under another name, a text file named .gguf, and copies cut short within the
    header and within the weights, as a stopped `cp` or download leaves them."""
    mine = tmp_path / "mine"
    mine.mkdir()
    whole = model_path.read_bytes()
    files = {"tiny": whole, "notes": b"my shopping list\n", "header": whole[:100], "half": whole[: len(whole) // 2]}
    for name, data in files.items():
        (mine / f"{name}.gguf").write_bytes(data)
    return {name: mine / f"{name}.gguf" for name in files}


def test_a_gguf_cut_within_its_header_is_called_cut_short_and_says_to_copy_it_again(
    tmp_path: Path, models_dir: Path, model_path: Path
) -> None:
    """A copy stopped in its first bytes was "the GGUF header is damaged (EOFError: header ends after 100
    bytes)": a Python exception's name, no remedy, and `models list` said `damaged GGUF`, while a copy stopped
    later was "cut short ...; copy or download it again"."""
    cut = own_models(tmp_path, model_path)["header"]
    config = {"local": {"default": "header", "models": [{"name": "header", "path": str(cut)}]}}
    handle = start_daemon(tmp_path / "d", models_dir, config, wait=False)
    assert handle.proc.wait(120) == 3
    said = f"model 'header': {cut} is cut short: 100 bytes, ending within its GGUF header, as a copy or download"
    assert said in handle.log() and "copy or download it again" in handle.log(), handle.log()
    assert "EOFError" not in handle.log() and "Traceback" not in handle.log()
    listed = handle.cli("models", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("header "))
    assert " cut short " in row and "damaged" not in row, listed.stdout


def test_own_gguf_files_another_path_works_and_bad_ones_say_what_to_do(
    tmp_path: Path, models_dir: Path, model_path: Path, daemon_factory: Any
) -> None:
    """The embedded model copied elsewhere answers under its own name; a text file named .gguf said only "is not
    a GGUF file" (and `locod reload`'s note "...; it is left out of routing until then", until what?), and
    `locod status` said it learned "from the task priors (no prior for its GGUF)", of a file that is no GGUF."""
    files = own_models(tmp_path, model_path)
    config = {"local": {"models": [{"name": name, "path": str(path)} for name, path in files.items()]}}
    handle = daemon_factory(config)
    answered = handle.cli("ask", "--model", "tiny", "--max-tokens", "4", "Hi")
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr
    refused = handle.cli("ask", "--model", "notes", "Hi")
    assert refused.returncode == 3, refused.stderr
    assert f"{files['notes']} is not a GGUF file; point its path at a GGUF model, or download one" in refused.stderr
    reloaded = handle.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert (
        "is not a GGUF file; point its path at a GGUF model, or download one with `locod models pull`; it is left"
        in (reloaded.stderr)
    )
    for name in ("header", "half"):
        assert f"{files[name]} is cut short" in reloaded.stderr and "EOFError" not in reloaded.stderr
    shown = handle.cli("status")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()}
    assert "left out, no usable file (`locod models list`): notes, header, half" in rows["local"], shown.stdout
    assert "tiny" in rows["learning"] and "notes" not in rows["learning"] and "no prior for" not in rows["learning"]
