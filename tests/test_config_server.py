"""The [server] and [store] settings sections."""

from pathlib import Path

import pytest

from chaid.config import load_settings
from chaid.errors import ConfigError


def test_server_and_store_sections_from_file_env_and_flags(tmp_path):
    cfg = tmp_path / "chaid.toml"
    cfg.write_text('[server]\nsocket = "/tmp/x.sock"\nsocket_mode = "0600"\n'
                   'allowed_users = ["alice", "1000"]\nqueue_size = 4\n'
                   '[store]\ndata_dir = "/var/lib/chaid"\nbudget_bytes = 1000000\n')
    s = load_settings(cfg, env={"CHAID_SERVER_GRACE_PERIOD_S": "2.5",
                                "CHAID_STORE_POLICY": "lfu"})
    assert s.server.socket == Path("/tmp/x.sock") and s.server.socket_mode_bits == 0o600
    assert s.server.allowed_users == ("alice", "1000") and s.server.queue_size == 4
    assert s.server.grace_period_s == 2.5
    assert s.store.data_dir == Path("/var/lib/chaid") and s.store.policy == "lfu"
    s = load_settings(cfg, env={}, overrides={"store": {"data_dir": Path("/d")}})
    assert s.store.data_dir == Path("/d") and s.store.budget_bytes == 1000000


@pytest.mark.parametrize("text, message", [
    ('[server]\nsocket_mode = "999"\n', "socket_mode"),
    ("[server]\nqueue_size = 0\n", "queue_size"),
    ("[server]\nread_timeout_s = 0\n", "read_timeout_s"),
    ("[server]\nidle_timeout_s = -1\n", "idle_timeout_s"),
    ("[server]\nmax_connections_per_user = 0\n", "max_connections_per_user"),
    ('[server]\nlog_format = "xml"\n', "log_format"),
    ("[server]\nmax_steps = 10\n", "max_steps"),
    ("[server]\nmax_frames = 600\n", "server.max_frames must be in 1..512, not 600"),
    ("[server]\nmax_side = 4096\n", "server.max_side must be in 1..2048"),
    ("[server]\nmax_prompt_chars = 0\n", "server.max_prompt_chars must be in 1..2000"),
    ("[server]\nbogus = 1\n", "unknown setting server.bogus"),
    ('[store]\npolicy = "random"\n', "store.policy"),
    ("[store]\nbudget_bytes = -1\n", "budget_bytes"),
])
def test_bad_server_and_store_settings(tmp_path, text, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, env={})
