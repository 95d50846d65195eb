from pathlib import Path

import pytest

from chaid.config import load_settings
from chaid.errors import ConfigError


def test_defaults():
    s = load_settings(env={})
    assert (s.model.name, s.model.device, s.model.weights) == ("tiny-shapes", "auto", None)
    assert (s.sampler.steps, s.sampler.cfg_scale) == (30, None)  # None: the model's


def test_file_then_environment_then_flags(tmp_path):
    cfg = tmp_path / "chaid.toml"
    cfg.write_text(
        '[model]\nname = "opensora-1.2"\ndevice = "cpu"\n[sampler]\nsteps = 20\ncfg_scale = 4.5\n'
    )
    s = load_settings(cfg, env={})
    assert (s.model.name, s.sampler.steps, s.sampler.cfg_scale) == ("opensora-1.2", 20, 4.5)
    env = {"CHAID_SAMPLER_STEPS": "12", "CHAID_MODEL_WEIGHTS": "~/w", "OTHER": "1"}
    s = load_settings(cfg, env=env)
    assert s.sampler.steps == 12 and s.model.weights == Path("~/w").expanduser()
    s = load_settings(cfg, env=env, overrides={"sampler": {"steps": 8, "cfg_scale": None}})
    assert s.sampler.steps == 8 and s.sampler.cfg_scale == 4.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\nnmae = 'x'\n", "unknown setting model.nmae"),
        ("[modle]\n", "unknown settings section"),
        ("[sampler]\nsteps = 'many'\n", "sampler.steps .* must be int"),
        ("[sampler]\nsteps = 2.5\n", "sampler.steps"),
        ("[sampler]\nsteps = 0\n", "sampler.steps must be in"),
        ("[model]\ndevice = 'tpu'\n", "model.device"),
        ("[model]\ndtype = 'int8'\n", "model.dtype"),
        ("[model]\ntext_dtype = 'int4'\n", "model.text_dtype"),
        ("[model]\ntext_after_encode = 'drop'\n", "model.text_after_encode"),
        ("[chai]\ncache_attention = 'sometimes'\n", "chai.cache_attention"),
        ("[chai]\nblend = 3.0\n", "chai.blend"),
        ("model = 3\n", "must be a table"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, env={})


def test_bad_environment_value_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="environment"):
        load_settings(env={"CHAID_SAMPLER_CFG_SCALE": "lots"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.toml", env={})


def test_text_encoder_settings_from_the_environment():
    s = load_settings(env={"CHAID_MODEL_TEXT_DTYPE": "bfloat16",
                           "CHAID_MODEL_TEXT_AFTER_ENCODE": "offload"})
    assert (s.model.text_dtype, s.model.text_after_encode) == ("bfloat16", "offload")
    assert load_settings(env={}).model.text_after_encode == "keep"
