"""Shared command-line argument parsing, and the tools that use it failing cleanly."""

import argparse
import subprocess
import sys

import pytest

from chaid.errors import ChaidError
from chaid_lab.cli_args import add_sampler_args, int_list, sampler_args


def test_sampler_flags_are_checked_by_the_settings_rules():
    full, plain = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_sampler_args(full)
    add_sampler_args(plain, temporal_guidance=False)
    assert sampler_args(full.parse_args(["--eta", "1", "--eta-until", "600"])) == {
        "eta": 1.0, "eta_until": 600.0, "temporal_guidance": 0.0}
    assert sampler_args(plain.parse_args([])) == {"eta": None, "eta_until": None}
    for argv, message in [(["--eta", "1.5"], "sampler.eta must be in"),
                          (["--eta-until", "-1"], "sampler.eta_until must be in"),
                          (["--temporal-guidance", "nan"], "sampler.temporal_guidance")]:
        with pytest.raises(ChaidError, match=message):
            sampler_args(full.parse_args(argv))


def test_int_list_parses_and_bounds():
    assert int_list("--steps", "8, 30,", 1, 100) == [8, 30]
    assert int_list("--sizes", "", 1, 100, empty=True) == []
    for text, message in [("x", "comma-separated integers"), ("", "must be in"),
                          ("0,5", "must be in 1..100"), ("101", "must be in")]:
        with pytest.raises(ChaidError, match=message) as err:
            int_list("--steps", text, 1, 100)
        assert "--steps" in str(err.value)


@pytest.mark.parametrize("args, flag", [
    (["bench", "daemon", "--clients", "1,x"], "--clients"),
    (["bench", "cache", "--budgets", "10,-1", "--prompts", "p", "--json", "o"], "--budgets"),
    (["bench", "cache", "--sizes", "1,x", "--prompts", "p", "--json", "o"], "--sizes"),
    (["shapes", "eval", "--steps", "0"], "--steps"),
])
def test_tools_name_the_bad_list_flag(args, flag):
    done = subprocess.run([sys.executable, "-m", "chaid_lab", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and f"error: {flag}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
