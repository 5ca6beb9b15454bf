"""The daemon's configuration: shipped files, errors that name the key, environment and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import PROFILES, ConfigError, DaemonConfig, FileStream, RemoteStream, RtspStream, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


REPO = Path(__file__).resolve().parents[2]


def test_profiles_ship_in_the_package_and_config_links_to_them() -> None:
    for name in ("default.toml", "demo.toml"):
        assert (PROFILES / name).is_file()
        assert (REPO / "config" / name).resolve() == (PROFILES / name).resolve()
    stages = REPO / "ltu_as" / "training" / "stages"
    assert sorted(p.name for p in (REPO / "config" / "train").iterdir()) == [
        "finetune.toml",
        "stage1.toml",
        "stage2.toml",
        "stage3.toml",
    ]
    assert (REPO / "config" / "train").resolve() == stages.resolve()


def test_default_toml_documents_exactly_the_defaults() -> None:
    assert load_config(PROFILES / "default.toml", environ={}) == DaemonConfig()
    text = (PROFILES / "default.toml").read_text()
    for section, model in DaemonConfig.model_fields.items():
        if section == "streams":
            continue
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert f"{key} =" in text, f"config/default.toml does not document {section}.{key}"


def test_demo_profile_resolves_paths_next_to_the_file() -> None:
    cfg = load_config(PROFILES / "demo.toml", environ={})
    assert cfg.demo.enabled
    demo = cfg.stream("demo")
    assert isinstance(demo, FileStream) and demo.path.is_file() and demo.loop
    assert demo.path.resolve() == (PROFILES.parent / "assets" / "demo_speech.ogg").resolve()  # inside the package
    assert cfg.demo.models_dir.name == "demo" and "ltu-daemon" in cfg.demo.models_dir.parts  # a user cache
    assert isinstance(cfg.stream("satellite"), RemoteStream)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[vad]\nagressiveness = 3\n", "vad.agressiveness: unknown key"),
        ('[vad]\nmin_speech_ms = "x"\n', "vad.min_speech_ms: Input should be a valid integer, got 'x'"),
        ("[vad]\naggressiveness = 7\n", "vad.aggressiveness: Input should be less than or equal to 3"),
        ("[servr]\nport = 1\n", "servr: unknown key"),
        ('[[streams]]\nname = "a"\nsource = "file"\npth = "x.wav"\n', "streams[0].pth: unknown key"),
        ('[[streams]]\nname = "a"\nsource = "tape"\n', "streams[0]: Input tag 'tape'"),
        ('[[streams]]\nname = "Bad Name"\nsource = "remote"\n', "streams[0].name: Value error"),
        (
            '[[streams]]\nname = "a"\nsource = "remote"\n[[streams]]\nname = "a"\nsource = "remote"\n',
            "duplicate names ['a']",
        ),
        ('[server]\nhost = "0.0.0.0"\n', "server.host '0.0.0.0' is not loopback: set server.token"),
        ("[vad\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), environ={})
    assert message in str(e.value)


def test_token_allows_binding_beyond_loopback(tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text("s3cret\n")
    cfg = load_config(write(tmp_path, '[server]\nhost = "0.0.0.0"\ntoken_file = "token.txt"\n'), environ={})
    assert cfg.server.resolved_token() == "s3cret"
    assert "s3cret" not in repr(load_config(None, overrides=['server.token="abc"'], environ={}))


def test_environment_and_set_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 1000\n[[streams]]\nname = "a"\nsource = "file"\npath = "x.wav"\n')
    cfg = load_config(
        path,
        environ={
            "LTU_DAEMON__SERVER__PORT": "2000",
            "LTU_DAEMON__VAD__AGGRESSIVENESS": "1",
            "LTU_DAEMON__ASR__LANGUAGE": "de",
            "OTHER": "x",
        },
        overrides=["vad.aggressiveness=3", "streams.0.realtime=false"],
    )
    assert cfg.server.port == 2000
    assert cfg.vad.aggressiveness == 3  # --set wins over the environment
    assert cfg.asr.language == "de"  # a bare word is a string
    s = cfg.stream("a")
    assert isinstance(s, FileStream) and s.realtime is False and s.path == tmp_path / "x.wav"
    with pytest.raises(ConfigError, match=r"server\.port: Input should be a valid integer"):
        load_config(None, environ={"LTU_DAEMON__SERVER__PORT__X": "1"})
    with pytest.raises(ConfigError, match=r"server\.port: Input should be a valid integer"):
        load_config(None, environ={"LTU_DAEMON__SERVER__PORT": "many"})
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, overrides=["vad.aggressiveness"], environ={})


def test_rtsp_streams_keep_their_credentials_out_of_sight(tmp_path: Path) -> None:
    (tmp_path / "cam.pw").write_text("p@ss:w/rd\nignored\n")
    path = write(
        tmp_path,
        """
[[streams]]
name = "inline"
source = "rtsp"
url = "rtsp://admin:hunter2@cam.lan:8554/live?channel=1"

[[streams]]
name = "filed"
source = "rtsp"
url = "rtsp://cam.lan/live"
username = "viewer"
password_file = "cam.pw"
""",
    )
    inline, filed = load_config(path).streams
    assert isinstance(inline, RtspStream) and isinstance(filed, RtspStream)
    assert inline.resolved_url() == inline.url and inline.redacted_url() == "rtsp://***@cam.lan:8554/live"
    assert filed.password_file == tmp_path / "cam.pw"  # relative to the config file
    assert filed.resolved_url() == "rtsp://viewer:p%40ss%3Aw%2Frd@cam.lan/live"
    assert filed.redacted_url() == "rtsp://***@cam.lan/live"
    error = f"Server returned 401 Unauthorized: '{filed.resolved_url()}' (password p@ss:w/rd)"
    assert filed.scrub(error) == "Server returned 401 Unauthorized: 'rtsp://***@cam.lan/live' (password ***)"
    assert "hunter2" not in inline.scrub(f"failed: {inline.url}")
    with pytest.raises(ConfigError, match=r"streams\[0\].url: Value error, use rtsp://"):
        load_config(write(tmp_path, '[[streams]]\nname = "x"\nsource = "rtsp"\nurl = "http://cam/x"\n'))
