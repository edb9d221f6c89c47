"""Review 41: the session's changes checked where they meet: the command line's new usage errors (a flag
before an unknown command, a valued option before an action)."""

from __future__ import annotations

import json

import pytest

from locod import cli


@pytest.mark.parametrize("flag", ["--json", "-v"])
def test_a_flag_without_a_value_before_an_unknown_command_names_the_command(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found: `locod --json frobnicate` said "--json goes after the command: `locod ask --json` or ..." (the
    check for a valued option given before its command took any flag): the user moved --json and was then
    told 'frobnicate' is no command. A flag without a value takes no word, so the unknown command is said."""
    assert cli.main([flag, "frobnicate"]) == 2
    out, err = capsys.readouterr()
    assert "invalid choice: 'frobnicate'" in err and "goes after" not in err, err
    if flag == "--json":  # a --json command line still gets its error object
        assert json.loads(out)["code"] == "usage"


def test_a_valued_option_before_its_action_is_told_where_it_goes(capsys: pytest.CaptureFixture[str]) -> None:
    """Found: `locod models --dir ~/m fetch` was "invalid choice: '~/m'" and the list of models' actions, as
    `locod --limit 5 decisions` was at locod's own level before 6edf628: the option is told where it goes at
    every level."""
    assert cli.main(["models", "--dir", "/tmp/m", "fetch"]) == 2
    err = capsys.readouterr().err
    assert "locod models: error: --dir goes after the command: `locod models fetch --dir`" in err, err


def test_a_typo_of_an_action_after_the_command_is_still_named(capsys: pytest.CaptureFixture[str]) -> None:
    """Held: an action with no near miss right after its command (`locod models xyz`) is argparse's invalid
    choice, not taken for an option's value; a near miss is named."""
    assert cli.main(["models", "xyz"]) == 2
    assert "invalid choice: 'xyz'" in capsys.readouterr().err
    assert cli.main(["models", "lst"]) == 2
    assert "did you mean `locod models list`?" in capsys.readouterr().err
